"""What the exact-replay machinery costs: this tree against another checkout, side by side.

    python benchmarks/overhead.py --baseline /path/to/older/checkout      # A/B, problems (a) and (b)
    python benchmarks/overhead.py                                        # this tree only

One training iteration (zero_grad + forward + loss + backward) of ``rampde_rk4`` through torchdiffeq on
the suite's problems (a) (MLP 64-512-64, batch 1024, 50 steps, bf16 unless ``--precision``) and (b)
(tiny 2-50-2 field, batch 16, 1000 steps, fp32).  Variants, each in a fresh subprocess, rounds interleaved between the
trees so that drifting machine load hits both alike:

* ``plain``: the problem's deterministic field -- what a field without randomness pays for the
  randomness/buffer detection and the per-step hidden-tensor walk (the A/B comparison);
* ``dropout``: the same field with ``nn.Dropout(0.1)`` after its hidden activation (training mode):
  the cost of replaying random numbers (generator state per step);
* ``no-walk``: ``plain`` with the per-step graph walk switched off (this tree only): the walk's share.

Prints a table (median ms over the rounds' medians; ratio against this tree's ``plain``), the thread
count and the load average, and writes ``benchmarks/results/overhead-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _worker(spec: dict) -> dict:
    tree = Path(spec["tree"])
    if tree != ROOT:
        # Import the other checkout's package, not this editable install.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path[:0] = [str(tree), str(tree / "adapters")]
    sys.path.insert(0, str(HERE))
    import torch
    from torch import nn
    from torchdiffeq import odeint

    import rampde_plugins
    from _problems import build_case

    assert Path(rampde_plugins.__file__).resolve().is_relative_to(tree.resolve()), rampde_plugins.__file__
    torch.set_num_threads(spec["threads"])
    case = build_case(spec["problem"], smoke=False, device="cpu")
    field = case.func
    if spec["variant"] == "dropout":
        seq = field.net
        field.net = nn.Sequential(seq[0], seq[1], nn.Dropout(0.1), seq[2])
    if spec["variant"] == "no-walk":
        from rampde_plugins import _probe

        _probe.GraphCheck.scan = lambda self, roots, passed=(), mark=None: ([], [])
    precision = spec["precision"] or ("bf16" if spec["problem"] == "a" else "fp32")
    t = torch.tensor([0.0, case.t1])
    opts = {"step_size": case.step_size, "precision": precision}

    def iteration():
        for p in field.parameters():
            p.grad = None
        start = time.perf_counter()
        y = odeint(field, case.y0, t, method="rampde_rk4", options=opts)[-1]
        case.loss(y).backward()
        return time.perf_counter() - start

    for _ in range(spec["warmup"]):
        iteration()
    times = sorted(1e3 * iteration() for _ in range(spec["repeats"]))
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="another checkout of this repository to compare with")
    p.add_argument("--problems", default="a,b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per subprocess")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=None,
                   help="policy for every problem (default: bf16 for (a), fp32 for (b), as in the suite); fp32 where "
                        "the CPU has no native bf16 (bf16 then is emulated: slow, and it hides the Python overhead)")
    p.add_argument("--out", default=str(HERE / "results" / "overhead-cpu.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    trees = {"this tree": ROOT}
    if args.baseline:
        trees["baseline"] = Path(args.baseline).resolve()
    jobs = []
    for problem in args.problems.split(","):
        for variant in ("plain", "dropout", "no-walk"):
            for name, tree in trees.items():
                if variant == "no-walk" and name != "this tree":
                    continue
                jobs.append((problem, variant, name, tree))
    load_start = os.getloadavg()
    results: dict = {}
    for r in range(args.rounds):
        for problem, variant, name, tree in jobs:
            spec = dict(problem=problem, variant=variant, tree=str(tree), threads=args.threads, precision=args.precision,
                        repeats=args.repeats, warmup=args.warmup)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"worker {spec} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(f"{problem}|{variant}|{name}", []).append(res["median_ms"])
            print(f"round {r + 1}: ({problem}) {variant:8s} {name:10s} {res['median_ms']:8.1f} ms", file=sys.stderr)
    load_end = os.getloadavg()
    rows = []
    for problem in args.problems.split(","):
        ref = statistics.median(results[f"{problem}|plain|this tree"])
        for key, vals in results.items():
            if key.startswith(problem + "|"):
                _, variant, name = key.split("|")
                med = statistics.median(vals)
                rows.append({"problem": problem, "variant": variant, "tree": name, "median_ms": med,
                             "rounds_ms": vals, "vs_this_tree_plain": med / ref})
    import torch

    header = (f"policy {args.precision or 'bf16 (a) / fp32 (b)'}, threads {args.threads}, load average {load_start[0]:.2f} -> {load_end[0]:.2f}, "
              f"torch {torch.__version__}, {args.rounds} rounds x {args.repeats} iterations")
    print(header)
    print("| problem | variant | tree | median ms | vs this tree, plain |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| ({row['problem']}) | {row['variant']} | {row['tree']} | {row['median_ms']:.1f} | {row['vs_this_tree_plain']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
