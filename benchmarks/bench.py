"""The benchmark suite: rampde's RK4 next to its peers, every configuration side by side.

    python benchmarks/bench.py                         # everything (CPU: about 15 min on 2 cores)
    python benchmarks/bench.py --problems a,b --repeats 5
    python benchmarks/bench.py --device cuda           # fp16 everywhere on a GPU
    python benchmarks/bench.py --smoke                 # tiny sizes, every problem and config once

Every configuration runs the same method -- Kutta's RK4 3/8 rule (torchdiffeq's ``rk4``) -- on the
same fixed grid, so the configurations do the same arithmetic and differ only in precision and in
how the gradient is obtained (direct backprop, continuous adjoint, rampde's discrete adjoint).
Problems (``_problems.py``): (a) MLP field, (b) tiny field (Python overhead), (c) conv ODE block,
(d) CNF with the exact trace, (e) problem (a) at 25..800 steps (scaling study).

Measured per (problem, configuration), each in a fresh subprocess so that one configuration's
allocations, caches and peak cannot leak into another's memory figure:

* time per training iteration = zero_grad + forward solve + loss + backward, after a warm-up; the
  median and min/max of ``--repeats`` timed iterations (more for fast iterations; (e): one per N);
* peak memory growth of ONE iteration, the first full-size one of the process (later ones reuse
  pages freed by earlier ones), preceded only by a one-step solve that pays one-time initialisation.
  CPU: peak resident set during the iteration (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``) minus the resident set before it.  ``ru_maxrss`` is recorded too but not
  used: in a child process it starts at the *parent's* peak, and it cannot be reset.  CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocation before;
* relative L2 error of the concatenated parameter gradient against an fp64 reference: torchdiffeq's
  own ``rk4`` in float64 with direct backprop on the same model and data (an implementation
  independent of rampde), computed once per problem in its own subprocess;
* forward and backward function evaluations, counted by a wrapper around the vector field (a direct
  backprop replays the recorded graph and calls ``f`` 0 times in its backward).

The schedules study (``--study schedules``) adds an interleaved timing phase: per problem one more
worker builds the case once and times the configurations its time targets compare round by round in
that one process (medians), because this VM's timings drift 20-30% between processes; its time
targets come from those medians, its memory targets from the fresh processes.

Outputs ``<out>/results-<device>.json`` (everything, including skipped configurations and why),
``<out>/results-<device>.md`` (also printed) and ``<out>/scaling-<device>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    choose_threads,
    current_rss_bytes,
    machine_info,
    peak_rss_bytes,
    rel_err,
    release_free_memory,
    reset_peak_rss,
    ru_maxrss_bytes,
)
from _problems import PROBLEMS, SCALING_STEPS, SCALING_STEPS_SMOKE, build_case  # noqa: E402

log = logging.getLogger("bench")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE = "torchdiffeq fp32"


# == The configurations ==============================================================================
def _final(sol):
    """State at the last output time (torchdiffeq returns the whole trajectory, tuple states as tuples)."""
    return tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]


def _torchdiffeq(method: str = "rk4", *, adjoint: bool = False, autocast: str | None = None,
                 precision: str | None = None, checkpoint=None, budget: Callable | None = None):
    """A solve through ``torchdiffeq.odeint`` (or ``odeint_adjoint``) on the case's fixed grid.

    ``checkpoint``: rampde's option (``"sqrt"``: binomial with ceil(sqrt(N)) checkpoints; ``"sqrt stages"``:
    the same with stage-by-stage step VJPs);
    ``budget(case, func, device, options) -> bytes``: a ``memory_budget`` worked out for the case."""

    def make(case, func, device):
        import rampde_plugins  # noqa: F401  (installs the rampde_* methods into torchdiffeq)
        from torchdiffeq import odeint, odeint_adjoint

        t = torch.tensor([0.0, case.t1], device=device)
        options = {"step_size": case.step_size}
        if precision is not None:
            options["precision"] = precision
        if checkpoint is not None:
            options["checkpoint"] = checkpoint
            if checkpoint in ("sqrt", "sqrt stages"):
                from rampde_plugins import BinomialSchedule

                options["checkpoint"] = BinomialSchedule(math.ceil(math.sqrt(case.n_steps)),
                                                         stages=checkpoint == "sqrt stages")
        if budget is not None:
            options["memory_budget"] = budget(case, func, device, dict(options))
        kwargs = {"method": method, "options": options}
        if adjoint:
            kwargs["adjoint_options"] = {"step_size": case.step_size}

        def solve():
            ctx = torch.autocast(device.type, dtype=DTYPES[autocast]) if autocast else contextlib.nullcontext()
            with ctx:
                sol = (odeint_adjoint if adjoint else odeint)(func, case.y0, t, **kwargs)
            return _final(sol)  # the loss is computed outside autocast, in fp32

        return solve

    return make


@functools.cache
def _torchode_rk38():
    """Kutta's 3/8 rule built from torchode's own classes (torchode ships no RK4)."""
    from torchode.interpolation import ThirdOrderPolynomialInterpolation
    from torchode.single_step_methods.runge_kutta import ButcherTableau, ExplicitRungeKutta

    tableau = ButcherTableau.from_lists(c=[0.0, 1 / 3, 2 / 3, 1.0], a=[[], [1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
                                        b=[1 / 8, 3 / 8, 3 / 8, 1 / 8], b_err=[0.0, 0.0, 0.0, 0.0])

    class RK38(ExplicitRungeKutta):
        def __init__(self, term=None):
            super().__init__(term, tableau)

        def convergence_order(self):
            return 4

        def build_interpolation(self, data):
            return ThirdOrderPolynomialInterpolation.from_k(data.t0, data.dt, data.y0, data.y1, data.k)

    return RK38


def _torchode(step_method: Callable | None = None, rampde_precision: str | None = None):
    """A solve through torchode's API with a fixed step controller: torchode's ``AutoDiffAdjoint``
    (direct backprop), or with ``rampde_precision`` the registered ``rampde_rk4`` on ``RampdeAdjoint``.

    torchode is batch-first: the state is flattened to ``(batch, features)`` and reshaped inside f.
    """

    def make(case, func, device):
        import torchode

        term = torchode.ODETerm(lambda t, y: case.flatten(func(t, case.unflatten(y))))
        if rampde_precision is None:
            solver = torchode.AutoDiffAdjoint((step_method or _torchode_rk38())(term), torchode.FixedStepController())
        else:
            from torchode.interface import METHODS

            from rampde_torchode import RampdeAdjoint

            solver = RampdeAdjoint(METHODS["rampde_rk4"](term), torchode.FixedStepController(),
                                   precision=rampde_precision, params=tuple(func.parameters()))
        y0 = case.flatten(case.y0)
        # torchode accumulates t += dt; in float32, 50 steps of 0.02 end 4e-7 short of 1 and a 51st
        # sliver step follows (4 more NFEs).  Time in float64 (torchode keeps the data in float32)
        # and dt a hair (1e-12) long: the last step is clamped onto t_end, exactly N steps are taken.
        t_start = torch.zeros(y0.shape[0], dtype=torch.float64, device=device)
        t_end = torch.full_like(t_start, case.t1)
        dt0 = torch.full_like(t_start, case.step_size * (1 + 1e-12))

        def solve():
            # No t_eval: the solution at t_end only (torchode's fast path for e.g. CNFs).
            sol = solver.solve(torchode.InitialValueProblem(y0, t_start, t_end), dt0=dt0)
            return case.unflatten(sol.ys[:, -1])

        return solve

    return make


def _segments(k):
    from rampde_plugins import SegmentsSchedule

    return SegmentsSchedule(k)


@dataclass(frozen=True)
class Config:
    name: str
    make: Callable  # (case, counted func, device) -> solve(): one forward solve, returns the state at t1
    compute: str = "fp32"  # dtype the vector field runs in: "fp32", "bf16" or "fp16"
    stores_activations: bool = False  # autograd keeps every step's network activations (memory ~ N)


CONFIGS = [
    Config("torchdiffeq fp32", _torchdiffeq(), stores_activations=True),
    Config("torchdiffeq autocast bf16", _torchdiffeq(autocast="bf16"), "bf16", stores_activations=True),
    Config("torchdiffeq autocast fp16", _torchdiffeq(autocast="fp16"), "fp16", stores_activations=True),
    Config("torchdiffeq adjoint fp32", _torchdiffeq(adjoint=True)),
    Config("torchode fp32", _torchode(), stores_activations=True),
    Config("rampde_rk4 fp32", _torchdiffeq("rampde_rk4", precision="fp32")),
    Config("rampde_rk4 bf16", _torchdiffeq("rampde_rk4", precision="bf16"), "bf16"),
    Config("rampde_rk4 fp16", _torchdiffeq("rampde_rk4", precision="fp16"), "fp16"),
    Config("rampde_rk4 fp32 (torchode)", _torchode(rampde_precision="fp32")),
    Config("rampde_rk4 bf16 (torchode)", _torchode(rampde_precision="bf16"), "bf16"),
]


def _budget(fraction: float | None = None, checkpoints: int | None = None):
    """A memory budget for the case: ``fraction`` of what keeping every step's graph needs, or room
    for ``checkpoints`` states beside one step's graph -- from rampde's own measurement of one step
    (a solve with an unlimited budget reports it), so the budget means the same on every machine."""

    def budget(case, func, device, options):
        import rampde_plugins
        from torchdiffeq import odeint

        t = torch.tensor([0.0, case.t1], device=device)
        with rampde_plugins.collect_stats() as stats:
            _final(odeint(func, case.y0, t, method="rampde_rk4", options={**options, "memory_budget": 2**50}))
        rec = stats.last
        all_graphs = rec.predicted_bytes
        times = all_graphs - case.n_steps * rec.step_graph_bytes
        state = sum(y.numel() * 4 for y in (case.y0 if isinstance(case.y0, tuple) else (case.y0,)))
        least = times + 2 * state + rec.step_graph_bytes  # two checkpoints: the ladder's floor
        if fraction is not None:
            # (the floor matters only for the one-step warm-up solve, where 1/8 of one graph is
            # below any schedule)
            return max(int(fraction * all_graphs), least)
        return times + checkpoints * state + rec.step_graph_bytes

    return budget


# The schedules study (--study schedules): issue 11's memory/time trade-off, same harness.
SCHEDULE_CONFIGS = [
    Config("torchdiffeq fp32", _torchdiffeq(), stores_activations=True),
    Config("torchdiffeq autocast bf16", _torchdiffeq(autocast="bf16"), "bf16", stores_activations=True),
    Config("rampde fp32 steps", _torchdiffeq("rampde_rk4", precision="fp32")),
    Config("rampde fp32 graphs", _torchdiffeq("rampde_rk4", precision="fp32", checkpoint="graphs"), stores_activations=True),
    Config("rampde fp32 c=sqrt(N)", _torchdiffeq("rampde_rk4", precision="fp32", checkpoint="sqrt")),
    Config("rampde fp32 c=2", _torchdiffeq("rampde_rk4", precision="fp32", checkpoint=2)),
    Config("rampde bf16 steps", _torchdiffeq("rampde_rk4", precision="bf16"), "bf16"),
    Config("rampde bf16 graphs", _torchdiffeq("rampde_rk4", precision="bf16", checkpoint="graphs"), "bf16",
           stores_activations=True),
    Config("rampde bf16 c=sqrt(N)", _torchdiffeq("rampde_rk4", precision="bf16", checkpoint="sqrt"), "bf16"),
    # the same checkpoints with stage-by-stage VJPs: the backward holds one stage's graph, not one step's
    Config("rampde bf16 c=sqrt(N) stages", _torchdiffeq("rampde_rk4", precision="bf16", checkpoint="sqrt stages"), "bf16"),
]
SEGMENT_CONFIGS = [  # problem (b) only: the per-step overhead lever
    Config(f"rampde fp32 segments({k})", _torchdiffeq("rampde_rk4", precision="fp32", checkpoint=_segments(k)))
    for k in (4, 16, 64)
]
BUDGET_CONFIGS = [  # problem (a) only: memory_budget from "all graphs fit" down to two checkpoints
    Config(f"rampde fp32 budget {label}", _torchdiffeq("rampde_rk4", precision="fp32", budget=b))
    for label, b in (("all graphs", _budget(fraction=1.0)), ("1/2 graphs", _budget(fraction=0.5)),
                     ("1/8 graphs", _budget(fraction=0.125)), ("10 checkpoints", _budget(checkpoints=10)),
                     ("4 checkpoints", _budget(checkpoints=4)), ("2 checkpoints", _budget(checkpoints=2)))
]
SCHEDULE_PROBLEMS = {"a": None, "a400": 400, "b": None}  # a400: problem (a)'s field at 400 steps
# The interleaved phase times what the time targets compare (plus (b)'s segments), in one process;
# every ratio there is taken against both bases.
INTERLEAVED_BASES = (BASELINE, "torchdiffeq autocast bf16")
INTERLEAVED_CONFIGS = [*INTERLEAVED_BASES, "rampde fp32 steps", "rampde fp32 graphs", "rampde bf16 steps",
                       "rampde bf16 graphs", "rampde bf16 c=sqrt(N)"]
INTERLEAVED_ROUNDS = {"a": 5, "a400": 3, "b": 5}  # a400's iterations take seconds each: fewer rounds
CONFIG_BY_NAME = {c.name: c for c in CONFIGS + SCHEDULE_CONFIGS + SEGMENT_CONFIGS + BUDGET_CONFIGS}


# == The worker: one job in the current (fresh) process ==============================================
class Counted(torch.nn.Module):
    """The vector field behind a call counter: every library's NFEs are counted the same way."""

    def __init__(self, field: torch.nn.Module):
        super().__init__()
        self.field = field
        # A list, not an int attribute: `self.n += 1` would go through nn.Module.__setattr__, ~8 us
        # per call (7% of problem (b)'s iteration).
        self._calls = [0]

    @property
    def calls(self) -> int:
        return self._calls[0]

    def forward(self, t, y):
        self._calls[0] += 1
        return self.field(t, y)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat_grad(tensors):
    return torch.cat([g.reshape(-1) for g in tensors]).detach().cpu()


def reference_job(spec) -> dict:
    """fp64 gradient of the problem's loss with torchdiffeq's rk4 and direct backprop."""
    from torchdiffeq import odeint

    device = torch.device(spec["device"])
    case = build_case(spec["problem"], smoke=spec["smoke"], device=device, dtype=torch.float64, n_steps=spec.get("n_steps"))
    t = torch.tensor([0.0, case.t1], dtype=torch.float64, device=device)
    loss = case.loss(_final(odeint(case.func, case.y0, t, method="rk4", options={"step_size": case.step_size})))
    grad = _flat_grad(torch.autograd.grad(loss, list(case.func.parameters())))
    torch.save({"grad": grad, "loss": loss.item()}, spec["ref"])
    return {"status": "ok", "loss": loss.item(), "grad_norm": float(grad.norm())}


def _counted_case(spec, device, n_steps=None):
    """The spec's problem (at ``n_steps`` if given) and its vector field behind a call counter."""
    case = build_case(spec["problem"], smoke=spec["smoke"], device=device, n_steps=n_steps or spec.get("n_steps"))
    return case, Counted(case.func)


def _iteration(device, case, func, solve):
    """One training iteration: zero_grad + forward solve + loss + backward.

    Returns (seconds, loss, forward NFE, backward NFE)."""
    for p in func.parameters():
        p.grad = None
    _sync(device)
    start, calls = time.perf_counter(), func.calls
    loss = case.loss(solve())
    fwd = func.calls - calls
    loss.backward()
    _sync(device)
    return time.perf_counter() - start, loss.item(), fwd, func.calls - calls - fwd


def config_job(spec) -> dict:
    import rampde_plugins

    device = torch.device(spec["device"])
    config = CONFIG_BY_NAME[spec["config"]]
    case, func = _counted_case(spec, device)
    params = list(func.parameters())
    iteration = functools.partial(_iteration, device)

    # Memory: the first full iteration of the process, before anything has left freed pages behind.
    # A one-step solve of the same sizes goes first: one-time initialisation (kernels and their
    # caches, autograd's and OpenMP's threads, lazy imports) is not the configuration's memory -- on
    # problem (a) it adds ~18 MiB of RSS to whichever iteration comes first.  Its peak is reset below.
    warm, warm_func = _counted_case(spec, device, n_steps=1)
    iteration(warm, warm_func, config.make(warm, warm_func, device))
    del warm, warm_func
    main = case, func, config.make(case, func, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        release_free_memory()
        reset_peak_rss()
        before, ru_before = current_rss_bytes(), ru_maxrss_bytes()
    with rampde_plugins.collect_stats() as stats:
        first_s, loss, fwd, bwd = iteration(*main)
    if device.type == "cuda":
        memory = {"peak_growth_bytes": torch.cuda.max_memory_allocated(device) - before, "source": "cuda max_memory_allocated",
                  "before_bytes": before}
    else:
        peak, source = peak_rss_bytes()
        # ru_maxrss is kept for reference only: in a child process it starts at the parent's peak.
        memory = {"peak_growth_bytes": peak - before, "source": f"{source} - RSS before", "before_bytes": before,
                  "ru_maxrss_growth_bytes": ru_maxrss_bytes() - ru_before}
    grad = _flat_grad(p.grad if p.grad is not None else torch.zeros_like(p) for p in params)
    ref = torch.load(spec["ref"]) if spec.get("ref") else None

    # Time: more warm-up, then the repeats; iterations below min_time get more repeats (up to 10x)
    # so that the median of a millisecond-scale iteration is not one scheduler hiccup.
    warm_s = first_s
    for _ in range(spec["warmup"]):
        warm_s = iteration(*main)[0]
    n = max(spec["repeats"], min(10 * spec["repeats"], int(spec["min_time"] / max(warm_s, 1e-9))))
    times = sorted(1e3 * iteration(*main)[0] for _ in range(n))
    quart = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "status": "ok",
        "time_ms": {"median": statistics.median(times), "min": times[0], "max": times[-1], "q1": quart[0], "q3": quart[2],
                    "n": n, "first_iteration": 1e3 * first_s},
        "memory": memory,
        "grad_rel_err": rel_err(grad, ref["grad"]) if ref else None,
        "loss": loss,
        "ref_loss": ref["loss"] if ref else None,
        "fwd_nfe": fwd,
        "bwd_nfe": bwd,
        "rampde_stats": [r.as_dict() for r in stats.records] or None,
    }


def _failed(exc: Exception) -> dict:
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def _interleaved_setup(spec, device, case, func) -> dict:
    """Per configuration: its solve() after one warm-up iteration, or why it was not timed."""
    rows = {}
    for name in spec["configs"]:
        if name in spec["skip"]:
            rows[name] = skipped(spec["skip"][name])
            continue
        try:
            solve = CONFIG_BY_NAME[name].make(case, func, device)
            _, _, fwd, bwd = _iteration(device, case, func, solve)  # warm-up: first-call costs are not timed
            rows[name] = {"status": "ok", "solve": solve, "times": [], "fwd_nfe": fwd, "bwd_nfe": bwd}
        except Exception as exc:  # one failing configuration must not take the others down
            log.exception("interleaved %s: warm-up failed", name)
            rows[name] = _failed(exc)
    return rows


def interleaved_job(spec) -> dict:
    """Time ``spec["configs"]`` round by round in this one process; the median per configuration.

    Fresh processes are right for memory, but this VM's timings drift 20-30% between processes,
    enough to flip a 1.1x target; interleaved rounds put every configuration under the same
    conditions.  One case (and one counted field) serves all: the configurations differ only in
    how they solve, and the parameters' gradients are cleared every iteration."""
    device = torch.device(spec["device"])
    load_before = _loadavg()
    case, func = _counted_case(spec, device)
    rows = _interleaved_setup(spec, device, case, func)
    live = [name for name, r in rows.items() if r["status"] == "ok"]
    for k in range(spec["rounds"] if live else 0):
        # Rotate the order each round: no configuration always runs right after the same neighbour
        # (e.g. after one that freed a GiB of activations) or always first in the round.
        for name in live[k % len(live):] + live[:k % len(live)]:
            r = rows[name]
            if r["status"] != "ok":
                continue
            try:
                r["times"].append(1e3 * _iteration(device, case, func, r["solve"])[0])
            except Exception as exc:  # a late failure drops this configuration, not the round
                log.exception("interleaved %s: round %d failed", name, k + 1)
                rows[name] = _failed(exc)
    medians = {name: statistics.median(r["times"]) for name, r in rows.items() if r["status"] == "ok"}
    for name, r in rows.items():
        if r["status"] == "ok":
            r.pop("solve")
            r["median_ms"] = medians[name]
            r["vs"] = {base: medians[name] / medians[base] if base in medians else None for base in INTERLEAVED_BASES}
    return {"status": "ok", "rounds": spec["rounds"], "threads": torch.get_num_threads(), "n_steps": case.n_steps,
            "load_average": {"before": load_before, "after": _loadavg()}, "configs": rows}


def _job_label(spec) -> str:
    if spec["kind"] == "interleaved":
        return f"interleaved x{spec['rounds']}: " + ", ".join(spec["configs"])
    return spec.get("config") or "fp64 reference"


def worker_main(specs_json: str) -> None:
    """Run the jobs in order (one per process, except in --smoke) and write each result to its file."""
    jobs = {"reference": reference_job, "config": config_job, "interleaved": interleaved_job}
    for spec in json.loads(specs_json):
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        try:
            result = jobs[spec["kind"]](spec)
        except Exception as exc:  # one failing configuration must not take the others down
            log.exception("job %s failed", _job_label(spec))
            result = _failed(exc)
        Path(spec["out"]).write_text(json.dumps(result))


# == The orchestrator =================================================================================
class Runner:
    """Runs jobs in worker subprocesses: one fresh process per job; --smoke runs a whole batch in one
    process (it checks the plumbing, not the figures, and process start-up dominates tiny sizes)."""

    def __init__(self, tmp: Path, args, device: torch.device):
        self.tmp, self.args, self.device, self.count = tmp, args, device, 0

    def spec(self, problem, kind="config", config=None, n_steps=None, ref=None):
        self.count += 1
        # (e): the memory iteration is the warm-up and one timed iteration per N (they are long and
        # steady at large N), which keeps the study at a few minutes.
        scaling = problem == "e"
        return {"kind": kind, "problem": problem, "config": config, "n_steps": n_steps, "smoke": self.args.smoke,
                "threads": self.args.threads, "device": str(self.device),
                "repeats": self.args.scaling_repeats if scaling else self.args.repeats,
                "warmup": 0 if scaling else 1, "min_time": 0.0 if scaling else self.args.min_time,
                "ref": str(ref) if ref else None, "out": str(self.tmp / f"job{self.count}.json")}

    def run(self, specs: list[dict]) -> list[dict]:
        groups = [specs] if self.args.smoke else [[s] for s in specs]
        for group in groups:
            if not group:
                continue
            for s in group:
                log.info("(%s)%s %s", s["problem"], f" N={s['n_steps']}" if s["n_steps"] else "", _job_label(s))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(group)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.timeout)
                err, rc = proc.stderr.strip(), proc.returncode
            except subprocess.TimeoutExpired:
                err, rc = f"timed out after {self.args.timeout} s", -1
            if err:
                (log.warning if rc == 0 else log.error)("worker stderr:\n%s", err[-4000:])
            for s in group:
                if not Path(s["out"]).exists():
                    Path(s["out"]).write_text(json.dumps({"status": "failed", "reason": f"worker exit {rc}: {err[-300:]}"}))
                r = json.loads(Path(s["out"]).read_text())
                if r["status"] != "ok":
                    log.warning("    -> %s: %s", r["status"], r["reason"])
                elif "time_ms" in r:
                    log.info("    -> %.1f ms/iter, %.1f MiB", _ms(r), _mem(r) / 2**20)
                elif s["kind"] == "interleaved":
                    log.info("    -> %s", ", ".join(f"{n} {c['median_ms']:.1f}" if c["status"] == "ok" else f"{n} {c['status']}"
                                                    for n, c in r["configs"].items()))
        return [json.loads(Path(s["out"]).read_text()) for s in specs]


def matmul_probe(device: torch.device) -> dict:
    """ms of a 1024x512 @ 512x64 matmul per dtype (CPU: fp16 is emulated, ~100x slower than bf16).

    On a CPU with one thread: the ratio between the dtypes is the point, and a single thread is not
    held up at OpenMP barriers when other processes share the cores.
    """
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    a, b = torch.randn(1024, 512, device=device), torch.randn(512, 64, device=device)
    out = {"threads": torch.get_num_threads() if device.type == "cpu" else None}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        times = []
        for _ in range(3 if (dtype == torch.float16 and device.type == "cpu") else 20):
            _sync(device)
            start = time.perf_counter()
            x @ y
            _sync(device)
            times.append(1e3 * (time.perf_counter() - start))
        out[name] = min(times)  # the minimum: robust to other processes sharing the CPU
    torch.set_num_threads(threads)
    return out


def _loadavg():
    """1/5/15-minute load averages: other processes on the machine make the timings provisional."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def skip_reason(config: Config, problem: str, device: torch.device, probe: dict) -> str | None:
    if config.compute == "fp16" and device.type == "cpu" and not (problem in PROBLEMS and PROBLEMS[problem].cpu_fp16):
        return (f"fp16 on this CPU is emulated: 1024x512 @ 512x64 (1 thread) takes {probe['fp16']:.1f} ms in fp16 vs "
                f"{probe['bf16']:.2f} ms in bf16 ({probe['fp16'] / probe['bf16']:.0f}x); on the CPU fp16 runs "
                "only on the small problems " + ", ".join(f"({k})" for k, p in PROBLEMS.items() if p.cpu_fp16))
    small = problem in PROBLEMS and PROBLEMS[problem].cpu_fp16
    if config.compute == "bf16" and device.type == "cpu" and probe["bf16"] > 2 * probe["fp32"] and not small:
        return (f"bf16 on this CPU is emulated: 1024x512 @ 512x64 (1 thread) takes {probe['bf16']:.1f} ms in bf16 vs "
                f"{probe['fp32']:.2f} ms in fp32 ({probe['bf16'] / probe['fp32']:.0f}x); a bf16 time here says nothing "
                "about bf16 hardware")
    if config.compute == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def bench_problems(keys: list[str], runner: Runner, probe: dict) -> dict:
    """Problems (a)-(d): per problem one fp64 reference job, then every configuration."""
    jobs, tables = [], {}
    for key in keys:
        ref = runner.tmp / f"ref-{key}.pt"
        jobs.append(runner.spec(key, kind="reference", ref=ref))
        tables[key] = {}
        for c in CONFIGS:
            reason = skip_reason(c, key, runner.device, probe)
            if reason:
                tables[key][c.name] = skipped(reason)
            else:
                jobs.append(runner.spec(key, config=c.name, ref=ref))
    out = {}
    for spec, res in zip(jobs, runner.run(jobs)):
        if spec["kind"] == "reference":
            case = build_case(spec["problem"], smoke=runner.args.smoke, device="cpu")
            out[spec["problem"]] = {"title": PROBLEMS[spec["problem"]].title, "n_steps": case.n_steps,
                                    "step_size": case.step_size, "reference": res}
        else:
            tables[spec["problem"]][spec["config"]] = res
    for key in keys:
        out[key]["configs"] = {c.name: tables[key][c.name] for c in CONFIGS}
    return out


def _estimate(points: dict, n: int) -> float | None:
    """Memory at n steps, linear through the two largest measured step counts."""
    ok = sorted((k, r["memory"]["peak_growth_bytes"]) for k, r in points.items() if r["status"] == "ok")
    if len(ok) < 2:
        return None
    (n1, m1), (n2, m2) = ok[-2:]
    return m2 + (m2 - m1) / (n2 - n1) * (n - n2)


def bench_scaling(runner: Runner, probe: dict) -> dict:
    steps = SCALING_STEPS_SMOKE if runner.args.smoke else SCALING_STEPS
    budget = runner.args.mem_budget_gib * 2**30
    table = {c.name: {} for c in CONFIGS}
    log.info("scaling study (e): problem (a) at N = %s", ", ".join(map(str, steps)))
    # The two smallest N need no estimate and run together; every larger N waits for the ones before.
    for batch in [steps[:2], *([n] for n in steps[2:])]:
        jobs = []
        for n in batch:
            for c in CONFIGS:
                reason = skip_reason(c, "e", runner.device, probe)
                est = _estimate(table[c.name], n) if c.stores_activations else None
                if reason is None and est is not None and est > budget:
                    reason = f"estimated {est / 2**30:.1f} GiB > budget {runner.args.mem_budget_gib:g} GiB (linear in N)"
                if reason:
                    table[c.name][n] = skipped(reason)
                else:
                    jobs.append(runner.spec("e", config=c.name, n_steps=n))
        for spec, res in zip(jobs, runner.run(jobs)):
            table[spec["config"]][spec["n_steps"]] = res
    return {"title": "problem (a) vs the number of steps N", "steps": list(steps), "mem_budget_gib": runner.args.mem_budget_gib,
            "configs": {name: {str(n): r for n, r in rows.items()} for name, rows in table.items()}}


def binomial_work(n_steps: int, c: int) -> int:
    """Steps run by binomial checkpointing (revolve: t(l, c) = r l - C(c + r, r - 1) advances plus
    l taped steps, r the least with C(c + r, c) >= l)."""
    r = 0
    while math.comb(c + r, c) < n_steps:
        r += 1
    return (r * n_steps - math.comb(c + r, r - 1) if r else 0) + n_steps


def _schedule_skip(c: Config, problem: str, n: int | None, device: torch.device, probe: dict) -> str | None:
    """Why the schedules study does not time ``c`` on ``problem`` (at ``n`` steps), or None."""
    reason = skip_reason(c, problem, device, probe)
    if reason is None and c.name.endswith("c=2") and (n or 0) > 100:
        # revolve's t(400, 2) = 7146 recomputed steps: ~9x the work of "steps", minutes an iteration
        reason = f"c=2 at N={n}: {binomial_work(n, 2) - n} recomputed steps ({binomial_work(n, 2) / (2 * n):.1f}x the steps of 'steps'); not timed"
    return reason


def _interleaved_rounds(args, key: str) -> int:
    """Rounds of the interleaved phase for a study problem (0: no interleaved phase)."""
    if args.interleaved_rounds is not None:
        return args.interleaved_rounds
    return 1 if args.smoke else INTERLEAVED_ROUNDS[key]


def interleaved_spec(runner: Runner, key: str, problem: str, n: int | None, probe: dict) -> dict | None:
    """The interleaved phase's one worker job for a study problem, or None when it has 0 rounds."""
    rounds = _interleaved_rounds(runner.args, key)
    if rounds <= 0:
        return None
    names = INTERLEAVED_CONFIGS + ([c.name for c in SEGMENT_CONFIGS] if key == "b" else [])
    skip = {name: r for name in names if (r := _schedule_skip(CONFIG_BY_NAME[name], problem, n, runner.device, probe))}
    return runner.spec(problem, kind="interleaved", n_steps=n) | {"study_key": key, "configs": names, "rounds": rounds,
                                                                  "skip": skip}


def bench_schedules(runner: Runner, probe: dict) -> dict:
    """The schedules study: problem (a) at 50 and 400 steps and (b), each schedule beside its peers,
    each in a fresh process; then per problem the interleaved phase (one process, round by round)."""
    smoke = runner.args.smoke
    jobs, tables, out, interleaved = [], {}, {}, []
    for key, n in SCHEDULE_PROBLEMS.items():
        problem = "e" if n else key
        n = (8 if smoke else n) if n else None
        configs = SCHEDULE_CONFIGS + (SEGMENT_CONFIGS if key == "b" else []) + (BUDGET_CONFIGS if key == "a" else [])
        ref = runner.tmp / f"ref-s-{key}.pt"
        jobs.append(runner.spec(problem, kind="reference", ref=ref, n_steps=n) | {"study_key": key})
        tables[key] = {}
        for c in configs:
            reason = _schedule_skip(c, problem, n, runner.device, probe)
            if reason:
                tables[key][c.name] = skipped(reason)
            else:
                jobs.append(runner.spec(problem, config=c.name, ref=ref, n_steps=n) | {"study_key": key})
        # After all the fresh-process jobs: --smoke runs the whole batch in one process, and a
        # memory figure measured after an interleaved job would start from its freed pages.
        interleaved.append(interleaved_spec(runner, key, problem, n, probe))
        case = build_case(problem, smoke=smoke, device="cpu", n_steps=n)
        title = PROBLEMS["a" if problem == "e" else key].title
        if n:
            title = title.replace("50 steps", f"{case.n_steps} steps")
        out[key] = {"title": title, "n_steps": case.n_steps, "step_size": case.step_size,
                    "order": [c.name for c in configs]}
    jobs += [spec for spec in interleaved if spec]
    for spec, res in zip(jobs, runner.run(jobs)):
        if spec["kind"] == "reference":
            out[spec["study_key"]]["reference"] = res
        elif spec["kind"] == "interleaved":
            out[spec["study_key"]]["interleaved"] = res
        else:
            tables[spec["study_key"]][spec["config"]] = res
    for key, p in out.items():
        p["configs"] = {name: tables[key][name] for name in p.pop("order")}
    return out


def _schedule_cells(r) -> str:
    """Schedule, checkpoints, recomputed steps and (under a budget) predicted/measured peak, from rampde's stats."""
    recs = r.get("rampde_stats") or []
    if not recs:
        return "| - | - | - |"
    s = recs[0]
    name = s["schedule"] + (f"({s['checkpoints']})" if s["schedule"] == "binomial" else
                            f"({s['segment_steps']})" if s.get("segment_steps") else "")
    if s.get("stage_vjp"):
        name += ", stages"
    budget = "-"
    if s.get("memory_budget"):
        budget = (f"{s['memory_budget'] / 2**20:.2f} / {s['predicted_bytes'] / 2**20:.2f} / "
                  f"{s['peak_bytes'] / 2**20:.2f}")
    return f"| {name} | {s['recomputed_steps']} | {budget} |"


def _rounds(n: int) -> str:
    return f"{n} round" + ("" if n == 1 else "s")


def _load_pair(load: dict) -> str:
    """1-minute load average before/after, as text."""
    a, b = load.get("before"), load.get("after")
    return f"{a[0]:.2f} / {b[0]:.2f}" if a and b else "n/a"


def _interleaved_lines(key: str, iv: dict | None) -> list[str]:
    """The interleaved phase's small table for one study problem (nothing when the phase was off)."""
    if not iv:
        return []
    if iv["status"] != "ok":
        return [f"### ({key}) interleaved in one process: {iv['status']}: {iv['reason']}", ""]
    lines = [f"### ({key}) interleaved in one process (median of {_rounds(iv['rounds'])})", "",
             f"One worker process, one warm-up iteration per configuration, then the configurations round by round "
             f"(order rotated each round); {iv['threads']} threads, load average (1 min) before/after "
             f"{_load_pair(iv['load_average'])}. The time targets use these medians.", "",
             "| config | ms/iter median [min-max] | vs " + " | vs ".join(INTERLEAVED_BASES) + " |",
             "|---|---|" + "---|" * len(INTERLEAVED_BASES)]
    for name, r in iv["configs"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r['reason']} |" + " |" * len(INTERLEAVED_BASES))
            continue
        ratios = [f"{r['vs'][b]:.2f}x" if r["vs"].get(b) is not None else "-" for b in INTERLEAVED_BASES]
        lines.append(f"| {name} | {r['median_ms']:.1f} [{min(r['times']):.1f}-{max(r['times']):.1f}] | "
                     + " | ".join(ratios) + " |")
    return lines + [""]


def _target_line(t: dict) -> str:
    """One target as a markdown bullet; a time target names where its value comes from."""
    if t["met"] is None:
        return f"- ({t['problem']}) {t['target']}: not measured" + (f" ({t['why']})" if t.get("why") else "")
    source = ""
    if t.get("source"):
        fresh = t.get("fresh_value")
        also = f"; fresh processes: {fresh:.3g}" if fresh is not None and t["source"] != "fresh processes" else ""
        source = f" [{t['source']}{also}]"
    return (f"- ({t['problem']}) {t['target']}: measured {t['value']:.3g}{source} (bound {t['bound']:.3g}) -> "
            f"{'met' if t['met'] else 'MISSED'}")


def render_schedules(results: dict) -> str:
    lines = [*_header(results, "rampde checkpoint schedules: memory vs time"),
             "Same harness and measurements as the benchmark suite (fresh process per row; peak memory growth of the "
             f"first full-size iteration: {results['memory_measure']}). Schedule/recomputed: from rampde's SolveStats; "
             "budget columns: memory_budget / predicted peak / measured peak of what the schedule held, MiB."
             + (" Timings drift between processes on a shared machine: after each table, the configurations the time "
                "targets compare are timed again interleaved in one process, and the time targets use those medians."
                if any(p.get("interleaved") for p in results["schedules"].values()) else ""),
             "matmul 1024x512 @ 512x64 (fastest of repeats): " + ", ".join(
                 f"{k} {v:.2f} ms" for k, v in results["matmul_probe_ms"].items() if k != "threads"), ""]
    header = ["| config | ms/iter median [min-max] | time vs torchdiffeq fp32 | peak mem MiB | mem vs torchdiffeq fp32 "
              "| grad rel err | fwd/bwd NFE | schedule | recomputed | budget / predicted / peak MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, p in results["schedules"].items():
        lines += [f"## ({key}) {p['title']}", "", f"{p['n_steps']} RK4 steps, h = {p['step_size']:.4g}.", "", *header]
        base = p["configs"].get(BASELINE)
        for name, r in p["configs"].items():
            row = _fmt_row(name, r, base)
            lines.append(row + (_schedule_cells(r)[1:] if r["status"] == "ok" else " | | |"))
        lines += ["", *_interleaved_lines(key, p.get("interleaved"))]
    lines += ["## Targets (reported, not asserted)", "",
              "Time targets: [interleaved, median of R rounds] where both configurations were timed in the interleaved "
              "phase (the fresh-process ratio beside it), else [fresh processes]. Memory and error targets: fresh "
              "processes.", ""]
    lines += [_target_line(t) for t in results["targets"]]
    return "\n".join(lines) + "\n"


def schedule_targets(results: dict) -> list[dict]:
    """Issue 11's targets on the schedules study (reported, never asserted)."""
    targets = []
    tables = results["schedules"]

    def get(problem, name):
        r = tables.get(problem, {}).get("configs", {}).get(name)
        return r if r and r["status"] == "ok" else None

    def interleaved(problem, name):
        """(median ms, rounds) of ``name`` in the problem's interleaved phase, or None."""
        iv = tables.get(problem, {}).get("interleaved") or {}
        r = iv.get("configs", {}).get(name) if iv.get("status") == "ok" else None
        return (r["median_ms"], iv["rounds"]) if r and r["status"] == "ok" else None

    def not_measured(problem, text, names):
        missing = [tables.get(problem, {}).get("configs", {}).get(n) for n in names if get(problem, n) is None]
        why = "; ".join(sorted({m["reason"][:90] for m in missing if m}))
        targets.append({"problem": problem, "target": text, "value": None, "met": None, "why": why})

    def add(problem, text, value_fn, names, bound, upper=True):
        rs = [get(problem, n) for n in names]
        if any(r is None for r in rs):
            return not_measured(problem, text, names)
        value = value_fn(*rs)
        targets.append({"problem": problem, "target": text, "value": value, "bound": bound,
                        "met": bool(value <= bound if upper else value >= bound)})

    def add_time(problem, text, num, den, bound):
        """A time ratio num/den <= bound: from the interleaved medians when both were timed there (one
        process, same conditions), else from the fresh processes; the fresh-process ratio is kept beside."""
        a, b = get(problem, num), get(problem, den)
        fresh = _ms(a) / _ms(b) if a and b else None
        ia, ib = interleaved(problem, num), interleaved(problem, den)
        if ia and ib:
            value, source = ia[0] / ib[0], f"interleaved, median of {_rounds(ia[1])}"
        elif fresh is not None:
            value, source = fresh, "fresh processes"
        else:
            return not_measured(problem, text, [num, den])
        targets.append({"problem": problem, "target": text, "value": value, "bound": bound, "met": bool(value <= bound),
                        "source": source, "fresh_value": fresh})

    for p in ("a", "a400"):
        add_time(p, '"graphs" bf16 time <= 0.6x torchdiffeq fp32', "rampde bf16 graphs", BASELINE, 0.6)
        add_time(p, '"graphs" bf16 time <= 1.1x torchdiffeq autocast bf16', "rampde bf16 graphs",
                 "torchdiffeq autocast bf16", 1.1)
        add(p, '"graphs" bf16 gradient error <= 5e-3', lambda a: a["grad_rel_err"], ["rampde bf16 graphs"], 5e-3)
        add(p, "c = ceil(sqrt(N)) bf16 memory growth <= 1/100 of torchdiffeq fp32", lambda a, b: _mem(a) / _mem(b),
            ["rampde bf16 c=sqrt(N)", BASELINE], 0.01)
        add(p, "c = ceil(sqrt(N)) bf16, stage VJPs: memory growth <= 1/100 of torchdiffeq fp32",
            lambda a, b: _mem(a) / _mem(b), ["rampde bf16 c=sqrt(N) stages", BASELINE], 0.01)
        add_time(p, '(fp32 stand-in) "graphs" fp32 time vs torchdiffeq fp32', "rampde fp32 graphs", BASELINE, 1.1)
        add(p, "(fp32 stand-in) c = ceil(sqrt(N)) fp32 memory growth <= 1/100 of torchdiffeq fp32",
            lambda a, b: _mem(a) / _mem(b), ["rampde fp32 c=sqrt(N)", BASELINE], 0.01)
    seg = [c.name for c in SEGMENT_CONFIGS] + ["rampde fp32 steps", "rampde fp32 graphs"]
    # The fastest schedule by the same measure as the ratio: interleaved medians when there are any.
    timed = {n: interleaved("b", n)[0] for n in seg if interleaved("b", n)} or {n: _ms(get("b", n)) for n in seg if get("b", n)}
    if timed:
        fastest = min(timed, key=timed.get)
        add_time("b", f"best schedule ({fastest}) fp32 time <= 1.1x torchdiffeq fp32", fastest, BASELINE, 1.1)
    add_time("b", 'default schedule ("steps") fp32 time <= 1.3x torchdiffeq fp32', "rampde fp32 steps", BASELINE, 1.3)
    ladder = [get("a", c.name) for c in BUDGET_CONFIGS]
    if all(ladder):
        times = [_ms(r) for r in ladder]
        # "decreases monotonically with the budget": allow the timing noise of this machine (10%)
        targets.append({"problem": "a", "target": "memory_budget: time never falls as the budget shrinks "
                        "(min over steps of t[smaller]/t[larger], >= 0.9 allows 10% noise)",
                        "value": min(b / a for a, b in zip(times, times[1:])), "bound": 0.9,
                        "met": bool(min(b / a for a, b in zip(times, times[1:])) >= 0.9),
                        "source": "fresh processes"})  # the budget ladder is not in the interleaved phase
        over = [r["rampde_stats"][0] for r in ladder]
        targets.append({"problem": "a", "target": "memory_budget: measured peak of what the schedule held / budget (max)",
                        "value": max(s["peak_bytes"] / s["memory_budget"] for s in over), "bound": 1.0,
                        "met": all(s["peak_bytes"] <= s["memory_budget"] for s in over)})
    return targets


# == Reporting ========================================================================================
def _ms(r):
    return r["time_ms"]["median"]


def _mem(r):
    return r["memory"]["peak_growth_bytes"]


def compute_targets(results: dict) -> list[dict]:
    """The project's targets, evaluated on the measured numbers (reported, never asserted)."""
    targets = []

    def add(problem, text, num, den, bound, upper=True):
        cfgs = results["problems"].get(problem, {}).get("configs", {})
        r_num, r_den = cfgs.get(num[0]), cfgs.get(den[0]) if den else None
        if not r_num or r_num["status"] != "ok" or (den and (not r_den or r_den["status"] != "ok")):
            targets.append({"problem": problem, "target": text, "value": None, "met": None})
            return
        value = num[1](r_num) / den[1](r_den) if den else num[1](r_num)
        targets.append({"problem": problem, "target": text, "value": value, "bound": bound,
                        "met": bool(value <= bound if upper else value >= bound)})

    ours, td = "rampde_rk4 bf16", BASELINE
    add("a", "rampde bf16 time <= 0.6x torchdiffeq fp32", (ours, _ms), (td, _ms), 0.6)
    add("a", "rampde bf16 time <= 1.2x torchdiffeq autocast bf16", (ours, _ms), ("torchdiffeq autocast bf16", _ms), 1.2)
    add("a", "rampde bf16 memory growth <= 1/50 of torchdiffeq fp32", (ours, _mem), (td, _mem), 1 / 50)
    add("a", "rampde bf16 gradient error <= 5e-3", (ours, lambda r: r["grad_rel_err"]), None, 5e-3)
    add("b", "rampde fp32 time <= 1.3x torchdiffeq fp32", ("rampde_rk4 fp32", _ms), (td, _ms), 1.3)
    add("b", "rampde fp32 >= 5x faster than torchdiffeq adjoint fp32 (adjoint time / ours)",
        ("torchdiffeq adjoint fp32", _ms), ("rampde_rk4 fp32", _ms), 5.0, upper=False)
    return targets


def _fmt_row(name, r, base):
    if r["status"] != "ok":
        return f"| {name} | {r['status']}: {r['reason']} | | | | | |"
    t = r["time_ms"]
    ok_base = base and base["status"] == "ok"
    ratio = f"{_ms(r) / _ms(base):.2f}x" if ok_base else "-"
    mem_ratio = f"{_mem(r) / _mem(base):.3f}x" if ok_base and _mem(base) > 0 else "-"
    err = "-" if r["grad_rel_err"] is None else f"{r['grad_rel_err']:.1e}"
    return (f"| {name} | {t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}] | {ratio} | {_mem(r) / 2**20:.1f} | {mem_ratio} "
            f"| {err} | {r['fwd_nfe']}/{r['bwd_nfe']} |")


def _header(results: dict, title: str) -> list[str]:
    """Title, versions, machine and load: the first lines of every report."""
    m = results["machine"]
    load = results["load_average"]
    smoke = ", SMOKE sizes: checks the plumbing, the figures mean nothing" if results["settings"]["smoke"] else ""
    return [f"# {title} ({m['device']}{smoke})", "",
            f"torch {m['torch']}, torchdiffeq {m['torchdiffeq']}, torchode {m['torchode']}, rampde-plugins "
            f"{m['rampde_plugins']}; {m['processor']}, {m['threads']} threads; python {m['python']}.",
            f"Load average (1 min) at start/end: {load['start'][0]:.2f} / {load['end'][0]:.2f} "
            "(other processes on the machine make the timings provisional)." if load.get("start") and load.get("end") else ""]


def render_markdown(results: dict) -> str:
    lines = [*_header(results, "rampde benchmark suite"),
             "Time: forward + backward of one training iteration, median [min-max] over the repeats. Memory: peak "
             "growth of the first full-size iteration in a fresh process, after a one-step warm-up "
             f"({results['memory_measure']}). Gradient error: relative "
             "L2 error of all parameter gradients vs torchdiffeq rk4 in fp64. NFE: calls of the vector field, forward/backward.",
             "matmul 1024x512 @ 512x64 (fastest of repeats" + (", 1 thread" if results["matmul_probe_ms"]["threads"] else "")
             + "): " + ", ".join(f"{k} {v:.2f} ms" for k, v in results["matmul_probe_ms"].items() if k != "threads"), ""]
    header = ["| config | ms/iter median [min-max] | time vs torchdiffeq fp32 | peak mem MiB | mem vs torchdiffeq fp32 "
              "| grad rel err | fwd/bwd NFE |", "|---|---|---|---|---|---|---|"]
    for key, p in results["problems"].items():
        lines += [f"## ({key}) {p['title']}", "", f"{p['n_steps']} RK4 steps, h = {p['step_size']:.4g}.", "", *header]
        base = p["configs"].get(BASELINE)
        lines += [_fmt_row(name, r, base) for name, r in p["configs"].items()]
        lines.append("")
    s = results.get("scaling")
    if s:
        lines += [f"## (e) {s['title']}", "", f"Memory guard: configurations that store activations are skipped when "
                  f"their linear estimate exceeds {s['mem_budget_gib']:g} GiB.", ""]
        for title, fn, fmt in (("ms/iter (median)", _ms, "{:.0f}"), ("peak memory growth, MiB", lambda r: _mem(r) / 2**20, "{:.1f}")):
            lines += [f"{title}:", "", "| config | " + " | ".join(f"N={n}" for n in s["steps"]) + " |",
                      "|---|" + "---|" * len(s["steps"])]
            for name, rows in s["configs"].items():
                cells = [fmt.format(fn(r)) if r["status"] == "ok" else r["status"] for r in (rows[str(n)] for n in s["steps"])]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        reasons = sorted({f"{name}: {r['reason']}" for name, rows in s["configs"].items() for r in rows.values()
                          if r["status"] != "ok" and "estimated" in r["reason"]})
        lines += [f"- {r}" for r in reasons] + ([""] if reasons else [])
    adaptive = results.get("adaptive_steps")
    if adaptive:
        tols = adaptive["rtol=atol"]
        lines += [f"## Adaptive steps: {adaptive['method']} on problem ({adaptive['problem']}), accepted/rejected steps by policy",
                  "", "| policy | " + " | ".join(f"rtol=atol={x}" for x in tols) + " |", "|---|" + "---|" * len(tols)]
        for policy, row in adaptive["steps"].items():
            cells = [f"{row[x]['accepted']}/{row[x]['rejected']}" if "accepted" in row[x] else "error" for x in tols]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets (reported, not asserted)", ""]
    for t in results["targets"]:
        if t["met"] is None:
            lines.append(f"- ({t['problem']}) {t['target']}: not measured")
        else:
            lines.append(f"- ({t['problem']}) {t['target']}: measured {t['value']:.3g} (bound {t['bound']:.3g}) -> "
                         f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


def plot_scaling(path: Path, scaling: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, rows in scaling["configs"].items():
        pts = [(int(n), r) for n, r in rows.items() if r["status"] == "ok"]
        if not pts:
            continue
        ns = [n for n, _ in pts]
        style = "-o" if name.startswith("rampde") else "--s"
        axes[0].plot(ns, [_ms(r) for _, r in pts], style, ms=4, label=name)
        axes[1].plot(ns, [max(_mem(r), 1) / 2**20 for _, r in pts], style, ms=4, label=name)
    for ax, ylabel in zip(axes, ("ms per iteration (forward + backward)", "peak memory growth of one iteration, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(scaling["steps"], [str(n) for n in scaling["steps"]])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("RK4 steps N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(scaling["title"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# == CLI ==============================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--problems", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--study", choices=("suite", "schedules"), default="suite",
                   help="suite: the configurations side by side; schedules: issue 11's memory/time trade-off "
                        "(problem (a) at 50 and 400 steps and (b), every checkpoint schedule and memory budgets)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per configuration (at least)")
    p.add_argument("--scaling-repeats", type=int, default=1, help="(e): timed iterations per configuration and N")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="fast configurations get more repeats (up to 10x) to fill this many seconds")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--mem-budget-gib", type=float, default=8.0, help="(e): skip a configuration estimated above this")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads: N, or 'auto' (the cores the load leaves free; --smoke: 1)")
    p.add_argument("--interleaved-rounds", type=int, default=None,
                   help="schedules study: rounds of the interleaved timing phase (one process per problem, "
                        "configurations round by round; its medians give the time targets); default "
                        + ", ".join(f"{v} for ({k})" for k, v in INTERLEAVED_ROUNDS.items()) + ", 1 with --smoke; 0: off")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every problem and configuration once (tests)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON list of jobs for a worker process
    args = p.parse_args(argv)
    if args.smoke:
        # One thread: the smoke run shares the CPU with the test suite's other workers, and
        # oversubscribed OpenMP threads spin on each other (tiny ops then take milliseconds).
        args.repeats, args.scaling_repeats, args.min_time = 1, 1, 0.0
        args.threads = 1 if args.threads == "auto" else args.threads
    return args


def adaptive_step_counts(tols=(1e-3, 1e-4, 1e-5, 1e-6, 1e-7)) -> dict:
    """Accepted/rejected dopri5 steps per policy on problem (b)'s field (issue: adaptive steps).

    A velocity rounded to bf16/fp16 carries noise near that dtype's unit roundoff, and so does the
    error estimate: below a policy's tolerance floor the controller needs more steps than fp32.
    Run in-process (step counts, not time); fp16 is affordable here because the field is tiny.
    """
    from torchdiffeq import odeint

    import rampde_plugins

    case = build_case("b", smoke=False, device=torch.device("cpu"))
    t = torch.tensor([0.0, case.t1])
    rows = {}
    for policy in ("fp32", "bf16", "fp16"):
        row = {}
        for tol in tols:
            with torch.no_grad(), rampde_plugins.collect_stats() as stats:
                try:
                    odeint(case.func, case.y0, t, method="rampde_dopri5", rtol=tol, atol=tol,
                           options={"precision": policy, "max_num_steps": 20000})
                    rec = stats.last
                    row[f"{tol:g}"] = {"accepted": rec.n_steps, "rejected": rec.rejected_steps}
                except RuntimeError as exc:
                    row[f"{tol:g}"] = {"error": str(exc)[:120]}
        rows[policy] = row
    return {"problem": "b", "method": "rampde_dopri5", "rtol=atol": [f"{x:g}" for x in tols], "steps": rows}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if args.worker is not None:
        worker_main(args.worker)
        return None
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu" or args.threads != "auto":
        # (this program's setting; the workers get the same count through their job specs)
        args.threads, why = choose_threads(args.threads)
        log.info("threads: %s", why)
        torch.set_num_threads(args.threads)
    else:
        args.threads = None
    keys = [k.strip() for k in args.problems.split(",") if k.strip()]
    unknown = set(keys) - set(PROBLEMS) - {"e"}
    if unknown:
        raise SystemExit(f"unknown problem(s) {sorted(unknown)}; choose from a,b,c,d,e")
    probe = matmul_probe(device)
    log.info("matmul probe (ms): %s", probe)
    results = {"machine": machine_info(device), "settings": {k: v for k, v in vars(args).items() if k != "worker"},
               "memory_measure": "CUDA max_memory_allocated" if device.type == "cuda" else
               "CPU peak RSS (VmHWM after a reset) minus the RSS before",
               "matmul_probe_ms": probe, "load_average": {"start": _loadavg()}, "problems": {}}
    start = time.perf_counter()
    if args.study == "schedules":
        with tempfile.TemporaryDirectory(prefix="rampde-bench-") as tmp:
            results["schedules"] = bench_schedules(Runner(Path(tmp), args, device), probe)
        return _finish(results, start, Path(args.out), f"schedules-{device.type}", schedule_targets, render_schedules)
    with tempfile.TemporaryDirectory(prefix="rampde-bench-") as tmp:
        runner = Runner(Path(tmp), args, device)
        results["problems"] = bench_problems([k for k in PROBLEMS if k in keys], runner, probe)
        if "e" in keys:
            results["scaling"] = bench_scaling(runner, probe)
    if not args.smoke:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tolerance-floor warning is what this table shows
            results["adaptive_steps"] = adaptive_step_counts()
    if "scaling" in results:
        plot_scaling(Path(args.out) / f"scaling-{device.type}.png", results["scaling"])
    return _finish(results, start, Path(args.out), f"results-{device.type}", compute_targets, render_markdown)


def _finish(results: dict, start: float, out: Path, stem: str, targets, render) -> dict:
    """Targets, the end's load average, then ``<stem>.json`` and ``<stem>.md`` (also printed)."""
    results["wall_s"] = time.perf_counter() - start
    results["load_average"]["end"] = _loadavg()
    results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    md = render(results)
    (out / f"{stem}.md").write_text(md)
    print(md)
    log.info("wrote %s (%.0f s)", out, results["wall_s"])
    return results


if __name__ == "__main__":
    main()
