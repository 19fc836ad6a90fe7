"""Checkpoint schedules timed side by side in one process, rounds interleaved.

    python benchmarks/interleaved.py --problem a --threads 2 --rounds 3
    python benchmarks/interleaved.py --problem b --threads 1 --rounds 5

The schedules study (``bench.py --study schedules``) runs each configuration in a fresh process,
which is right for memory but leaves timings exposed to this VM's drift between processes (20-30%
here).  Interleaving the configurations round by round in one process compares them under the same
conditions; the median per configuration and its ratio to torchdiffeq's ``rk4`` (direct backprop)
are printed, with the thread count and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _problems import build_case  # noqa: E402

import rampde_plugins  # noqa: E402
from rampde_plugins import SegmentsSchedule  # noqa: E402

CONFIGS = {
    "torchdiffeq rk4 fp32": ("rk4", {}),
    "rampde steps": ("rampde_rk4", {"precision": "fp32"}),
    "rampde graphs": ("rampde_rk4", {"precision": "fp32", "checkpoint": "graphs"}),
    "rampde binomial c=N-1": ("rampde_rk4", {"precision": "fp32", "checkpoint": "n-1"}),
    "rampde segments(4)": ("rampde_rk4", {"precision": "fp32", "checkpoint": SegmentsSchedule(4)}),
    "rampde segments(16)": ("rampde_rk4", {"precision": "fp32", "checkpoint": SegmentsSchedule(16)}),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="a", choices=("a", "b"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from torchdiffeq import odeint

    torch.set_num_threads(args.threads)
    case = build_case(args.problem, smoke=False, device="cpu")
    t = torch.tensor([0.0, case.t1])

    def iteration(method, options):
        options = dict(options)
        if options.get("checkpoint") == "n-1":
            options["checkpoint"] = case.n_steps - 1
        for q in case.func.parameters():
            q.grad = None
        start = time.perf_counter()
        y = odeint(case.func, case.y0, t, method=method, options={"step_size": case.step_size, **options})[-1]
        case.loss(y).backward()
        return time.perf_counter() - start

    print(f"problem ({args.problem}), {case.n_steps} steps; torch {torch.__version__}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}; rampde-plugins {rampde_plugins.__version__} from "
          f"{Path(rampde_plugins.__file__).resolve().parent.parent}")
    times = {name: [] for name in CONFIGS}
    for method, options in CONFIGS.values():
        iteration(method, options)  # warm-up
    for _ in range(args.rounds):
        for name, (method, options) in CONFIGS.items():
            times[name].append(iteration(method, options))
    base = statistics.median(times["torchdiffeq rk4 fp32"])
    floor = min(times["torchdiffeq rk4 fp32"])
    # the minimum beside the median: on a shared machine co-tenants slow some rounds by tens of per
    # cent, and the fastest round of each configuration is the least disturbed measure of its cost
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} {1e3 * med:8.0f} ms  {med / base:5.2f}x  min {1e3 * min(ts):6.0f} ms {min(ts) / floor:5.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
