"""Live-tensor peak of one training iteration: the CPU counterpart of CUDA's ``max_memory_allocated``.

    python benchmarks/live_memory.py [--steps 50,400] [--only NAME] [--smoke]

The benchmark suite and the schedules study measure CPU memory as peak RSS growth, which also counts
the pages glibc keeps after a tensor is freed (its mmap threshold rises after the first large free,
so later large tensors come from the heap and their pages stay resident).  At a few MiB that slack is
as large as what a schedule keeps.  This script counts instead the bytes of tensor storages alive
at any moment of one iteration (forward, loss, backward), as CUDA's caching allocator reports them:
every storage an operator returns is counted from its creation until it is freed (a
``TorchDispatchMode`` sees every operator, also inside autograd's backward; a weak reference to the
storage sees its end).  Kernel-internal scratch buffers are not operator outputs and are not counted.

Problem (a) of the benchmarks (MLP 64-512-64, batch 1024), RK4 on a fixed grid, one warm-up
iteration first.  A last row measures a floor no method can go below (:func:`floor`): the
solution and its cotangent alive while one bf16 field VJP runs.  Results:
``benchmarks/results/live-memory-cpu.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _problems import build_case  # noqa: E402


class LiveTensorMeter(TorchDispatchMode):
    """Bytes of the storages created inside the context that are alive; ``peak`` is their maximum."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._live:  # a view or an in-place result: its storage is counted already
                    continue
                nbytes = storage.nbytes()
                self._live[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._freed, key, nbytes)
        return out


def _configs():
    from rampde_plugins import BinomialSchedule

    def rampde(precision, checkpoint):
        def make(case):
            ck = checkpoint(case.n_steps) if callable(checkpoint) else checkpoint
            return "rampde_rk4", {"precision": precision, "checkpoint": ck}
        return make

    def sqrt_c(stages):
        return lambda n: BinomialSchedule(math.ceil(math.sqrt(n)), stages=stages)

    return {
        "torchdiffeq fp32": lambda case: ("rk4", {}),
        "torchdiffeq autocast bf16": lambda case: ("rk4", {"autocast": True}),
        "rampde bf16 steps": rampde("bf16", "steps"),
        "rampde bf16 graphs": rampde("bf16", "graphs"),
        "rampde bf16 c=sqrt(N)": rampde("bf16", sqrt_c(False)),
        "rampde bf16 c=sqrt(N) stages": rampde("bf16", sqrt_c(True)),
    }


def _iteration(case, method, options):
    import rampde_plugins  # noqa: F401  (installs the rampde methods)
    from torchdiffeq import odeint

    options = dict(options)
    autocast = options.pop("autocast", False)
    t = torch.tensor([0.0, case.t1])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = odeint(case.func, case.y0, t, method=method, options={"step_size": case.step_size, **options})[-1]
    loss = case.loss(y.float())
    loss.backward()


FLOOR = "floor of any method: solution + its cotangent + one bf16 field VJP"
FLOOR_C = "floor with c=sqrt(N) stored states (bf16): the above + c states"


def floor(case, n_states: int = 0) -> int:
    """A lower bound on a method's peak for this iteration, measured with the same meter.

    Whatever the schedule, while the backward runs the user holds the returned solution, autograd
    holds its cotangent (``select_backward`` of the loss on ``sol[-1]`` is a full tensor), and at
    least one vector-Jacobian product of the field is taken, which holds that evaluation's
    activations and its parameter gradients.  This runs exactly that (the solution and cotangent
    alive while one bf16 field VJP runs) and reports its peak; ``n_states`` states in bf16 (the
    narrowest storage dtype there is for them) are kept alive meanwhile, as a schedule that stores
    that many states must.  The VJP's input state and cotangent are made outside the meter: the
    bound is on the low side.
    """
    y = case.y0.detach().clone().requires_grad_()
    cotangent = torch.randn_like(y)
    params = [p for p in case.func.parameters() if p.requires_grad]

    def one_vjp(_grad):
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # hooks run without grad
            k = case.func(torch.tensor(0.0), y)
        torch.autograd.grad(k, [y, *params], cotangent.to(k.dtype))

    meter = LiveTensorMeter()
    with meter:
        kept = [case.y0.to(torch.bfloat16) for _ in range(n_states)]
        sol = torch.stack([case.y0, case.y0]).requires_grad_()
        sol.register_hook(one_vjp)
        case.loss(sol[-1].float()).backward()
        del kept
    return meter.peak


def measure(steps: int, smoke: bool, only: str | None = None) -> list[tuple[str, float]]:
    rows = []
    for name, make in _configs().items():
        if only and only not in name:
            continue
        case = build_case("a", smoke=smoke, device="cpu", n_steps=steps)
        method, options = make(case)
        _iteration(case, method, options)  # warm-up: lazy initialisation is not the iteration's memory
        for p in case.func.parameters():
            p.grad = None
        meter = LiveTensorMeter()
        with meter:
            _iteration(case, method, options)
        rows.append((name, meter.peak))
    for name, n_states in ((FLOOR, 0), (FLOOR_C, math.ceil(math.sqrt(steps)))):
        if not only or only in name:
            case = build_case("a", smoke=smoke, device="cpu", n_steps=steps)
            floor(case, n_states)  # warm-up, as above
            rows.append((name, floor(case, n_states)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="50,400", help="comma-separated numbers of RK4 steps")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    p.add_argument("--only", default=None, help="only the configurations whose name contains this (not written)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    start = time.time()
    import torchdiffeq

    lines = ["# Live-tensor peak of one iteration (cpu)", "",
             f"torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}; {platform.machine()}, "
             f"{torch.get_num_threads()} threads; python {platform.python_version()}; load average (1 min) "
             f"{os.getloadavg()[0]:.2f}. `python benchmarks/live_memory.py` (see its docstring: storages alive, "
             "as CUDA's max_memory_allocated counts them; RSS is in the schedules study).", ""]
    for steps in (int(s) for s in args.steps.split(",")):
        rows = measure(steps, args.smoke, args.only)
        base = rows[0][1] if rows and rows[0][0] == "torchdiffeq fp32" else None
        title = "smoke sizes" if args.smoke else "MLP 64-512-64, batch 1024"
        lines += [f"## Problem (a): {title}, {steps} RK4 steps", "",
                  "| config | live-tensor peak MiB | vs torchdiffeq fp32 |", "|---|---|---|"]
        lines += [f"| {name} | {peak / 2**20:.2f} | {f'{peak / base:.5f}x' if base else '-'} |" for name, peak in rows]
        if base:
            lines += ["", f"1/100 of torchdiffeq fp32 is {base / 100 / 2**20:.2f} MiB."]
        lines.append("")
    lines.append(f"({time.time() - start:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke and not args.only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "live-memory-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
