"""The main job's training step on a shared machine: quiet, then while two competing torch processes run.

    python benchmarks/contention.py            # about 5 minutes on 2 cores (the main job under load included)
    python benchmarks/contention.py --smoke    # tiny sizes, no main job (tests)

The competing load is started and stopped by this script: ``--competitors`` processes (default 2), each
running small matrix products on ``--competitor-threads`` torch threads (default 2) -- what other
people's torch jobs do to a shared 2-core machine.  One training iteration of the main job
(``benchmarks/train.py``: its field, batch and steps; forward, loss, backward) is timed for
torchdiffeq's ``rk4`` in fp32 and for ``rampde_rk4`` under the CPU's bf16 policy (default schedule and
``checkpoint="graphs"``), rounds interleaved, first on the quiet machine and then under the load, with
two thread settings: torch's default (one thread per core) and the main job's ``--threads auto``
(:func:`_common.choose_threads`: the cores the load leaves free).  A library's *slowdown* is its
loaded time over its quiet time with the same setting; the table puts rampde's next to torchdiffeq's.

Then (unless ``--skip-main-job``) the main job itself runs, exactly as the README starts it, while the
load runs, and its wall time and verdicts are recorded.  Results:
``benchmarks/results/contention-cpu.{md,json}``.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import rampde_plugins  # noqa: E402,F401  (installs the rampde methods)
from _common import choose_threads, machine_info, round_robin  # noqa: E402

COMPETITOR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(int(sys.argv[2]), int(sys.argv[2]))
while True:
    b = a @ a
"""


class CompetingLoad:
    """``n`` competing torch processes, started on entry and killed on exit (also on an error)."""

    def __init__(self, n: int, threads: int, size: int):
        self.n, self.threads, self.size = n, threads, size
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", COMPETITOR, str(self.threads), str(self.size)],
                                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2.0)  # (they import torch and start multiplying)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a competing process exited with {p.returncode}")
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs.clear()
        return False


def _step_fn(args, kind: str, checkpoint):
    """One training iteration of the main job's problem (forward, loss, backward) for ``kind``."""
    from train import ODEFunc, _iteration, batches, ground_truth

    torch.manual_seed(args.seed)
    func = ODEFunc(args.hidden, args.layers)
    batch = next(batches(*ground_truth(400, 10.0), args.batch, args.seg, 1, args.seed + 1))
    precision = None if kind == "torchdiffeq" else "bf16"
    return lambda: _iteration(func, batch, kind, precision, checkpoint, args.steps, torch.device("cpu"))


CONFIGS = {  # label -> (kind, checkpoint)
    "torchdiffeq rk4 fp32": ("torchdiffeq", None),
    "rampde_rk4 bf16 (default)": ("rampde", None),
    "rampde_rk4 bf16 graphs": ("rampde", "graphs"),
}


def time_round_robin(steps: dict, rounds: int, threads: int) -> dict[str, list[float]]:
    """Seconds per iteration of each step function on ``threads`` torch threads, rounds interleaved
    (:func:`_common.round_robin`); torch's thread setting is put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return round_robin(steps, rounds)
    finally:
        torch.set_num_threads(before)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--competitors", type=int, default=2)
    p.add_argument("--competitor-threads", type=int, default=2)
    p.add_argument("--competitor-size", type=int, default=256, help="side of the competitors' square matrices")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and no main job (tests)")
    p.add_argument("--skip-main-job", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    from train import parse_args as main_job_args

    job = main_job_args([] if not args.smoke else ["--hidden", "16", "--batch", "8", "--steps", "4"])
    rounds = 2 if args.smoke else args.rounds
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    steps = {label: _step_fn(job, kind, ck) for label, (kind, ck) in CONFIGS.items()}
    started = time.time()
    load_quiet = os.getloadavg()[0]
    quiet_auto, quiet_why = choose_threads("auto")
    settings = {f"default ({cores} threads)": cores, f"auto, quiet: {quiet_auto}": quiet_auto}
    quiet = {name: time_round_robin(steps, rounds, n) for name, n in settings.items()}
    main_job = None
    with CompetingLoad(args.competitors, args.competitor_threads, args.competitor_size):
        loaded_auto, loaded_why = choose_threads("auto")
        loaded_threads = {f"default ({cores} threads)": cores, f"auto, quiet: {quiet_auto}": loaded_auto}
        loaded = {name: time_round_robin(steps, rounds, n) for name, n in loaded_threads.items()}
        load_loaded = os.getloadavg()[0]
        if not (args.smoke or args.skip_main_job):
            t0 = time.perf_counter()
            out_dir = Path(args.out) / "contention-main-job"
            proc = subprocess.run([sys.executable, str(HERE / "train.py"), "--no-progress", "--out", str(out_dir)],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"the main job failed under load:\n{proc.stderr[-3000:]}")
            summary = json.loads((out_dir / "summary.json").read_text())
            main_job = {"wall_s": wall, "stdout_tail": proc.stdout.strip().splitlines()[-16:],
                        "threads": summary["machine"]["threads"], "threads_why": summary["machine"]["threads_why"],
                        "verdicts": {k: v["verdict"] for k, v in summary["where_rampde_wins"].items()}}
    rows = []
    for name in settings:
        base_label = "torchdiffeq rk4 fp32"
        q_base, l_base = statistics.median(quiet[name][base_label]), statistics.median(loaded[name][base_label])
        for label in CONFIGS:
            q, lo = statistics.median(quiet[name][label]), statistics.median(loaded[name][label])
            rows.append({"threads": name, "quiet_threads": settings[name],
                         "loaded_threads": loaded_threads[name], "config": label, "quiet_ms": 1e3 * q, "loaded_ms": 1e3 * lo,
                         "slowdown": lo / q, "slowdown_vs_torchdiffeq": (lo / q) / (l_base / q_base)})
    result = {"machine": machine_info(torch.device("cpu")), "args": vars(args), "main_job_args": vars(job),
              "load_average_quiet": load_quiet, "load_average_loaded": load_loaded, "threads_quiet_why": quiet_why,
              "threads_loaded_why": loaded_why, "rows": rows, "main_job_under_load": main_job,
              "elapsed_s": time.time() - started}
    lines = ["# The main job's training step on a shared machine (cpu)", "",
             f"torch {torch.__version__}; {cores} cores; competing load: {args.competitors} processes x "
             f"{args.competitor_threads} torch threads of {args.competitor_size}x{args.competitor_size} matrix products. "
             f"Load average (1 min) {load_quiet:.2f} quiet, {load_loaded:.2f} under the load. "
             f"Main job's problem: {job.layers}x{job.hidden} MLP, batch {job.batch}, {job.steps} RK4 steps; "
             f"median of {rounds} interleaved rounds. `python benchmarks/contention.py`.", "",
             f"`--threads auto` chose: quiet -- {quiet_why}; under the load -- {loaded_why}.", "",
             "| torch threads (quiet / loaded) | config | quiet ms | loaded ms | slowdown | slowdown / torchdiffeq's |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quiet_threads']} / {r['loaded_threads']} | {r['config']} | {r['quiet_ms']:.1f} | "
                     f"{r['loaded_ms']:.1f} | {r['slowdown']:.2f}x | {r['slowdown_vs_torchdiffeq']:.2f}x |")
    if main_job is not None:
        lines += ["", f"The main job (`python benchmarks/train.py`, as the README runs it) under the same load: "
                  f"**{main_job['wall_s']:.0f} s** wall, {main_job['threads']} torch threads ({main_job['threads_why']}).", "",
                  "```", *main_job["stdout_tail"], "```"]
    lines.append("")
    lines.append(f"({result['elapsed_s']:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "contention-cpu.md").write_text(text)
        (out / "contention-cpu.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
