"""The record one solve's forward and backward share, and the checks around the forward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._policy import PrecisionPolicy
from .._probe import GraphCheck, sequence_mark
from .._replay import StepReplay
from .._scaler import AdjointScaler
from .._storage import ChunkedStore
from .._watch import FieldWatch
from .._tableau import ButcherTableau
from ._steppers import _check_velocity


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
    # steps whose first stage is the previous step's last stage, not f(t_n, y_n): the schedule keeps
    # its value with the step's state and its cotangent flows into the previous step (see _adjoint)
    carried_k0: "_CarriedSteps" = field(default_factory=lambda: _CarriedSteps())
    precomputed: tuple | None = None
    # what recomputed steps must see again (random numbers, buffers); None without a backward
    replay: StepReplay | None = None
    # the hidden-tensor walk over every graph the engine builds
    check: GraphCheck | None = None
    callback_accept_step_adjoint: Callable | None = None
    forward_runs: int = 0
    watch: bool = False  # a forward without adjoint graph, in grad mode: field outputs must not need grad
    # the checkpoint schedule and what it keeps of this solve for the backward
    schedule: object = None
    keeper: object = None
    y_shape: tuple = ()
    # time gradients the backward will be asked for (tapes built in the forward need their leaves)
    need_grid: bool = False
    need_tout: bool = False
    # a memory budget chose the schedule: measure what it holds (SolveStats.peak_bytes)
    measure: bool = False
    held_graph_bytes: int = 0
    time_bytes: tuple = (0, 0)  # the time grid kept for the backward: fixed bytes, bytes per step
    # the method's stepper (_steppers.Stepper: explicit RK, or DIRK with Newton per stage, _implicit)
    stepper: object = None
    # the dtype the field receives its time in, if narrower than the engine's (torchdiffeq: float32
    # for a float32 state while its controller runs in float64): time nudges are taken there
    nudge_dtype: torch.dtype | None = None
    # storages the field created in the forward's first taped step (FieldWatch): leaves among them
    # are the field's own (a CNF's t.requires_grad_()), not hidden tensors, though a kept graph holds them
    created_inside: set = field(default_factory=set)

    def nudge(self, t: torch.Tensor, toward: float) -> torch.Tensor:
        """The next representable time after (``toward=inf``) or before ``t`` *as the field sees it*:
        a float64 nudge of 0.5 rounds back to 0.5 in a float32 field and would land on the wrong side
        of a jump there."""
        with torch.no_grad():
            if self.nudge_dtype is not None and self.nudge_dtype != t.dtype:
                narrow = t.to(self.nudge_dtype)
                return torch.nextafter(narrow, torch.full_like(narrow, toward)).to(t.dtype)
            return torch.nextafter(t, torch.full_like(t, toward))

    def held_extra_bytes(self) -> int:
        """What a budgeted solve holds besides states and graphs: its time grid, its replay records."""
        fixed, per_step = self.time_bytes
        replay = self.replay.stored_bytes() if self.replay is not None and self.replay.active else 0
        return fixed + per_step * self.record.n_steps + replay

    def __post_init__(self):
        if self.schedule is not None:
            self.record.schedule = self.schedule.name
            self.record.segment_steps = self.schedule.segment_steps
            self.record.stage_vjp = getattr(self.schedule, "stages", False)

    def autocast(self):
        cd = self.policy.compute_dtype
        if cd is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=cd)

    def graph_autocast(self):
        """Autocast for building a graph: without autocast's weight-cast cache, so that a cast never
        outlives a step and the gradients of different steps meet at the fp32 weight, not in
        bf16/fp16 (a solve-long cached cast is what makes plain autocast's parameter gradient O(1)
        wrong).  Explicit steps open a nested region whose cache lives for one step
        (``_tape._step_with_cast_cache``): its stages share one cast per weight."""
        cd = self.policy.compute_dtype
        if cd is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=cd, cache_enabled=False)

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
                    nudged = self.nudge(ti, math.inf)
                    if not self.perturb:
                        nudged = torch.where(torch.as_tensor(first_next, device=ti.device), nudged, ti)
                ti = ti + (nudged - ti).detach()
            elif c == 1.0 and (self.perturb or self.nudge_end):
                with torch.no_grad():
                    nudged = self.nudge(ti, -math.inf)
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

    def carry_out(self, ks: list, h) -> torch.Tensor:
        """The first stage a carried next step starts from: this step's last stage -- per sample,
        only where the sample moved (``h != 0``); a sample that did not move keeps the first stage
        it started this step with, as torchode merges its FSAL state with the accept mask."""
        if not self.per_sample or not isinstance(h, torch.Tensor):
            return ks[-1]
        return torch.where(h != 0, ks[-1], ks[0])

    def step(self, y: torch.Tensor, times, h, k0: torch.Tensor | None = None, f=None):
        """One RK step from ``y`` (state dtype): returns (y_next, stage values).

        ``h`` is a Python float when no time gradient is needed and time is shared (then
        ``y + h*sum(a_ij k_j)`` is a chain of fused ``add(alpha=...)`` kernels) or a tensor in the
        state dtype that broadcasts against ``y``.  ``f``: the field to evaluate the stages with
        (default: the solve's; a stage-wise tape passes its checkpointed one, ``_stagewise``).
        """
        return self.stepper.step(y, times, h, k0, f)


class _Carried:
    """Values of carried first stages by step (kept by a schedule with the states), chunk-stored."""

    __slots__ = ("_store", "_index")

    def __init__(self) -> None:
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

    def nbytes(self) -> int:
        return self._store.nbytes()


class _CarriedSteps:
    """Which steps start from the previous step's last stage (adaptive steps; one byte a step)."""

    __slots__ = ("_flags",)

    def __init__(self) -> None:
        self._flags = bytearray()

    def clear(self) -> None:
        self._flags = bytearray()

    def mark(self, n: int) -> None:
        if len(self._flags) <= n:
            self._flags.extend(bytes(n + 1 - len(self._flags)))
        self._flags[n] = 1

    def carries(self, n: int) -> bool:
        return n < len(self._flags) and self._flags[n] == 1


def _probe_first(prob: _Problem, t_first, y):
    """The field's first evaluation, with a graph, checked for hidden tensors; reused as a stage.

    It is watched below autograd (:class:`FieldWatch`): tensors it writes in place that are not
    module buffers (a closure's BatchNorm, a counter) join the replay record, so that recomputed
    steps put them back exactly as module buffers are."""
    mark = sequence_mark()
    replay = prob.replay
    watch = FieldWatch((y, t_first), replay.buffers if replay is not None else ())
    # graph_autocast: autocast's weight-cast cache would keep a leaf the field makes from its state
    # (``y.detach().requires_grad_()``) alive past the probe, and so look like a hidden parameter.
    with torch.enable_grad(), prob.graph_autocast():
        with watch:
            k0 = _check_velocity(prob.f(t_first, y), y, t_first)
        refs, outside = prob.check.scan([k0], (y, t_first), mark)
    if replay is not None:
        replay.adopt(watch.external_writes())
    k0 = k0.detach().to(prob.policy.state_dtype)  # drops the probe's graph before the liveness check
    prob.check.raise_if_hidden(refs, outside)
    return k0


def _with_replay(prob: _Problem, run, store: bool):
    """Run a forward (``run(replaying)``); again, replayed, if the field turned out to draw random
    numbers or write buffers only after its first evaluation (see :mod:`._replay`)."""
    if prob.replay is not None:
        return prob.stepper.deterministic(prob.replay, lambda: _with_replay_once(prob, run, store))
    return _with_replay_once(prob, run, store)


def _with_replay_once(prob: _Problem, run, store: bool):
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


def _check_storage(prob: _Problem, keeper, grid) -> None:
    """A stored state beyond the storage dtype's range (fp16: 65504) would turn every gradient into
    NaN far from its cause: raise at the step where it happened.  NaN from the forward itself is
    not this error: it propagates as with every other policy."""
    storage, state = prob.policy.storage, prob.policy.state_dtype
    if storage == state or torch.finfo(storage).max >= torch.finfo(state).max:
        return
    stored = keeper.states()
    if isinstance(stored, torch.Tensor):
        # In blocks of about 1 MiB: isinf forms |x| in a temporary of the checked tensor's size, which
        # over all N stored states at once was the CPU peak of the default schedule (400 bf16 states
        # of the benchmark's MLP: 19.6 MB on top of the states' 13.1; benchmarks/rss_floor.py).
        flat = stored.reshape(stored.shape[0], -1)
        rows = max(1, 2**20 // max(1, flat.shape[1] * flat.element_size()))
        bad = torch.cat([torch.isinf(b).any(dim=1) for b in flat.split(rows)])
    elif stored:
        bad = torch.cat([torch.isinf(c.reshape(c.shape[0], -1)).any(dim=1) for c in stored.chunks()])
    else:
        return
    if bool(bad.any()):  # one synchronisation per solve, only for narrow storage dtypes
        n = int(torch.nonzero(bad)[0]) * keeper.every
        t = grid[n] if grid.ndim == 1 else grid[n].min()
        raise FloatingPointError(
            f"precision policy {prob.policy.name!r} stores "
            f"{'one state per step' if keeper.every == 1 else f'every {keeper.every}th state'} in {str(storage).replace('torch.', '')} "
            f"(largest value {torch.finfo(storage).max:g}), and the state at step {n} of {prob.n_steps} "
            f"(t = {float(t):.6g}) exceeds it, so the backward could only return inf/NaN. Use a policy with a wider "
            "storage dtype (precision='bf16' has fp32's range; or 'fp32'), or rescale the state."
        )
