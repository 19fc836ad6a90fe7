"""Everything to run when a GPU is lent, in one call: the ``gpu`` tests and the CUDA benchmark.

    python benchmarks/gpu.py --out DIR            # on a machine with CUDA (about 5-8 minutes)
    python benchmarks/gpu.py --smoke --out DIR    # anywhere: tiny sizes, CPU if there is no CUDA

Runs, each in its own process and each with a time limit, so that one call fits a short device lease:

1. ``pytest -m gpu`` -- the tests that need a CUDA device (mixed precision on tensor cores, fp16 with
   the adjoint scaler); their output goes to ``DIR/gpu-tests.txt``;
2. ``benchmarks/bench.py --device cuda`` on problems (a) (MLP field) and (c) (conv ODE block): every
   configuration side by side -- torchdiffeq fp32 and under autocast, rampde fp32/fp16/bf16 and its
   schedules -- time per training iteration and ``torch.cuda.max_memory_allocated``, into
   ``DIR/results-cuda.{json,md}``.

The target is the rampde paper's claim for fp16 on a GPU: up to 2x faster than fp32 and about half
the memory.  ``DIR/gpu-summary.md`` names the hardware (device, capability, bf16 support, driver's
CUDA version), the software versions and what each step returned.  Without CUDA the script says so
and runs the same steps on the CPU at ``--smoke`` sizes (a check that it works, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def hardware() -> list[str]:
    lines = [f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.total_memory / 2**30:.1f} GiB, bf16 supported: {torch.cuda.is_bf16_supported()}")
        lines.append(f"CUDA runtime {torch.version.cuda}")
    else:
        lines.append(f"no CUDA device: CPU fallback ({os.cpu_count()} cores), --smoke sizes")
    return lines


def step(name: str, cmd: list[str], out: Path, timeout: float) -> str:
    """Run one step; its output into ``out``; returns a one-line outcome."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out.write_text(proc.stdout + proc.stderr)
        outcome = f"exit {proc.returncode}"
        tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
        outcome += f" -- {tail[0][:160]}"
    except subprocess.TimeoutExpired as exc:
        out.write_text((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        outcome = f"stopped after {timeout:.0f} s (time limit)"
    line = f"{name}: {outcome} ({time.perf_counter() - start:.0f} s)"
    print(line, flush=True)
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results on CUDA; out/gpu-smoke for a smoke or CPU run, "
                        "which must not overwrite the committed CPU results)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check that the script works)")
    p.add_argument("--problems", default="a,c", help="bench.py problems (default: a,c)")
    p.add_argument("--repeats", type=int, default=3, help="bench.py timed iterations per configuration")
    p.add_argument("--tests-timeout", type=float, default=240.0, help="seconds for the gpu tests")
    p.add_argument("--bench-timeout", type=float, default=420.0, help="seconds for the benchmark")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.out is None:
        args.out = HERE / "results" if cuda and not args.smoke else ROOT / "out" / "gpu-smoke"
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# GPU run", "", *[f"- {x}" for x in hardware()], ""]
    print("\n".join(lines), flush=True)
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    lines.append("- " + step("gpu tests", tests, args.out / "gpu-tests.txt", args.tests_timeout))
    bench = [sys.executable, str(HERE / "bench.py"), "--device", "cuda" if cuda else "cpu",
             "--problems", "a" if args.smoke else args.problems, "--interleaved-rounds", "0",
             "--out", str(args.out)]
    bench += ["--smoke"] if args.smoke or not cuda else ["--repeats", str(args.repeats)]
    lines.append("- " + step("benchmark", bench, args.out / "bench-log.txt", args.bench_timeout))
    device = "cuda" if cuda else "cpu"
    table = args.out / f"results-{device}.md"
    lines += ["", f"Tables: `{table.name}` (time per iteration and peak memory of every configuration; the "
              "target for rampde fp16 on a GPU is at most 0.5x torchdiffeq fp32's time and about half its memory)."]
    (args.out / "gpu-summary.md").write_text("\n".join(lines) + "\n")
    print(f"summary: {args.out / 'gpu-summary.md'}", flush=True)
    return 0 if all("exit 0" in ln or "exit 5" in ln for ln in lines if ln.startswith("- gpu tests") or ln.startswith("- benchmark")) else 1


if __name__ == "__main__":
    sys.exit(main())
