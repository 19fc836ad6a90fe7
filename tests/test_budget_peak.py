"""A memory budget bounds the peak of the whole solve (issue 27, defect 5), as a user measures it.

The defect: ``memory_budget`` bounded what the schedule held (states, checkpoints, graphs), not the
solve's peak -- one forward + backward of a 64-step RK4 MLP (state 256x64, hidden 512) under 6 MiB
peaked at 8.1 MiB of resident memory, smaller budgets 23-64% over.  The peak also holds the
solution and its cotangent, the adjoint and the parameter gradient sums, and the VJP's own memory
(autograd's buffers, the gradients it returns) on top of the graph it reverses.

Two measurements, neither of them rampde's own accounting:

* the resident set of a separate process, as a user reads it on the CPU: glibc returns freed large
  allocations to the system (``MALLOC_MMAP_THRESHOLD_=65536`` set before the process starts), for
  each budget in turn one warm-up iteration, then the high-water mark (``VmHWM`` after a reset
  through ``/proc/self/clear_refs``) above the resident set before the iteration;
* every tensor alive at once (a ``TorchDispatchMode`` meter: what CUDA's ``max_memory_allocated``
  counts), deterministic, for fixed grids under fp32 and bf16, adaptive steps and torchode's
  per-sample layout.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

from rampde_plugins import collect_stats
from rampde_plugins._engine._memory import LiveBytes

MiB = 2**20

# The problem.  Budgets from "three checkpoints fit" to "every graph fits": binomial with few
# and with more checkpoints, segments of 2 steps, graphs (the schedules chosen are checked).
RSS_BUDGETS = {4.8: "binomial", 6.0: "binomial", 9.5: "segments", 150.0: "graphs"}

# What the resident set holds beyond the tensors the budget counts -- memory that is no tensor:
# autograd's graph nodes, Python objects, the heap's partly used pages -- is smaller here than what
# the prediction counts that never becomes resident or alive at once (pages of preallocated tensors
# never written, the last page of an allocation, the VJP measured with its whole graph alive).  Measured with this script, 3 runs (torch
# 2.13, glibc, 1 thread): the resident peak is 0.50-0.87 MiB below the predicted peak for binomial
# (4.8 and 6 MiB), 0.82-1.01 MiB for segments(2), 1.34-1.43 MiB for graphs.  So no tolerance: the
# peak must be within the budget.  (Giving freed heap pages back before each iteration --
# malloc_trim -- makes an iteration touch them again: graphs then peaked 1.2-1.3 MiB *above* its
# prediction, about 20 KB per kept step of autograd nodes and heap, within its 150 MiB budget;
# binomial at 6 MiB stayed 0.3 MiB below.)
RSS_TOLERANCE = 0

_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    import rampde_plugins
    from rampde_plugins import collect_stats
    from torchdiffeq import odeint

    def rss(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    B, D, H, N = 256, 64, 512, 64

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))

        def forward(self, t, y):
            return self.net(y)

    f = Field()
    y0, w = torch.randn(B, D), torch.randn(2, B, D)
    t = torch.tensor([0.0, 1.0])

    def iteration(budget):
        for p in f.parameters():
            p.grad = None  # the gradients the backward makes are part of its peak
        with collect_stats() as stats:
            y = odeint(f, y0, t, method="rampde_rk4", options={"step_size": 1.0 / N, "memory_budget": budget})
            (y * w).sum().backward()  # a loss whose cotangent is a full tensor
            del y
        return stats.last

    out = []
    for budget in json.loads(sys.argv[1]):
        try:
            iteration(budget)  # warm-up
        except ValueError as e:
            out.append({"budget": budget, "error": str(e)})
            continue
        gc.collect()
        before = rss("VmRSS:")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        rec = iteration(budget)
        out.append({"budget": budget, "peak": rss("VmHWM:") - before, "schedule": rec.schedule,
                    "predicted": rec.predicted_bytes, "checkpoints": rec.checkpoints,
                    "segment_steps": rec.segment_steps})
    print(json.dumps(out))
    """
)


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        with open("/proc/self/status") as fh:
            return any(line.startswith("VmHWM:") for line in fh)
    except OSError:
        return False


def _rss_peaks(budgets):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(budgets)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_works(),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak resident set")
def test_resident_peak_of_forward_and_backward_stays_within_the_budget():
    budgets = [int(b * MiB) for b in RSS_BUDGETS]
    results = _rss_peaks(budgets)
    report = [(r["budget"] / MiB, r.get("schedule"), round(r.get("peak", 0) / MiB, 3)) for r in results]
    for r, expected in zip(results, RSS_BUDGETS.values()):
        assert "error" not in r, r
        assert r["schedule"] == expected, report
        assert r["predicted"] <= r["budget"]
        assert r["peak"] <= r["budget"] + RSS_TOLERANCE, report


def test_a_budget_below_the_whole_solve_raises_with_the_numbers():
    """4 MiB held the issue's schedule (binomial, 27 checkpoints) but peaked at 6 MiB; now it is
    refused before anything runs, with what the least schedule needs and why."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 64))
    y0 = torch.randn(256, 64)
    with pytest.raises(ValueError) as err:
        odeint(lambda t, y: f(y), y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 1 / 64, "memory_budget": "4MiB", "adjoint_params": tuple(f.parameters())})
    msg = str(err.value)
    for part in ("memory_budget=4 MiB", "one state (68 KiB", "one step's graph", "the solution (132 KiB",
                 "its cotangent, the adjoint and the gradient sums", "one step's VJP beyond its graph"):
        assert part in msg, msg
    least = re.search(r"measured\) = ([0-9.]+) MiB", msg)
    assert least and 4 < float(least.group(1)) < 4.8, msg  # the least any schedule needs here


# ---- every tensor alive at once: deterministic -----------------------------------------------------

class _MLP(torch.nn.Module):
    def __init__(self, dim=32, hidden=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y)


def _torchdiffeq_iteration(f, y0, w, t, options, meter=None):
    for p in f.parameters():
        p.grad = None
    with collect_stats() as stats:
        if meter is not None:
            meter.__enter__()
        try:
            y = odeint(f, y0, t, method=options.pop("method", "rampde_rk4"), options=options)
            (y * w).sum().backward()
            del y
        finally:
            if meter is not None:
                meter.__exit__(None, None, None)
    return stats.last


def _walk_budgets(run, top):
    """From the unconstrained choice down: one byte below each choice's predicted peak (binomial:
    4/5 of the budget), until the budget is refused; every step checked against the live meter."""
    seen, budget = [], top
    while True:
        try:
            run(budget)
        except ValueError as e:
            assert "memory_budget=" in str(e)
            return seen
        meter = LiveBytes()
        rec = run(budget, meter)
        assert rec.predicted_bytes <= budget
        assert meter.peak <= rec.predicted_bytes, (rec.schedule, rec.checkpoints, meter.peak, rec.predicted_bytes)
        seen.append(rec.schedule)
        budget = rec.predicted_bytes - 1 if rec.schedule != "binomial" else budget * 4 // 5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_live_tensor_peak_within_prediction_on_a_fixed_grid(precision):
    torch.manual_seed(0)
    f, y0 = _MLP(), torch.randn(64, 32)
    t = torch.tensor([0.0, 0.37, 1.0])  # an output inside a step: an output evaluation in its graph
    w = torch.randn(3, 64, 32)

    def run(budget, meter=None):
        return _torchdiffeq_iteration(f, y0, w, t, {"step_size": 1 / 24, "precision": precision,
                                                    "memory_budget": budget}, meter)

    seen = _walk_budgets(run, run("1GB").predicted_bytes)
    assert seen[0] == "graphs" and {"segments", "steps", "binomial"} <= set(seen), seen


def test_live_tensor_peak_within_prediction_adaptive():
    torch.manual_seed(0)
    f, y0 = _MLP(), torch.randn(64, 32)
    t = torch.tensor([0.0, 0.5, 1.0])
    w = torch.randn(3, 64, 32)

    def run(budget, meter=None):
        return _torchdiffeq_iteration(f, y0, w, t, {"method": "rampde_dopri5", "memory_budget": budget}, meter)

    seen = _walk_budgets(run, run("1GB").predicted_bytes)
    assert seen[0] == "steps" and "binomial" in seen, seen


def test_live_tensor_peak_within_prediction_torchode_per_sample():
    torch.manual_seed(0)
    f, y0 = _MLP(), torch.randn(16, 32)
    t_eval = torch.linspace(0, 1, 3).repeat(16, 1)
    w = torch.randn(16, 3, 32)

    def run(budget, meter=None, **kw):
        for p in f.parameters():
            p.grad = None
        with collect_stats() as stats:
            if meter is not None:
                meter.__enter__()
            try:
                sol = to.solve_ivp(to.ODETerm(f), y0, t_eval, method="rampde_rk4", memory_budget=budget,
                                   controller=to.FixedStepController(), dt0=torch.full((16,), 0.05))
                (sol.ys * w).sum().backward()
                del sol
            finally:
                if meter is not None:
                    meter.__exit__(None, None, None)
        return stats.last

    seen = _walk_budgets(run, run("1GB").predicted_bytes)
    assert seen[0] == "graphs" and "binomial" in seen, seen
