"""The schedules timed at two revisions of this repository, side by side in one run.

    python benchmarks/compare_revisions.py --before 2c89e06 --problem b --threads 1 --rounds 3 --repeats 2

Each repeat runs the working tree's ``benchmarks/interleaved.py`` once with the *before* revision's
library on the path (a temporary ``git worktree``) and once with the working tree's, alternating which
goes first; every process times torchdiffeq's ``rk4`` beside the rampde schedules, so the ratio to it is compared under the
conditions of the same process.  Prints each run's table and, per configuration, the median over the
processes of each revision of the ratio of its median round and of its fastest round (on a shared
machine the fastest round is the least disturbed), with the thread count and the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, args) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'adapters'}", OMP_NUM_THREADS=str(args.threads))
    # the working tree's harness for both revisions (the same problems and timing); the library
    # under test is the tree's, first on the path
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "interleaved.py"), "--problem", args.problem,
                          "--threads", str(args.threads), "--rounds", str(args.rounds)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True).stdout
    print(f"--- {tree}\n{out}", flush=True)
    return {m.group(1).strip(): (float(m.group(2)), float(m.group(3) or "nan"))
            for m in re.finditer(r"^(.+?)\s+\d+ ms\s+([0-9.]+)x(?:\s+min\s+\d+ ms\s+([0-9.]+)x)?$", out, re.M)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="a git revision")
    p.add_argument("--problem", default="b", choices=("a", "b"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        try:
            ratios = {"before": {}, "after": {}}
            for i in range(args.repeats):
                order = [("before", before), ("after", ROOT)]
                for label, tree in (order if i % 2 == 0 else order[::-1]):
                    for name, r in run(tree, args).items():
                        ratios[label].setdefault(name, []).append(r)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(f"problem ({args.problem}), {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}: "
          f"ratio to torchdiffeq rk4, the median over {args.repeats} processes per revision of each process's "
          "median round and of its fastest round")
    print(f"{'configuration':24s} {args.before + ' med':>12s} {'working med':>12s} {args.before + ' min':>12s} "
          f"{'working min':>12s}")
    for name in ratios["after"]:
        b, a = ratios["before"].get(name, []), ratios["after"][name]

        def mid(rs, i):
            vals = [r[i] for r in rs if r[i] == r[i]]  # (an older interleaved.py prints no minimum)
            return statistics.median(vals) if vals else float("nan")

        print(f"{name:24s} {mid(b, 0):12.2f} {mid(a, 0):12.2f} {mid(b, 1):12.2f} {mid(a, 1):12.2f}")


if __name__ == "__main__":
    main()
