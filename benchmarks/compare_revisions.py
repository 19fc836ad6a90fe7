"""The schedules timed at two revisions of this repository, side by side in one run.

    python benchmarks/compare_revisions.py --before 2c89e06 --problem b --threads 1 --rounds 3 --repeats 2

Each repeat runs ``benchmarks/interleaved.py`` once with the *before* revision's sources (a temporary
``git worktree``) and once with the working tree's, alternating which goes first; every process
times torchdiffeq's ``rk4`` beside the rampde schedules, so the ratio to it is compared under the
conditions of the same process.  Prints each run's table and, per configuration, the median ratio at
each revision, with the thread count and the load average.
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
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "interleaved.py"), "--problem", args.problem,
                          "--threads", str(args.threads), "--rounds", str(args.rounds)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True).stdout
    print(f"--- {tree}\n{out}", flush=True)
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(.+?)\s+\d+ ms\s+([0-9.]+)x$", out, re.M)}


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
          f"median ratio to torchdiffeq rk4 over {args.repeats} processes per revision")
    print(f"{'configuration':24s} {args.before:>10s} {'working':>10s}")
    for name in ratios["after"]:
        b, a = ratios["before"].get(name), ratios["after"][name]
        print(f"{name:24s} {statistics.median(b) if b else float('nan'):10.2f} {statistics.median(a):10.2f}")


if __name__ == "__main__":
    main()
