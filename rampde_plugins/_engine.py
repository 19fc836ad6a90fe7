"""Explicit Runge--Kutta on a time grid with an exact discrete adjoint (host-library independent).

Forward (no autograd graph):
    ``k_i = f(t_n + c_i h, y_n + h * sum_j a_ij k_j)`` with ``f`` evaluated under the policy's autocast
    dtype, stage inputs and the increment ``h * sum_i b_i k_i`` formed in the state dtype, and
    ``y_n`` stored in the storage dtype -- one state per step is all the backward keeps.

Backward (discretise-then-optimise):
    for n = N-1 ... 0, rebuild step n from the stored ``y_n`` with a graph and take one VJP of
    ``[y_{n+1}, outputs inside the step]`` against ``[a_{n+1}, dL/d outputs]``.  That gives the adjoint
    ``a_n`` and the step's share of the parameter and time gradients, which are summed in the
    accumulation dtype.  The step's graph is dropped before the next one is built, so memory is the
    stored states plus one step's activations.

The gradient is that of the computation the forward actually ran (up to the rounding of the stored
states to the storage dtype), not of the continuous ODE: with the fp64 policy it passes gradcheck.

Two time layouts share this machinery: one grid for the whole state (torchdiffeq: ``grid`` of shape
``(N+1,)``, ``f`` gets a 0-d time) and one grid per sample (torchode: ``grid`` of shape ``(N+1, B)``,
``f`` gets time of shape ``(B,)``; samples with fewer steps are padded with zero-length steps, which
leave their state unchanged exactly).  Where outputs fall and how they are interpolated is an
*output plan* (:class:`_SharedTimeOutputs`, :class:`BatchedOutputs`), built on the host once per solve.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ._policy import PrecisionPolicy
from ._probe import GraphCheck, sequence_mark
from ._replay import StepReplay
from ._scaler import AdjointScaler
from ._storage import ChunkedStore
from ._stats import _new_record
from ._tableau import ButcherTableau

__all__ = [
    "solve_grid", "solve_batched", "solve_adaptive", "solve_batched_adaptive", "StepController",
    "BatchedStepController", "BatchedOutputs", "StepData", "INTERPOLATIONS",
]

#: Dense output between grid points (torchdiffeq's fixed-grid ``interp`` option).
INTERPOLATIONS = ("linear", "cubic")


def _lincomb(ks: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor | None:
    """sum_j coeffs[j] * ks[j], skipping zero weights (None if all are zero).

    Never writes into a stage value; accumulates in place only into its own fresh tensor and only
    without a graph.
    """
    acc, fresh = None, False
    for k, w in zip(ks, coeffs):
        if w == 0.0:
            continue
        if acc is None:
            acc, fresh = (k, False) if w == 1.0 else (k * w, True)
        elif fresh and not torch.is_grad_enabled():
            acc.add_(k, alpha=w)
        else:
            acc, fresh = torch.add(acc, k, alpha=w), True
    return acc


def _axpy(y: torch.Tensor, h, ks: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """y + h * sum_j coeffs[j] * ks[j], formed in y's dtype."""
    if isinstance(h, float):
        out, fresh = y, False
        for k, w in zip(ks, coeffs):
            if w == 0.0:
                continue
            if fresh and not torch.is_grad_enabled():
                out.add_(k, alpha=h * w)
            else:
                out, fresh = torch.add(out, k, alpha=h * w), True
        return out
    comb = _lincomb(ks, coeffs)
    return y if comb is None else torch.addcmul(y, h, comb)


class StepData:
    """One step as the output plans see it: times, states, stage values and a lazy end slope."""

    __slots__ = ("t0", "t1", "h", "y0", "y1", "ks", "_prob", "_f1")

    def __init__(self, prob, t0, t1, h, y0, y1, ks):
        self.t0, self.t1, self.h, self.y0, self.y1, self.ks = t0, t1, h, y0, y1, ks
        self._prob, self._f1 = prob, None

    def f_end(self) -> torch.Tensor:
        """f(t1, y1) in the state dtype, evaluated once (cubic Hermite output needs it)."""
        if self._f1 is None:
            prob = self._prob
            with prob.autocast():
                self._f1 = prob.f(self.t1, self.y1).to(prob.policy.state_dtype)
            prob.nfe_extra += 1
        return self._f1


class _SharedTimeOutputs:
    """torchdiffeq's fixed-grid outputs: ``sol[j]`` at ``t_out[j]``, one time for the whole state.

    ``sol[0] = y0``; ``t_out[j]`` (j >= 1) is produced by the step with ``t_n < t_j <= t_{n+1}``, as
    ``y_{n+1}`` itself when ``t_j == t_{n+1}`` and ``interp == "linear"`` (torchdiffeq returns it without
    interpolating) and otherwise by linear or cubic Hermite interpolation.
    """

    def __init__(self, t_out, grid_cpu, interp):
        self.t_out, self.interp = t_out, interp
        tout_cpu = t_out.detach().cpu()
        self.steps: dict[int, list] = {}
        if grid_cpu is not None and tout_cpu.shape[0] > 1:
            step_of = (torch.searchsorted(grid_cpu, tout_cpu[1:], side="left") - 1).clamp_(min=0)
            # The cubic formula is always applied, also on grid points, as torchdiffeq does, so the
            # one-sided time derivatives at grid points agree with the host's.
            exact = (tout_cpu[1:] == grid_cpu[step_of + 1]) & (interp == "linear")
            for j, (n, ex) in enumerate(zip(step_of.tolist(), exact.tolist()), start=1):
                self.steps.setdefault(n, []).append((j, ex))

    def allocate(self, y, dtype):
        sol = torch.empty((self.t_out.shape[0], *y.shape), dtype=dtype, device=y.device)
        sol[0] = y
        return sol

    def y0_cotangent(self, g):
        return g[0]

    def last_active_step(self, g) -> int:
        if g.shape[0] <= 1:
            return -1
        active = (g[1:].reshape(g.shape[0] - 1, -1) != 0).any(dim=1).tolist()
        return max((n for n, outs in self.steps.items() if any(active[j - 1] for j, _ in outs)), default=-1)

    def evaluate(self, entry, sd: StepData, t_leaves):
        """Values of the step's outputs (differentiable) -- y1 itself for exact hits."""
        values = []
        for (j, exact), tj in zip(entry, t_leaves):
            if exact:
                values.append(sd.y1)
                continue
            if callable(self.interp):  # a host's own dense output, e.g. torchdiffeq's adaptive fit
                values.append(self.interp(sd, tj))
                continue
            s = ((tj - sd.t0) / (sd.t1 - sd.t0)).to(sd.y0.dtype)
            if self.interp == "linear":
                values.append(sd.y0 + s * (sd.y1 - sd.y0))
            else:
                dt = (sd.t1 - sd.t0).to(sd.y0.dtype)
                f1 = sd.f_end()
                values.append((1 + 2 * s) * (1 - s) * (1 - s) * sd.y0 + s * (1 - s) * (1 - s) * dt * sd.ks[0]
                              + s * s * (3 - 2 * s) * sd.y1 + s * s * (s - 1) * dt * f1)
        return values

    def times(self, entry, t_out, need_grad):
        return [None if exact else (t_out[j].clone().requires_grad_(True) if need_grad else t_out[j]) for j, exact in entry]

    def write(self, sol, entry, values):
        for (j, _), v in zip(entry, values):
            sol[j] = v

    def cotangents(self, g, entry):
        return [g[j] for j, _ in entry]

    def add_time_grads(self, g_tout, entry, grads):
        for (j, exact), gj in zip(entry, grads):
            if gj is not None:
                g_tout[j] += gj.to(g_tout.dtype)


class BatchedOutputs:
    """torchode's outputs: ``ys[b, j]`` at ``t_eval[b, j]``, one time grid per sample.

    Output ``(b, j)`` is produced by the first step whose interval contains it (in that sample's
    direction of time), by ``interpolant(step_data)`` -- any object with ``evaluate(t, sample_idx)``,
    such as the host method's own dense output.  ``t_eval[b, 0] == t_start[b]`` returns ``y0[b]``.

    Args:
        t_eval: ``(B, M)`` output times (time dtype).
        interpolant: ``callable(StepData) -> object`` with ``evaluate(t, sample_idx)``.
    """

    def __init__(self, t_eval, interpolant):
        self.t_eval, self.interpolant = t_eval, interpolant
        self.steps: dict[int, tuple] = {}
        self.at_start = None

    def plan(self, grid_cpu):
        """Assign outputs to steps (host side, once; grid_cpu is ``(N+1, B)``)."""
        tev = self.t_eval.detach().cpu()
        direction = torch.where(grid_cpu[-1] >= grid_cpu[0], 1.0, -1.0).to(grid_cpu.dtype)
        g_norm = (grid_cpu * direction).T.contiguous()  # (B, N+1), non-decreasing per row
        e_norm = (tev * direction[:, None]).contiguous()
        step_of = torch.searchsorted(g_norm, e_norm, side="left") - 1  # (B, M)
        # Outputs at a sample's start time are y0 itself (all of a sample's outputs when its span is
        # empty, t_start == t_end, as torchode returns y0 there).
        at_start = tev == grid_cpu[0][:, None]
        step_of = torch.where(at_start, -1, step_of.clamp(min=0))
        self.at_start = at_start.to(self.t_eval.device)
        dev = self.t_eval.device
        flat = step_of.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat[flat >= 0], minlength=grid_cpu.shape[0] - 1).tolist()
        sample = (order // tev.shape[1])
        evalj = (order % tev.shape[1])
        offset = int((flat < 0).sum())
        for n, c in enumerate(counts):
            if c:
                sl = slice(offset, offset + c)
                self.steps[n] = (sample[sl].to(dev), evalj[sl].to(dev))
                offset += c

    def start_incremental(self, t_start):
        """For adaptive solves: outputs are assigned as steps are accepted (see :meth:`assign`)."""
        self.at_start = self.t_eval == t_start[:, None]
        self._pending = ~self.at_start

    def assign(self, n, t_old, t_new, direction):
        """Outputs passed by step ``n`` (torchode's rule: the first step whose end reaches them)."""
        passed = ((t_new[:, None] - self.t_eval) * direction[:, None] >= 0) & self._pending
        passed &= (t_new != t_old)[:, None]
        if not bool(passed.any()):
            return None
        self._pending &= ~passed
        sample, evalj = passed.nonzero(as_tuple=True)
        self.steps[n] = (sample, evalj)
        return self.steps[n]

    def allocate(self, y, dtype):
        ys = torch.full((y.shape[0], self.t_eval.shape[1], *y.shape[1:]), math.nan, dtype=dtype, device=y.device)
        mask = self.at_start.reshape(*self.at_start.shape, *([1] * (y.ndim - 1)))
        return torch.where(mask, y[:, None].to(dtype), ys)

    def y0_cotangent(self, g):
        mask = self.at_start.reshape(*self.at_start.shape, *([1] * (g.ndim - 2))).to(g.dtype)
        return (g * mask).sum(dim=1)

    def last_active_step(self, g) -> int:
        active = (g.reshape(g.shape[0], g.shape[1], -1) != 0).any(dim=2)
        return max((n for n, (b, j) in self.steps.items() if bool(active[b, j].any())), default=-1)

    def evaluate(self, entry, sd: StepData, t_leaves):
        sample, _ = entry
        return [self.interpolant(sd).evaluate(t_leaves[0], sample)]

    def times(self, entry, t_eval, need_grad):
        sample, evalj = entry
        t = t_eval[sample, evalj]
        return [t.clone().requires_grad_(True) if need_grad else t]

    def write(self, ys, entry, values):
        sample, evalj = entry
        ys[sample, evalj] = values[0].to(ys.dtype)

    def cotangents(self, g, entry):
        sample, evalj = entry
        return [g[sample, evalj]]

    def add_time_grads(self, g_tout, entry, grads):
        if grads[0] is not None:
            sample, evalj = entry
            g_tout.index_put_((sample, evalj), grads[0].to(g_tout.dtype), accumulate=True)


@dataclass
class _Problem:
    """Everything the forward and the backward of one solve share."""

    f: Callable
    tableau: ButcherTableau
    policy: PrecisionPolicy
    params: tuple
    outputs: object
    perturb: bool
    scaler: AdjointScaler | None
    callback_step: Callable | None
    callback_step_adjoint: Callable | None
    device_type: str
    record: object
    n_steps: int
    per_sample: bool
    param_hint: str = "pass them explicitly as parameters"
    nfe_extra: int = 0
    nudge_end: bool = False
    # steps whose first stage is nudged past a jump (adaptive torchdiffeq, jump_t)
    first_next_steps: set = field(default_factory=set)
    # steps whose first stage is the previous step's last stage, not f(t_n, y_n): their value is
    # stored and its cotangent flows into the previous step (see _backward)
    carried_k0: "_Carried" = field(default_factory=lambda: _Carried())
    precomputed: tuple | None = None
    # what recomputed steps must see again (random numbers, buffers); None without a backward
    replay: StepReplay | None = None
    # the hidden-tensor walk over every graph the engine builds
    check: GraphCheck | None = None
    callback_accept_step_adjoint: Callable | None = None
    forward_runs: int = 0
    watch: bool = False  # a forward without adjoint graph, in grad mode: field outputs must not need grad

    def autocast(self):
        cd = self.policy.compute_dtype
        if cd is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=cd)

    def full_precision(self):
        """Outputs between steps are formed in the state dtype: a host's dense output (matmuls with
        its interpolation weights) would otherwise run at the compute precision under autocast."""
        return torch.autocast(self.device_type, enabled=False)

    def stage_times(self, t0: torch.Tensor, t1: torch.Tensor, h: torch.Tensor, first_next=None) -> list[torch.Tensor]:
        """Times of the stages of one step (or of all steps at once), differentiable in t0 and t1.

        A stage with c == 1 gets t1 itself (not t0 + h, which can differ from t1 in the last bit).
        Nudges, constants for differentiation, put evaluations on the correct side of a jump in the
        vector field at a grid point, as torchdiffeq does: with ``perturb`` the first stage moves to
        the next representable time and stages at c == 1 to the previous one; with ``nudge_end``
        (torchdiffeq's adaptive steps) only the latter; ``first_next`` (bool or bool tensor over the
        steps) nudges the first stage of the steps that start at a ``jump_t``.
        """
        times = []
        for i, c in enumerate(self.tableau.c):
            if c == 0.0:
                ti = t0
            elif c == 1.0:
                ti = t1
            else:
                ti = t0 + c * h
            if i == 0 and (self.perturb or first_next is not None):
                with torch.no_grad():
                    nudged = torch.nextafter(ti, torch.full_like(ti, math.inf))
                    if not self.perturb:
                        nudged = torch.where(torch.as_tensor(first_next, device=ti.device), nudged, ti)
                ti = ti + (nudged - ti).detach()
            elif c == 1.0 and (self.perturb or self.nudge_end):
                with torch.no_grad():
                    nudged = torch.nextafter(ti, torch.full_like(ti, -math.inf))
                ti = ti + (nudged - ti).detach()
            times.append(ti)
        return times

    def stage_time_table(self, grid: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Stage times of the steps of ``grid`` (steps ``offset ...`` of the solve), ``(n, stages[, B])``."""
        t0, t1 = grid[:-1], grid[1:]
        first_next = None
        inside = [n - offset for n in self.first_next_steps if 0 <= n - offset < t0.shape[0]]
        if inside:
            first_next = torch.zeros(t0.shape[0], dtype=torch.bool)
            first_next[sorted(inside)] = True
        return torch.stack(self.stage_times(t0, t1, t1 - t0, first_next), dim=1)

    def h_for_state(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step size in the state dtype, shaped to broadcast against the state."""
        h = h.to(self.policy.state_dtype)
        return h.reshape(*h.shape, *([1] * (y.ndim - 1))) if self.per_sample else h

    def step(self, y: torch.Tensor, times, h, k0: torch.Tensor | None = None):
        """One RK step from ``y`` (state dtype): returns (y_next, stage values).

        ``h`` is a Python float when no time gradient is needed and time is shared (then
        ``y + h*sum(a_ij k_j)`` is a chain of fused ``add(alpha=...)`` kernels) or a tensor in the
        state dtype that broadcasts against ``y``.
        """
        f, tab, state_dtype = self.f, self.tableau, self.policy.state_dtype
        ks: list[torch.Tensor] = []
        for i in range(tab.stages):
            if i == 0 and k0 is not None:
                ks.append(k0)
                continue
            yi = _axpy(y, h, ks, tab.a[i]) if i else y
            k = f(times[i], yi)
            if type(k) is not torch.Tensor or k.shape != y.shape or not k.dtype.is_floating_point:
                _bad_velocity(k, y, times[i])
            if k.dtype != state_dtype:
                # Velocities may come back in fp16/bf16; every combination is formed in the state
                # dtype (a 0-d h would not promote a half-precision k).
                k = k.to(state_dtype)
            ks.append(k)
        return _axpy(y, h, ks, tab.b), ks


class _StepTable:
    """Stage times and step sizes of a fixed grid, computed a chunk of steps at a time.

    Precomputing them for the whole grid made one tensor view (and one float) per step -- memory
    that grew with the number of steps even under ``no_grad``.  A chunk of 256 steps is one table
    and one host synchronisation; the backward walks it in reverse, one chunk reload per 256 steps.
    """

    CHUNK = 256

    def __init__(self, prob: "_Problem", grid: torch.Tensor, y: torch.Tensor):
        self.prob, self.grid, self.y = prob, grid, y
        self.h_all = grid[1:] - grid[:-1]
        self.start, self.stop = 0, -1

    def __getitem__(self, n: int):
        """(stage times of step n, its step size: a float, or a state-shaped tensor per sample)."""
        if not self.start <= n < self.stop:
            c0 = n - n % self.CHUNK
            c1 = min(c0 + self.CHUNK, self.h_all.shape[0])
            self.times = self.prob.stage_time_table(self.grid[c0 : c1 + 1], offset=c0).unbind(0)
            h = self.h_all[c0:c1]
            # floats: the steps then use fused add(alpha=h*a_ij) (one synchronisation per chunk)
            self.h = [self.prob.h_for_state(x, self.y) for x in h] if self.prob.per_sample else h.tolist()
            self.start, self.stop = c0, c1
        return self.times[n - self.start].unbind(0), self.h[n - self.start]


class _Carried:
    """First stages carried from one accepted step into the next (adaptive steps), chunk-stored."""

    __slots__ = ("_store", "_index")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        import array

        self._store, self._index = ChunkedStore(), array.array("q")

    def __setitem__(self, n: int, value: torch.Tensor) -> None:
        while len(self._index) <= n:
            self._index.append(-1)
        self._index[n] = len(self._store)
        self._store.append(value)

    def get(self, n: int):
        i = self._index[n] if n < len(self._index) else -1
        return None if i < 0 else self._store[i]

    def __bool__(self) -> bool:
        return bool(self._store)

    def nbytes(self) -> int:
        return self._store.nbytes()


def _bad_velocity(k, y, t) -> None:
    """The field's result must be a real floating tensor of the state's shape, at every evaluation.

    A broadcastable shape (a (1,) result for a (3,) state) would otherwise be summed into the state
    without a word; an integer or complex result would be cast."""
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"the vector field must return a tensor, got {type(k).__name__} (at t = {float(t.min()):.6g})")
    if not k.dtype.is_floating_point:
        raise TypeError(f"the vector field must return a real floating-point tensor, got {k.dtype} (at t = {float(t.min()):.6g})")
    if k.shape != y.shape:
        raise ValueError(
            f"the vector field returned shape {tuple(k.shape)} for a state of shape {tuple(y.shape)} "
            f"(at t = {float(t.min()):.6g}); it must return the state's shape"
        )


def _check_velocity(k, y, t):
    """``k`` if it is a real floating tensor of ``y``'s shape, else the error (see :func:`_bad_velocity`)."""
    if type(k) is not torch.Tensor or k.shape != y.shape or not k.dtype.is_floating_point:
        _bad_velocity(k, y, t)
    return k


def _probe_first(prob: _Problem, t_first, y):
    """The field's first evaluation, with a graph, checked for hidden tensors; reused as a stage."""
    mark = sequence_mark()
    with torch.enable_grad():
        k0 = _check_velocity(prob.f(t_first, y), y, t_first)
        refs, outside = prob.check.scan([k0], (y, t_first), mark)
    k0 = k0.detach().to(prob.policy.state_dtype)  # drops the probe's graph before the liveness check
    prob.check.raise_if_hidden(refs, outside)
    return k0


def _with_replay(prob: _Problem, run, store: bool):
    """Run a forward (``run(replaying)``); again, replayed, if the field turned out to draw random
    numbers or write buffers only after its first evaluation (see :mod:`._replay`)."""
    replay = prob.replay if store else None
    if replay is not None:
        replay.begin()
    prob.forward_runs = 1
    out = run(False)
    if replay is not None and not replay.active and replay.changed_since_begin():
        replay.restart()
        prob.forward_runs = 2
        prob.nfe_extra = 0
        out = run(True)
    rec = prob.record
    rec.replayed = bool(replay is not None and replay.active)
    rec.forward_runs = prob.forward_runs
    if replay is not None:
        rec.stored_bytes += replay.stored_bytes()  # run() set the states' bytes
    return out


def _check_storage(prob: _Problem, stored, grid) -> None:
    """A stored state beyond the storage dtype's range (fp16: 65504) would turn every gradient into
    NaN far from its cause: raise at the step where it happened.  NaN from the forward itself is
    not this error: it propagates as with every other policy."""
    storage, state = prob.policy.storage, prob.policy.state_dtype
    if storage == state or torch.finfo(storage).max >= torch.finfo(state).max:
        return
    if isinstance(stored, torch.Tensor):
        bad = torch.isinf(stored.reshape(stored.shape[0], -1)).any(dim=1)
    elif stored:
        bad = torch.cat([torch.isinf(c.reshape(c.shape[0], -1)).any(dim=1) for c in stored.chunks()])
    else:
        return
    if bool(bad.any()):  # one synchronisation per solve, only for narrow storage dtypes
        n = int(torch.nonzero(bad)[0])
        t = grid[n] if grid.ndim == 1 else grid[n].min()
        raise FloatingPointError(
            f"precision policy {prob.policy.name!r} stores one state per step in {str(storage).replace('torch.', '')} "
            f"(largest value {torch.finfo(storage).max:g}), and the state at step {n} of {len(stored)} "
            f"(t = {float(t):.6g}) exceeds it, so the backward could only return inf/NaN. Use a policy with a wider "
            "storage dtype (precision='bf16' has fp32's range; or 'fp32'), or rescale the state."
        )


def _forward(prob: _Problem, y0, grid, t_out, *, store: bool, probe: bool):
    """Run the grid forward without an adjoint graph.  Returns (solution, stored states or None)."""
    sol, stored = _with_replay(prob, lambda replaying: _forward_once(prob, y0, grid, t_out, store, probe, replaying), store)
    if store:
        _check_storage(prob, stored, grid)
    return sol, stored


def _forward_once(prob: _Problem, y0, grid, t_out, store: bool, probe: bool, replaying: bool):
    pol, tab, outputs = prob.policy, prob.tableau, prob.outputs
    state_dtype = pol.state_dtype
    n_steps = prob.n_steps
    replay = prob.replay if store else None
    # Without an adjoint graph but in grad mode, a field whose output requires grad uses a tensor
    # rampde does not know about: it is reported, not silently differentiated by plain autograd.
    watch = not store and torch.is_grad_enabled()
    y = y0.detach().to(state_dtype)
    sol = outputs.allocate(y, pol.output)
    stored = torch.empty((n_steps, *y.shape), dtype=pol.storage, device=y.device) if store else None
    grid, t_out = grid.detach(), t_out.detach()
    table = _StepTable(prob, grid, y)
    h_all = table.h_all
    # First-same-as-last: the last stage of a step is f(t_{n+1}, y_{n+1}) bit for bit (same
    # coefficients, same operation order), so it is the next step's first stage.  Not with
    # `perturb`, which evaluates the two at different sides of t_{n+1}, and not for a field that is
    # replayed: its next evaluation draws other random numbers than the last stage did.
    fsal = tab.fsal and not prob.perturb
    nfe = 0
    k0 = None
    with prob.autocast():
        if probe:
            # The first stage, with a graph: hidden tensors are looked for, and the value is reused.
            k0 = _probe_first(prob, table[0][0][0], y)
            nfe += 1
            if replay is not None:
                if not replaying:
                    replay.detect()
                replay.put(0, replay.start_token())
        if replay is not None and replay.active:
            fsal = False
        for n in range(n_steps):
            if store:
                stored[n] = y
            if n and replay is not None:
                replay.capture(n)
            if prob.callback_step is not None:
                prob.callback_step(grid[n], y, h_all[n])
            stage_t, h_n = table[n]
            y_next, ks = prob.step(y, stage_t, h_n, k0)
            nfe += tab.stages - (k0 is not None)
            if watch and y_next.requires_grad:
                refs, outside = prob.check.scan([y_next], (y,))
                y_next, ks = y_next.detach(), [k.detach() for k in ks]
                prob.check.raise_if_hidden(refs, outside, f" (at step {n}, t = {float(grid[n].min()):.6g})")
            entry = outputs.steps.get(n)
            if entry is not None:
                sd = StepData(prob, grid[n], grid[n + 1], h_all[n], y, y_next, ks)
                with prob.full_precision():
                    values = outputs.evaluate(entry, sd, outputs.times(entry, t_out, False))
                outputs.write(sol, entry, [v.detach() for v in values] if watch else values)
            k0 = ks[-1] if fsal else None
            y = y_next
    rec = prob.record
    rec.n_steps, rec.n_outputs, rec.forward_nfe = n_steps, t_out.numel(), nfe + prob.nfe_extra
    rec.stored_bytes = 0 if stored is None else stored.numel() * stored.element_size()
    return sol, stored


def _backward(prob: _Problem, stored, grid, t_out, params, grad_sol, needs):
    """The discrete adjoint.  ``needs`` = (y0, grid, t_out, *params) needs_input_grad flags."""
    replay = prob.replay
    with replay.sweep() if replay is not None else contextlib.nullcontext():
        return _adjoint_sweep(prob, stored, grid, t_out, params, grad_sol, needs)


def _adjoint_sweep(prob: _Problem, stored, grid, t_out, params, grad_sol, needs):
    pol, tab, outputs = prob.policy, prob.tableau, prob.outputs
    state_dtype, acc_dtype = pol.state_dtype, pol.accumulation
    need_grid, need_tout = needs[1], needs[2]
    need_time = need_grid or need_tout
    param_idx = [i for i, p in enumerate(params) if needs[3 + i]]
    diff_params = [params[i] for i in param_idx]
    g = grad_sol.to(acc_dtype)
    a = torch.zeros(stored[0].shape, dtype=acc_dtype, device=stored[0].device)
    g_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc_dtype)) for p in diff_params]
    # Autograd's convention: a parameter no step depends on gets None, not a zero tensor (an
    # optimizer with weight decay would move it).
    touched = [False] * len(diff_params)
    g_grid = torch.zeros_like(grid, dtype=torch.promote_types(grid.dtype, acc_dtype)) if need_grid else None
    g_tout = torch.zeros_like(t_out, dtype=torch.promote_types(t_out.dtype, acc_dtype)) if need_tout else None

    dynamic = pol.scaling == "dynamic"
    scaler = None
    if dynamic:
        scaler = prob.scaler if prob.scaler is not None else AdjointScaler._from_config(pol.scaler)
        dynamic = scaler.is_enabled()
    scale, clean_run, backoffs, redone = 1.0, 0, 0, 0
    if dynamic:
        scale = scaler._start(float(g.abs().amax()) if g.numel() else 0.0)  # one sync per backward
        prob.record.initial_scale = scale
    max_retries = scaler._config.max_retries if dynamic else 0

    grid_d, t_out_d = grid.detach(), t_out.detach()
    table = _StepTable(prob, grid_d, stored[0])
    h_all = table.h_all
    replay = prob.replay if prob.replay is not None and prob.replay.active else None
    check = prob.check
    mark = sequence_mark()  # nodes numbered below were created before this backward (same thread)
    nfe_before = prob.nfe_extra
    nfe, steps_done = 0, 0
    a_k = None  # cotangent of a first stage carried over from the previous step

    def rebuild(n, y_n, k0_leaf, entry):
        """Step n's graph: (roots, their cotangents, time leaves, t0, t1).  All its locals die on return."""
        nonlocal nfe
        with torch.enable_grad(), prob.autocast():
            if need_time:
                t0 = grid_d[n].clone().requires_grad_(True)
                t1 = grid_d[n + 1].clone().requires_grad_(True)
                h = t1 - t0
                first_next = True if n in prob.first_next_steps else None
                stage_t = prob.stage_times(t0, t1, h, first_next)
                hs = prob.h_for_state(h, y_n)
            else:
                t0, t1, h = grid_d[n], grid_d[n + 1], h_all[n]
                stage_t, hs = table[n]
            k0 = k0_leaf
            if replay is not None:
                if k0 is None and (n, "k0") in replay.tokens:
                    # a first stage the forward evaluated before this step's trial (adaptive steps)
                    replay.restore((n, "k0"))
                    k0 = prob.f(stage_t[0], y_n).to(state_dtype)
                    nfe += 1
                replay.restore(n)
            y_next, ks = prob.step(y_n, stage_t, hs, k0)
            nfe += tab.stages - (k0 is not None)
            roots, cot, t_leaves = [y_next], [a], []
            if a_k is not None:  # the next step started from this step's last stage
                roots.append(ks[-1])
                cot.append(a_k)
            if entry is not None:
                t_leaves = outputs.times(entry, t_out_d, need_tout)
                sd = StepData(prob, t0, t1, h, y_n, y_next, ks)
                with prob.full_precision():
                    values = outputs.evaluate(entry, sd, t_leaves)
                for v, c in zip(values, outputs.cotangents(g, entry)):
                    if v is y_next:  # an output that is y_{n+1} itself: fold its cotangent in
                        cot[0] = cot[0] + c
                    else:
                        roots.append(v)
                        cot.append(c)
        return roots, cot, t_leaves, t0, t1

    # Steps after the last output with a non-zero cotangent carry a zero adjoint: skip them (one
    # host synchronisation per backward, e.g. a loss on an early part of the trajectory).
    for n in range(outputs.last_active_step(g), -1, -1):
        entry = outputs.steps.get(n)
        y_n = stored[n].to(state_dtype).requires_grad_(True)
        carried = prob.carried_k0.get(n)
        k0_leaf = None if carried is None else carried.to(state_dtype).requires_grad_(True)
        if prob.callback_step_adjoint is not None:
            prob.callback_step_adjoint(grid_d[n], y_n.detach(), h_all[n])
        roots, cot, t_leaves, t0, t1 = rebuild(n, y_n, k0_leaf, entry)
        inputs = [y_n, *diff_params]
        if k0_leaf is not None:
            inputs.append(k0_leaf)
        t_inputs = [tl for tl in t_leaves if tl is not None] if need_tout else []
        if need_time:
            inputs += [t0, t1, *t_inputs]
        # Every step's graph is checked: a tensor the field uses only at some times is found here.
        refs, outside = check.scan(roots, inputs, mark)
        for attempt in range(max_retries + 1):
            scaled_cot = [(c * scale if scale != 1.0 else c).to(state_dtype) for c in cot]
            grads = torch.autograd.grad(roots, inputs, scaled_cot, allow_unused=True, retain_graph=dynamic)
            if not dynamic:
                break
            # One host synchronisation per step: are all results finite, and how large is the
            # scaled adjoint (for the growth rule)?
            present = [gr for gr in grads if gr is not None]
            probe = torch.stack([torch.stack([gr.abs().amax().float() for gr in present]).amax(), grads[0].abs().amax().float()])
            worst, scaled_amax = probe.tolist()
            if math.isfinite(worst):
                break
            # NaN/inf already in what this step starts from or computes (the forward, the loss, a
            # later step) is not an fp16 overflow of this VJP: halving the scale cannot help, so it
            # propagates as with every other policy.  Checked only on this failure path.
            starts = (y_n, *cot, *roots, *(() if k0_leaf is None else (k0_leaf,)))
            if not all(bool(torch.isfinite(x.detach()).all()) for x in starts):
                break
            if attempt == max_retries:
                raise FloatingPointError(
                    f"fp16 adjoint overflow at step {n} of {prob.n_steps}: the VJP is still inf/nan after "
                    f"{max_retries} halvings of the adjoint scale (now {scale:g}). The vector field's "
                    "backward overflows fp16 even for small cotangents; use precision='bf16' (fp32 range) "
                    "or 'fp32', or bound the network's activations."
                )
            scale *= scaler._config.backoff_factor
            backoffs += 1
            clean_run = 0
        del roots
        check.raise_if_hidden(refs, outside, f" (at step {n} of {prob.n_steps}, t = {float(grid_d[n].min()):.6g})")
        if attempt:
            redone += 1
        if steps_done == 0:
            # What a persistent scaler carries to the next iteration: the scale that ran the
            # *first* backward step cleanly.  The next backward also starts at t_N with a terminal
            # cotangent of similar size; the end-of-pass scale belongs to the adjoint at t_0.
            first_clean_scale, first_backoffs = scale, attempt
        inv = 1.0 / scale
        a = grads[0].to(acc_dtype)
        if scale != 1.0:
            a = a * inv
        for i, gp in enumerate(grads[1 : 1 + len(diff_params)]):
            if gp is not None:
                g_params[i].add_(gp.to(g_params[i].dtype), alpha=inv)
                touched[i] = True
        n_k = 1 if k0_leaf is not None else 0
        if n_k:
            gk = grads[1 + len(diff_params)]
            a_k = (gk if gk is not None else torch.zeros_like(k0_leaf)).to(acc_dtype) * inv
        else:
            a_k = None
        if need_time:
            gt = grads[1 + len(diff_params) + n_k :]
            if need_grid:
                if gt[0] is not None:
                    g_grid[n] += gt[0].to(g_grid.dtype) * inv
                if gt[1] is not None:
                    g_grid[n + 1] += gt[1].to(g_grid.dtype) * inv
            if need_tout and entry is not None:
                it = iter(gr * inv if gr is not None else None for gr in gt[2:])
                outputs.add_time_grads(g_tout, entry, [None if tl is None else next(it) for tl in t_leaves])
        del grads, k0_leaf
        if prob.callback_accept_step_adjoint is not None:
            prob.callback_accept_step_adjoint(grid_d[n], y_n.detach(), h_all[n])
        steps_done += 1
        if dynamic:
            clean_run += 1
            scale, clean_run = scaler._grow(scale, scaled_amax, clean_run)
    g_y0 = a + outputs.y0_cotangent(g)
    if dynamic:
        scaler._finish(first_clean_scale if steps_done else scale, backoffs, first_backoffs if steps_done else 0)
    rec = prob.record
    rec.backward_nfe += nfe + prob.nfe_extra - nfe_before
    rec.backward_steps += steps_done
    rec.scale_backoffs += backoffs
    rec.redone_steps += redone
    rec.final_scale = scale if dynamic else None
    rec.backward_done = True
    return g_y0, g_grid, g_tout, [(i, gp if hit else None) for i, gp, hit in zip(param_idx, g_params, touched)]


class StepController:
    """What the adaptive driver asks of a step-size controller (a host adapter implements it).

    The driver owns the Runge--Kutta steps, the error estimate ``h * sum(b_err_i k_i)`` (state dtype),
    storage and outputs; the controller owns every decision, in its own (fp32 or wider) arithmetic:

    * ``start(f, t0, y0, f0)`` -- before the first step (``f`` evaluates under the policy; counted);
    * ``propose(t0, y0) -> (t1, h)`` -- the next trial step (0-d tensors in the time dtype);
    * ``judge(t0, t1, h, y0, y1, err) -> bool`` -- accept or reject it and choose the next step size;
      after an accepted step ``at_jump`` says whether it ended on a discontinuity of ``f``;
    * ``reuse_last_stage`` -- start the next step from the last stage even when it is not
      ``f(t1, y1)`` (torchdiffeq does this for every pair); the driver then carries that value
      through the adjoint so the gradient stays exact.
    """

    at_jump: bool = False
    reuse_last_stage: bool = False

    def start(self, f, t0, y0, f0):  # pragma: no cover - interface
        raise NotImplementedError

    def propose(self, t0, y0):  # pragma: no cover - interface
        raise NotImplementedError

    def judge(self, t0, t1, h, y0, y1, err) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


def _adaptive_forward(prob: _Problem, y0, t_out, controller: StepController, probe: bool):
    """Adaptive steps until the last output is passed.  Rejected steps cost no memory.

    Returns (solution, stored states (list), accepted grid values).
    """
    if prob.tableau.b_err is None:
        raise ValueError(f"method {prob.tableau.name!r} has no embedded error estimate; it cannot adapt its step size")
    # the adaptive drivers probe exactly when a backward may follow
    return _with_replay(prob, lambda replaying: _adaptive_forward_once(prob, y0, t_out, controller, probe, replaying), probe)


def _adaptive_forward_once(prob: _Problem, y0, t_out, controller: StepController, probe: bool, replaying: bool):
    pol, tab, outputs = prob.policy, prob.tableau, prob.outputs
    state_dtype, storage = pol.state_dtype, pol.storage
    replay = prob.replay if probe else None
    prob.carried_k0.clear()
    prob.first_next_steps.clear()
    outputs.steps.clear()
    y = y0.detach().to(state_dtype)
    t_out = t_out.detach()
    sol = outputs.allocate(y, pol.output)
    t = t_out[0]
    t_host = t_out.tolist()
    n_out = len(t_host)
    stored, grid = ChunkedStore(), ChunkedStore()  # states and accepted end times, 8 bytes a step
    nfe = 0
    watch = prob.watch

    def f_counted(tt, yy):
        nonlocal nfe
        nfe += 1
        return _check_velocity(prob.f(tt, yy), yy, tt).to(state_dtype)

    with prob.autocast():
        k0_token = None
        if probe:
            k0 = _probe_first(prob, t, y)
            nfe += 1
            if not replaying:
                replay.detect()
            k0_token = replay.start_token()
        else:
            k0 = f_counted(t, y)
        active = replay is not None and replay.active
        controller.start(f_counted, t, y, k0)
        carried = False  # is k0 the previous step's last stage rather than f(t, y)?
        first_next = False
        out_j, n, rejected = 1, 0, 0
        while out_j < n_out:
            t1, h = controller.propose(t, y)
            h_float = float(h)
            stage_token = replay.snapshot() if active else None
            ks_times = prob.stage_times(t, t1, h, True if first_next else None)
            y1, ks = prob.step(y, ks_times, h_float, k0)
            nfe += tab.stages - 1
            if watch and y1.requires_grad:
                refs, outside = prob.check.scan([y1], (y,))
                y1, ks = y1.detach(), [k.detach() for k in ks]
                prob.check.raise_if_hidden(refs, outside, f" (at t = {float(t):.6g})")
            err = _lincomb(ks, tab.b_err)
            err = torch.zeros_like(y) if err is None else err * h_float
            if not controller.judge(t, t1, h, y, y1, err):
                rejected += 1
                continue
            if probe:  # without a backward to come nothing is kept
                stored.append(y.to(storage))
                if carried:
                    prob.carried_k0[n] = k0.to(storage)
                elif active:
                    replay.put((n, "k0"), k0_token)
                if active:
                    replay.put(n, stage_token)
            if first_next:
                prob.first_next_steps.add(n)
            t1_host = float(t1)
            grid.append(t1)
            entry = []
            while out_j < n_out and t_host[out_j] <= t1_host:
                entry.append((out_j, False))
                out_j += 1
            if entry:
                outputs.steps[n] = entry
                sd = StepData(prob, t, t1, h, y, y1, ks)
                with prob.full_precision():
                    outputs.write(sol, entry, outputs.evaluate(entry, sd, outputs.times(entry, t_out, False)))
            n += 1
            y, t = y1, t1
            first_next = bool(controller.at_jump)
            k0_token = None
            if first_next:
                # Past a discontinuity of f: its value on the new side, as torchdiffeq does.
                with torch.no_grad():
                    t_next = torch.nextafter(t1, torch.full_like(t1, math.inf))
                k0_token = replay.snapshot() if active else None
                k0, carried = f_counted(t_next, y1), False
            elif tab.fsal:
                # f(t1, y1) up to the c == 1 time nudge.  A replayed field's next evaluation would
                # draw other random numbers: then the value is carried, like a reused last stage.
                k0, carried = ks[-1], active
            elif controller.reuse_last_stage:
                k0, carried = ks[-1], True
            else:
                k0_token = replay.snapshot() if active else None
                k0, carried = f_counted(t1, y1), False
    rec = prob.record
    rec.n_steps, rec.n_outputs, rec.forward_nfe = n, t_out.numel(), nfe + prob.nfe_extra
    rec.rejected_steps = rejected
    rec.stored_bytes = stored.nbytes() + prob.carried_k0.nbytes()
    ends = grid.stack() if grid else t_out[:0]
    dtype = torch.promote_types(t_out.dtype, ends.dtype)
    return sol, stored, torch.cat([t_out[:1].to(dtype), ends.to(dtype)])


def solve_adaptive(
    f: Callable,
    y0: torch.Tensor,
    t_out: torch.Tensor,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    controller: StepController,
    interp: Callable,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    callback_step_adjoint: Callable | None = None,
    callback_accept_step_adjoint: Callable | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
) -> torch.Tensor:
    """Adaptive-step solve with one shared time, outputs at ``t_out`` (torchdiffeq's layout).

    The controller chooses the steps; the accepted steps are then treated as constants by the
    discrete adjoint (as ACA and PNODE do): the gradient is exact for the step sequence that was
    taken, and moving ``t_out[0]`` shifts the whole sequence.

    Args:
        interp: ``interp(step_data, t) -> y(t)`` dense output inside an accepted step (differentiable).
        controller: a :class:`StepController`.
        callback_step_adjoint, callback_accept_step_adjoint: ``callback(t0, y0, dt)`` before and after
            each accepted step is replayed by the backward (the discrete adjoint replays every
            accepted step once and rejects none).
        others: as in :func:`solve_grid`.

    Returns:
        ``(len(t_out), *y0.shape)`` in the policy's output dtype.
    """
    params = _common_checks(y0, params, policy)
    if not isinstance(t_out, torch.Tensor) or t_out.ndim != 1 or t_out.shape[0] < 1:
        raise ValueError("output times must be a non-empty 1-D tensor")
    _check_time_dtype("output times", t_out)
    time_dtype = torch.promote_types(t_out.dtype, policy.state_dtype)
    t_out_t = t_out.to(device=y0.device, dtype=time_dtype)
    tc = t_out_t.detach().cpu()
    if not bool(torch.isfinite(tc).all()) or bool((tc[1:] <= tc[:-1]).any()):
        raise ValueError("output times must be finite and strictly increasing")
    prob = _Problem(
        f=f, tableau=tableau, policy=policy, params=params, outputs=_SharedTimeOutputs(t_out_t, None, interp),
        perturb=False, scaler=scaler, callback_step=None, callback_step_adjoint=callback_step_adjoint,
        device_type=y0.device.type, record=_new_record(method or f"rampde_{tableau.name}", policy.name),
        n_steps=0, per_sample=False, param_hint=param_hint, nudge_end=True,
        callback_accept_step_adjoint=callback_accept_step_adjoint,
    )
    diff_params = _attach(prob, params, buffers, param_hint, y0.device)
    grad_mode = torch.is_grad_enabled()
    needs_graph = grad_mode and (y0.requires_grad or t_out_t.requires_grad or bool(diff_params))
    # Without an adjoint graph the forward keeps the caller's grad mode, so that a field output
    # that requires grad anyway (a hidden tensor) is seen and reported.
    prob.watch = grad_mode and not needs_graph
    with torch.set_grad_enabled(prob.watch):
        sol, stored, grid_values = _adaptive_forward(prob, y0, t_out_t, controller, probe=needs_graph)
    prob.n_steps = prob.record.n_steps
    if needs_graph:
        _check_storage(prob, stored, grid_values)
    if not needs_graph or not stored:
        return sol
    # Step sizes are constants: every accepted time moves with the start time.
    grid = grid_values + (t_out_t[0] - t_out_t[0].detach())
    prob.precomputed = (sol, stored)
    return _apply(prob, y0, grid, t_out_t, diff_params)


class BatchedStepController:
    """Per-sample step-size control for :func:`solve_batched_adaptive` (torchode's layout).

    * ``start(f, t0, y0, dt0) -> (dt, f0 or None)`` -- initial step sizes ``(B,)``;
    * ``judge(t0, dt, y0, y1, err) -> (accept, dt_next, status)`` -- per sample; ``status`` is a
      ``(B,)`` long tensor of torchode status codes or ``None``;
    * ``merge(running)`` -- keep the controller state of samples that are still running.
    """

    def start(self, f, t0, y0, dt0):  # pragma: no cover - interface
        raise NotImplementedError

    def judge(self, t0, dt, y0, y1, err):  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, running):  # pragma: no cover - interface
        raise NotImplementedError


def solve_batched_adaptive(
    f: Callable,
    y0: torch.Tensor,
    t_start: torch.Tensor,
    t_end: torch.Tensor,
    outputs: BatchedOutputs,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    controller: BatchedStepController,
    dt0: torch.Tensor | None = None,
    max_steps: int | None = None,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
):
    """Adaptive steps with one step size per sample, all samples stepping together.

    Each iteration takes one trial step for every sample; samples accept or reject independently
    (a rejected or finished sample's entry is a zero-length step), and step sizes are clamped to each
    sample's remaining span.  Accepted step sizes are constants for the adjoint.  Every iteration
    stores the batch's state (the memory of a rejected iteration is that of its accepted samples).

    Args:
        buffers: module buffers the field may write (default: ``f.buffers()`` for an ``nn.Module``);
            see :func:`solve_grid`.

    Returns:
        ``(ys, info)`` with ``ys`` of shape ``(B, M, ...)`` and ``info`` a dict with per-sample
        ``n_steps``, ``n_accepted``, ``status`` (long tensors) and the grid.
    """
    params = _common_checks(y0, params, policy)
    if tableau.b_err is None:
        raise ValueError(f"method {tableau.name!r} has no embedded error estimate; it cannot adapt its step size")
    _check_time_dtype("start times", t_start)
    time_dtype = t_start.dtype
    record = _new_record(method or f"rampde_{tableau.name}", policy.name)
    prob = _Problem(
        f=f, tableau=tableau, policy=policy, params=params, outputs=outputs, perturb=False, scaler=scaler,
        callback_step=None, callback_step_adjoint=None, device_type=y0.device.type, record=record,
        n_steps=0, per_sample=True, param_hint=param_hint,
    )
    diff_params = _attach(prob, params, buffers, param_hint, y0.device)
    grad_mode = torch.is_grad_enabled()
    needs_graph = grad_mode and (y0.requires_grad or outputs.t_eval.requires_grad or t_start.requires_grad
                                 or t_end.requires_grad or bool(diff_params))
    prob.watch = grad_mode and not needs_graph

    def run(replaying):
        return _batched_adaptive_once(prob, y0, t_start, t_end, outputs, controller, dt0, max_steps,
                                      needs_graph, replaying)

    with torch.set_grad_enabled(prob.watch):
        sol, stored, grid, anchors, info = _with_replay(prob, run, needs_graph)
    grid_values = grid.stack()
    info["grid"] = grid_values
    if not needs_graph or not stored:
        return sol, info
    _check_storage(prob, stored, grid_values)
    # Accepted step sizes are constants: each sample's times move with its start time, or with its
    # end time from the step clamped onto it (torchode's arithmetic).
    anchor = anchors.stack().to(time_dtype)
    grid = grid_values + (1 - anchor) * (t_start - t_start.detach()) + anchor * (t_end - t_end.detach())
    prob.precomputed = (sol, stored)
    return _apply(prob, y0, grid, outputs.t_eval, diff_params), info


def _batched_adaptive_once(prob, y0, t_start, t_end, outputs, controller, dt0, max_steps, probe, replaying):
    """One run of the per-sample adaptive forward; returns (sol, stored, grid rows, anchors, info)."""
    policy, tableau, record = prob.policy, prob.tableau, prob.record
    state_dtype, storage = policy.state_dtype, policy.storage
    time_dtype = t_start.dtype
    replay = prob.replay if probe else None
    outputs.steps.clear()
    nfe = 0

    def f_counted(tt, yy):
        nonlocal nfe
        nfe += 1
        return _check_velocity(prob.f(tt, yy), yy, tt).to(state_dtype)

    with prob.autocast():
        y = y0.detach().to(state_dtype)
        t = t_start.detach().clone()
        ts, te = t_start.detach(), t_end.detach()
        direction = torch.where(te > ts, 1, -1).to(time_dtype)
        t_min, t_max = torch.minimum(ts, te), torch.maximum(ts, te)
        outputs.start_incremental(ts)
        sol = outputs.allocate(y, policy.output)
        k_first = None
        if probe:
            k_first = _probe_first(prob, t, y)  # reused as the first stage below
            nfe += 1
            if not replaying:
                replay.detect()
        # A replayed field evaluates every iteration's first stage afresh, after that iteration's
        # generator state was kept: a reused stage would carry random numbers of another iteration.
        active = replay is not None and replay.active
        dt, k0 = controller.start(f_counted, t, y, dt0)
        if k0 is None:
            k0 = k_first if k_first is not None else f_counted(t, y)
        clamped = torch.clamp(dt, t_min - t, t_max - t)
        # A step clamped to the end of its span lands on t_end: that point (and every later one of
        # the sample) moves with t_end, the others with t_start (step sizes are constants).
        will_anchor, anchored = clamped != dt, torch.zeros_like(t, dtype=torch.bool)
        dt = clamped
        running = (t - te) * direction < 0
        n_steps = torch.zeros_like(t, dtype=torch.long)
        n_accepted = torch.zeros_like(t, dtype=torch.long)
        status = torch.zeros_like(t, dtype=torch.long)
        stored, grid, anchors = ChunkedStore(), ChunkedStore(), ChunkedStore()
        grid.append(t)
        anchors.append(anchored)
        n = 0
        while bool(running.any()):
            if max_steps is not None and int(n_steps.max()) >= max_steps:
                status = torch.where(running, 3, status)  # torchode's REACHED_MAX_STEPS
                break
            if active:
                replay.capture(n)
                k0 = f_counted(t, y)
            h_state = prob.h_for_state(dt, y)
            y1, ks = prob.step(y, prob.stage_times(t, t + dt, dt), h_state, k0)
            nfe += tableau.stages - 1
            if prob.watch and y1.requires_grad:
                refs, outside = prob.check.scan([y1], (y,))
                y1, ks = y1.detach(), [k.detach() for k in ks]
                prob.check.raise_if_hidden(refs, outside, f" (at iteration {n})")
            err = _lincomb(ks, tableau.b_err)
            err = torch.zeros_like(y) if err is None else err * h_state
            accept, dt_next, st = controller.judge(t, dt, y, y1, err)
            to_update = accept & running
            t_new = torch.where(to_update, t + dt, t)
            if probe:  # without a backward to come no state is kept
                stored.append(y.to(storage))
            grid.append(t_new)
            anchored = anchored | (will_anchor & to_update)
            anchors.append(anchored)
            entry = outputs.assign(n, t, t_new, direction)
            if entry is not None:
                # The trial step's data, as torchode interpolates (only accepted samples own outputs).
                sd = StepData(prob, t, t + dt, dt, y, y1, ks)
                with prob.full_precision():
                    outputs.write(sol, entry, outputs.evaluate(entry, sd, outputs.times(entry, outputs.t_eval.detach(), False)))
            mask = to_update.reshape(-1, *([1] * (y.ndim - 1)))
            y = torch.where(mask, y1, y)
            if not active:  # (a replayed iteration evaluates its first stage itself, above)
                k0 = torch.where(mask, ks[-1] if tableau.fsal else f_counted(t_new, y), k0)
            t = t_new
            n_steps += running
            n_accepted += to_update
            if st is not None:
                status = torch.maximum(status, torch.where(running, st, 0))
            running = (t - te) * direction < 0
            dt = torch.where(running, dt_next, dt)
            clamped = torch.clamp(dt, t_min - t, t_max - t)
            will_anchor = clamped != dt
            dt = clamped
            controller.merge(running)
            n += 1
            if bool((status != 0).any()):
                break
    record.n_steps, record.n_outputs, record.forward_nfe = n, outputs.t_eval.numel(), nfe + prob.nfe_extra
    record.rejected_steps = int((n_steps - n_accepted).sum())
    record.stored_bytes = stored.nbytes()
    prob.n_steps = n
    info = {"n_steps": n_steps, "n_accepted": n_accepted, "status": status}
    return sol, stored, grid, anchors, info


_HIGHER_ORDER = (
    "rampde's discrete adjoint provides first-order gradients (one VJP per step, computed without a "
    "graph of its own), so {what} through a rampde solve is not available. For Hessian-vector "
    "products or gradient penalties use torchdiffeq's own method with the same tableau (e.g. "
    "method='rk4' with options={{'step_size': h}}), which backpropagates through the steps with autograd."
)


class _GridAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob, y0, grid, t_out, *params):
        if prob.precomputed is not None:  # the adaptive driver has already run the forward
            sol, stored = prob.precomputed
            prob.precomputed = None
        else:
            sol, stored = _forward(prob, y0, grid, t_out, store=True, probe=True)
        ctx.prob = prob
        ctx.y0_dtype = y0.dtype
        if isinstance(stored, torch.Tensor):
            ctx.stored_list = None
            ctx.save_for_backward(stored, grid, t_out, *params)
        else:  # adaptive: a list of per-step states, their number known only after the solve
            ctx.stored_list = stored
            ctx.save_for_backward(grid, t_out, *params)
        return sol

    @staticmethod
    def backward(ctx, grad_sol):
        # Grad mode is on in a backward exactly when the caller asked for create_graph=True: a
        # second derivative would silently be zero (the VJPs below build no graph), so refuse.
        if torch.is_grad_enabled():
            raise RuntimeError(_HIGHER_ORDER.format(what="create_graph=True (a second derivative)"))
        if ctx.stored_list is None:
            stored, grid, t_out, *params = ctx.saved_tensors
        else:
            stored = ctx.stored_list
            grid, t_out, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        g_y0, g_grid, g_tout, g_params = _backward(ctx.prob, stored, grid, t_out, params, grad_sol, needs)
        out_params = [None] * len(params)
        for i, gp in g_params:
            out_params[i] = None if gp is None else gp.to(params[i].dtype)
        return (
            None,
            g_y0.to(ctx.y0_dtype) if needs[0] else None,
            g_grid.to(grid.dtype) if g_grid is not None else None,
            g_tout.to(t_out.dtype) if g_tout is not None else None,
            *out_params,
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_HIGHER_ORDER.format(what="forward-mode differentiation (torch.autograd.forward_ad, jvp)"))


def _apply(prob, y0, grid, t_out, params):
    # torch.func transforms (grad, vmap, jacrev, hessian) need a functorch-aware Function; torch's
    # own error would not say what to do instead.
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(_HIGHER_ORDER.format(what="a torch.func transform (grad, vmap, jacrev, jacfwd, hessian)")
                           + " For first-order gradients call torch.autograd.grad or .backward().")
    return _GridAdjoint.apply(prob, y0, grid, t_out, *params)


def _check_time_dtype(name, t):
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name} has dtype {t.dtype}; time must be float32 or float64 (a half-precision time "
            "cannot resolve small steps: 1000.3 is 1000.0 in fp16)"
        )


def _attach(prob: _Problem, params, buffers, hint: str, device: torch.device) -> tuple:
    """The differentiated parameters, the hidden-tensor check and the replay record of a solve."""
    diff_params = tuple(p for p in params if p.requires_grad)
    prob.params = diff_params
    prob.check = GraphCheck(diff_params, hint)
    if buffers is None:
        buffers = tuple(prob.f.buffers()) if isinstance(prob.f, torch.nn.Module) else ()
    prob.replay = StepReplay(tuple(buffers), device)
    return diff_params


def _run(prob: _Problem, y0, grid, t_out, params, buffers):
    """Forward with the adjoint Function when a gradient can be asked for, plain forward otherwise."""
    diff_params = _attach(prob, params, buffers, prob.param_hint, y0.device)
    needs_graph = torch.is_grad_enabled() and (
        y0.requires_grad or grid.requires_grad or t_out.requires_grad or bool(diff_params)
    )
    if not needs_graph:
        # In grad mode every step's result is checked instead: a field over a tensor that requires
        # grad (a closure) would otherwise be differentiated by plain autograd without a word.
        sol, _ = _forward(prob, y0, grid, t_out, store=False, probe=False)
        return sol
    return _apply(prob, y0, grid, t_out, diff_params)


def _common_checks(y0, params, policy):
    if not isinstance(y0, torch.Tensor) or not torch.is_floating_point(y0):
        raise TypeError(f"y0 must be a floating-point tensor, got {getattr(y0, 'dtype', type(y0).__name__)}")
    params = tuple(params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__}")
    policy.check_device(y0.device.type)
    # A dual tensor (forward-mode AD) would lose its tangent in the engine's detached forward.
    if any(torch.autograd.forward_ad.unpack_dual(x).tangent is not None for x in (y0, *params)):
        raise RuntimeError(_HIGHER_ORDER.format(what="forward-mode differentiation (torch.autograd.forward_ad, jvp)"))
    if policy.compute_dtype is not None:
        # Autocast lowers float32 operands only: with a float64 model the state (float32 here) and
        # the weights would meet in one matmul with different dtypes.
        wide = sorted({str(p.dtype).replace("torch.", "") for p in params
                       if p.is_floating_point() and p.dtype.itemsize > torch.finfo(policy.state_dtype).bits // 8})
        if wide:
            raise ValueError(
                f"precision policy {policy.name!r} runs the state in {str(policy.state_dtype).replace('torch.', '')} "
                f"with {str(policy.compute_dtype).replace('torch.', '')} velocities, but the vector field's parameters "
                f"are {', '.join(wide)}. Convert the model to float32 (model.float()) to use {policy.name!r}, or choose "
                "precision='fp64' to keep the float64 model."
            )
    return params


def solve_grid(
    f: Callable,
    y0: torch.Tensor,
    grid: torch.Tensor,
    t_out: torch.Tensor,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    interp: str = "linear",
    perturb: bool = False,
    scaler: AdjointScaler | None = None,
    callback_step: Callable | None = None,
    callback_step_adjoint: Callable | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
) -> torch.Tensor:
    """Solve ``dy/dt = f(t, y)`` on one shared time ``grid`` and return the solution at ``t_out``.

    Args:
        f: ``f(t, y)`` with ``t`` a 0-d tensor in full precision (the promotion of the grid's dtype and
            the state dtype) and ``y`` in the policy's state dtype; called under the policy's autocast.
        y0: initial state, any shape.
        grid: strictly increasing 1-D time grid, ``grid[0] == t_out[0]``.
        t_out: non-decreasing output times inside ``[grid[0], grid[-1]]``; ``t_out[0]`` returns ``y0``
            and ``t_out[j]`` for ``j >= 1`` is interpolated in the step with ``t_n < t_j <= t_{n+1}``
            (``y_{n+1}`` itself when ``t_j == t_{n+1}`` and ``interp == "linear"``).
        tableau, policy: the method and the precision policy.
        params: tensors the adjoint differentiates besides ``y0`` and the times (leaves, or tensors
            computed outside ``f`` such as ``c = encoder(x)``, whose gradient then flows on into
            their graph).  Tensors requiring grad that ``f`` uses but that are missing here raise a
            ``ValueError`` (at the forward, or at the backward step that uses them).
        buffers: module buffers ``f`` may write in place (BatchNorm's running statistics; default:
            ``f.buffers()`` when ``f`` is an ``nn.Module``).  With random numbers drawn by ``f``, they
            are replayed in each recomputed step and left as the forward wrote them.
        interp: ``"linear"`` or ``"cubic"`` (Hermite with the step's end slopes).
        perturb: evaluate the first stage just after ``t_n`` and stages at ``c == 1`` just before
            ``t_{n+1}`` (torchdiffeq's ``perturb``).
        scaler: a persistent :class:`AdjointScaler` for the ``"dynamic"`` scaling mode.
        callback_step: ``callback(t0, y0, dt)`` before each forward step.
        callback_step_adjoint: ``callback(t0, y0, dt)`` before each backward step.
        method: name recorded in the statistics.
        param_hint: how the caller's API declares parameters (ends the hidden-parameter error).

    Returns:
        Tensor of shape ``(len(t_out), *y0.shape)`` in the policy's output dtype.
    """
    params = _common_checks(y0, params, policy)
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interp={interp!r} is not supported; choose one of {', '.join(INTERPOLATIONS)}")
    for name, t in (("time grid", grid), ("output times", t_out)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        _check_time_dtype(name, t)
    if grid.shape[0] < 2 or t_out.shape[0] < 1:
        raise ValueError(f"need at least 2 grid points and 1 output time, got {grid.shape[0]} and {t_out.shape[0]}")
    time_dtype = torch.promote_types(torch.promote_types(grid.dtype, t_out.dtype), policy.state_dtype)
    grid_t = grid.to(device=y0.device, dtype=time_dtype)
    t_out_t = t_out.to(device=y0.device, dtype=time_dtype)

    # Host-side bookkeeping, one synchronisation per solve: which output falls in which step.
    grid_cpu = grid_t.detach().cpu()
    tout_cpu = t_out_t.detach().cpu()
    if not bool(torch.isfinite(grid_cpu).all()) or not bool(torch.isfinite(tout_cpu).all()):
        raise ValueError("time grid and output times must be finite")
    if not bool((grid_cpu[1:] > grid_cpu[:-1]).all()):
        bad = int(torch.nonzero(grid_cpu[1:] <= grid_cpu[:-1])[0])
        raise ValueError(
            f"the time grid must be strictly increasing; grid[{bad}]={grid_cpu[bad].item()!r} >= "
            f"grid[{bad + 1}]={grid_cpu[bad + 1].item()!r}"
        )
    if tout_cpu[0] != grid_cpu[0] or tout_cpu[-1] > grid_cpu[-1] or bool((tout_cpu[1:] < tout_cpu[:-1]).any()):
        raise ValueError(
            "output times must be non-decreasing, start at the grid's first point and end inside the grid "
            f"(grid spans [{grid_cpu[0].item()}, {grid_cpu[-1].item()}], outputs [{tout_cpu[0].item()}, {tout_cpu[-1].item()}])"
        )
    prob = _Problem(
        f=f, tableau=tableau, policy=policy, params=params, outputs=_SharedTimeOutputs(t_out_t, grid_cpu, interp),
        perturb=bool(perturb), scaler=scaler, callback_step=callback_step,
        callback_step_adjoint=callback_step_adjoint, device_type=y0.device.type,
        record=_new_record(method or f"rampde_{tableau.name}", policy.name),
        n_steps=grid_cpu.shape[0] - 1, per_sample=False, param_hint=param_hint,
    )
    return _run(prob, y0, grid_t, t_out_t, params, buffers)


def solve_batched(
    f: Callable,
    y0: torch.Tensor,
    grid: torch.Tensor,
    outputs: BatchedOutputs,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
) -> torch.Tensor:
    """Solve a batch of problems with one time grid per sample (torchode's layout).

    Args:
        f: ``f(t, y)`` with ``t`` of shape ``(B,)`` in the grid's dtype (the problem's time dtype, never
            changed) and ``y`` of shape ``(B, ...)`` in the policy's state dtype.
        y0: ``(B, ...)`` initial states.
        grid: ``(N+1, B)`` per-sample times, monotone in each sample's direction; a sample that needs
            fewer steps repeats its end time (zero-length steps leave its state unchanged).
        outputs: the :class:`BatchedOutputs` plan (output times ``(B, M)`` and the interpolant).
        tableau, policy, params, buffers, scaler, method, param_hint: as in :func:`solve_grid`.

    Returns:
        ``(B, M, ...)`` solution at the output times, in the policy's output dtype.
    """
    params = _common_checks(y0, params, policy)
    _check_time_dtype("time grid", grid)
    t_eval = outputs.t_eval
    if grid.ndim != 2 or grid.shape[1] != y0.shape[0] or grid.shape[0] < 2:
        raise ValueError(f"per-sample grid must have shape (N+1, B={y0.shape[0]}) with N >= 1, got {tuple(grid.shape)}")
    if t_eval.ndim != 2 or t_eval.shape[0] != y0.shape[0] or t_eval.dtype != grid.dtype:
        raise ValueError(f"output times must have shape (B={y0.shape[0]}, M) and the grid's dtype {grid.dtype}")
    grid_cpu = grid.detach().cpu()
    outputs.plan(grid_cpu)
    prob = _Problem(
        f=f, tableau=tableau, policy=policy, params=params, outputs=outputs, perturb=False, scaler=scaler,
        callback_step=None, callback_step_adjoint=None, device_type=y0.device.type,
        record=_new_record(method or f"rampde_{tableau.name}", policy.name),
        n_steps=grid_cpu.shape[0] - 1, per_sample=True, param_hint=param_hint,
    )
    return _run(prob, y0, grid, t_eval, params, buffers)
