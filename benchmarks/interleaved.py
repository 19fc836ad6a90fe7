"""Checkpoint schedules timed side by side in one process, rounds interleaved.

    python benchmarks/interleaved.py --problem a --threads 2 --rounds 3
    python benchmarks/interleaved.py --problem b --threads 1 --rounds 5
    python benchmarks/interleaved.py --targets      # the per-step overhead targets -> results/targets-cpu.*

The schedules study (``bench.py --study schedules``) runs each configuration in a fresh process,
which is right for memory but leaves timings exposed to this VM's drift between processes (20-30%
here).  Interleaving the configurations round by round in one process compares them under the same
conditions; the median per configuration and its ratio to torchdiffeq's ``rk4`` (direct backprop)
are printed, with the thread count and the load average.

``--targets`` times what the overhead targets compare, each problem in its own rounds: on the tiny
problem (b) (fp32: per-step Python and autograd overhead dominates) rampde's default schedule and
``"graphs"`` against torchdiffeq's ``rk4``; on the MLP problem (a) in bf16 ``"graphs"`` (and the
default) against torchdiffeq's ``rk4`` under bf16 autocast and in fp32.  Ratios use the fastest
round of each configuration (on a shared machine co-tenants slow some rounds by tens of per cent;
the fastest is the least disturbed measure of a configuration's cost) with the medians beside them;
it writes ``results/targets-cpu.{md,json}`` with the thread count (``--threads auto``: the cores the
load leaves free) and the load average.
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


#: --targets: problem -> (label -> (method, options)); the first label is each target's baseline
TARGET_CONFIGS = {
    "b": {
        "torchdiffeq rk4 fp32": ("rk4", {}),
        "rampde fp32 default (steps)": ("rampde_rk4", {"precision": "fp32"}),
        "rampde fp32 graphs": ("rampde_rk4", {"precision": "fp32", "checkpoint": "graphs"}),
        # the floor of a schedule that recomputes: a plain RK4 loop without a graph, then the same loop
        # with one and its backward (no solver library, no checks, one stored state per step not kept)
        "hand-written loop: no-graph forward + forward and backward": ("floor", {}),
    },
    "a": {
        "torchdiffeq rk4 fp32": ("rk4", {}),
        "torchdiffeq rk4 autocast bf16": ("rk4", {"autocast": True}),
        "rampde bf16 default (steps)": ("rampde_rk4", {"precision": "bf16"}),
        "rampde bf16 graphs": ("rampde_rk4", {"precision": "bf16", "checkpoint": "graphs"}),
    },
}
#: (problem, config, baseline, bound): config's time / baseline's time <= bound
TARGETS = (
    ("b", "rampde fp32 default (steps)", "torchdiffeq rk4 fp32", 1.05),
    ("b", "rampde fp32 graphs", "torchdiffeq rk4 fp32", 0.9),
    ("a", "rampde bf16 graphs", "torchdiffeq rk4 autocast bf16", 0.9),
)


def _timer(case):
    from torchdiffeq import odeint

    t = torch.tensor([0.0, case.t1])

    def rk4_loop(y):
        f, h = case.func, case.step_size
        for n in range(case.n_steps):
            t0 = n * h
            k1 = f(t0, y)
            k2 = f(t0 + h / 3, y + (h / 3) * k1)
            k3 = f(t0 + 2 * h / 3, y + h * (k2 - k1 / 3))
            k4 = f(t0 + h, y + h * (k1 - k2 + k3))
            y = y + (h / 8) * (k1 + 3 * (k2 + k3) + k4)
        return y

    def iteration(method, options):
        options = dict(options)
        autocast = options.pop("autocast", False)
        for q in case.func.parameters():
            q.grad = None
        start = time.perf_counter()
        if method == "floor":
            with torch.no_grad():
                rk4_loop(case.y0)
            case.loss(rk4_loop(case.y0)).backward()
            return time.perf_counter() - start
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = odeint(case.func, case.y0, t, method=method, options={"step_size": case.step_size, **options})[-1]
        case.loss(y.float()).backward()
        return time.perf_counter() - start

    return iteration


def op_counts(iteration, method, options) -> tuple[int, int]:
    """Operators one iteration dispatches (forward and backward), and how many of them produce a tensor
    of at least 32768 elements -- torch's grain size, above which a CPU kernel opens an OpenMP parallel
    region (what an oversubscribed machine makes expensive)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        ops = big = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Count.ops += 1
            if any(isinstance(t, torch.Tensor) and t.numel() >= 32768 for t in tree_flatten(out)[0]):
                Count.big += 1
            return out

    with Count():
        iteration(method, options)
    return Count.ops, Count.big


def targets(rounds: int, threads_spec: str, out: Path | None) -> dict:
    """The overhead targets, measured (see the module docstring)."""
    import json

    from _common import choose_threads, machine_info, round_robin

    threads, why = choose_threads(threads_spec)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    result = {"machine": machine_info(torch.device("cpu")), "threads_why": why, "rounds": rounds, "problems": {}}
    try:
        for key, configs in TARGET_CONFIGS.items():
            case = build_case(key, smoke=out is None, device="cpu")
            iteration = _timer(case)
            times = round_robin({name: (lambda m=method, o=options: iteration(m, o))
                                 for name, (method, options) in configs.items()}, rounds)
            counts = {name: op_counts(iteration, method, options) for name, (method, options) in configs.items()}
            result["problems"][key] = {"steps": case.n_steps, "times_s": times, "op_counts": counts}
    finally:
        torch.set_num_threads(before)
    result["load_average"] = [load_start, os.getloadavg()[0]]
    rows = []
    for key, name, base, bound in TARGETS:
        ts = result["problems"][key]["times_s"]
        fastest = min(ts[name]) / min(ts[base])
        median = statistics.median(ts[name]) / statistics.median(ts[base])
        rows.append({"problem": key, "config": name, "baseline": base, "bound": bound, "fastest_ratio": fastest,
                     "median_ratio": median, "met": fastest <= bound})
    result["targets"] = rows
    tb = result["problems"]["b"]["times_s"]
    floor_name = "hand-written loop: no-graph forward + forward and backward"
    result["floor_b_ratio"] = min(tb[floor_name]) / min(tb["torchdiffeq rk4 fp32"])
    titles = {"a": "(a) MLP 64-512-64, batch 1024", "b": "(b) tiny field 2-50-2, batch 16"}
    lines = [f"Interleaved in one process, {rounds} rounds (order rotated), {threads} torch thread(s) ({why}); "
             f"load average {load_start:.2f} -> {result['load_average'][1]:.2f}; torch {torch.__version__}. "
             "`python benchmarks/interleaved.py --targets`.", "",
             "| problem | configuration | fastest ms | median ms | vs | ratio (fastest) | ratio (median) | target | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ts = result["problems"][r["problem"]]["times_s"]
        lines.append(f"| {titles[r['problem']]}, {result['problems'][r['problem']]['steps']} steps | {r['config']} | "
                     f"{1e3 * min(ts[r['config']]):.0f} | {1e3 * statistics.median(ts[r['config']]):.0f} | {r['baseline']} "
                     f"({1e3 * min(ts[r['baseline']]):.0f} ms) | {r['fastest_ratio']:.2f}x | {r['median_ratio']:.2f}x | "
                     f"<= {r['bound']}x | {'met' if r['met'] else 'not met'} |")
    lines.append(f"| {titles['b']}, {result['problems']['b']['steps']} steps | {floor_name} (the floor of a schedule "
                 f"that recomputes) | {1e3 * min(tb[floor_name]):.0f} | {1e3 * statistics.median(tb[floor_name]):.0f} | "
                 f"torchdiffeq rk4 fp32 | {result['floor_b_ratio']:.2f}x | "
                 f"{statistics.median(tb[floor_name]) / statistics.median(tb['torchdiffeq rk4 fp32']):.2f}x | - | |")
    lines += ["", "Operators per iteration, forward and backward (counted in one more iteration; \"parallel\": those "
              "producing at least 32768 elements, each an OpenMP parallel region on the CPU):", "",
              "| problem | " + " | ".join(["configuration", "operators", "of them parallel"]) + " |", "|---|---|---|---|"]
    for key, prob in result["problems"].items():
        for i, (name, (ops, big)) in enumerate(prob["op_counts"].items()):
            lines.append(f"| {titles[key] if i == 0 else ''} | {name} | {ops} | {big} |")
    result["default_over_floor_b"] = min(tb["rampde fp32 default (steps)"]) / min(tb[floor_name])
    lines += ["", f"On (b) the default schedule takes {result['default_over_floor_b']:.2f}x the hand-written loop that "
              f"runs the same two forwards and one backward with no solver around them (fastest rounds); that loop "
              f"itself takes {result['floor_b_ratio']:.2f}x torchdiffeq's direct backprop."]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "targets-cpu.md").write_text(text)
        (out / "targets-cpu.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="a", choices=("a", "b"))
    p.add_argument("--threads", default=None, help="torch threads: N, or 'auto' (with --targets: the default)")
    p.add_argument("--rounds", type=int, default=None, help="default: 3 (--targets: 7)")
    p.add_argument("--targets", action="store_true", help="the overhead targets -> results/targets-cpu.{md,json}")
    p.add_argument("--smoke", action="store_true", help="with --targets: tiny sizes, 2 rounds, nothing written")
    args = p.parse_args(argv)
    if args.targets:
        return targets(2 if args.smoke else (args.rounds or 7), args.threads or "auto",
                       None if args.smoke else Path(__file__).resolve().parent / "results")
    args.threads = torch.get_num_threads() if args.threads in (None, "auto") else int(args.threads)
    args.rounds = args.rounds or 3
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
