"""Checkpoint schedules: what the forward keeps for the backward, and how the backward gets every
step's graph (its *tape*) back.

A schedule is chosen per solve (``options["checkpoint"]`` in torchdiffeq, ``checkpoint=`` in
torchode) and makes one :class:`Keeper` for it.  The forward driver tells the keeper about each step
(:meth:`Keeper.keep` with the state the step starts from; :meth:`Keeper.tape_now` asks whether to
build this step's graph right away); the reverse sweep then calls :meth:`Keeper.reverse`, which
hands the sweep one tape after another, last step first, building each from what was kept:

=============  ============================================  ===========================================
schedule       kept by the forward                           backward
=============  ============================================  ===========================================
``steps``      every state (storage dtype)                   rebuild each step from its state (small
                                                             steps: up to 16 per VJP, see StepsSchedule)
``graphs``     every step's low-precision autograd graph     reverse the kept graphs: no recomputation
``Segments``   every k-th state (storage dtype)              rebuild k steps at a time: one VJP per k
``Binomial``   c states (state dtype), revolve's positions   recompute from the nearest checkpoint,
                                                             the minimal number of steps for c states
=============  ============================================  ===========================================

``stages=True`` (steps, segments, binomial; explicit methods): a taped step keeps its stage states
instead of its graph, and the backward rebuilds one stage's graph at a time (``_stagewise``): the
same gradient, one stage's graph instead of one step's, one more evaluation per stage.

Binomial schedules come from ``checkpoint-schedules`` (``MultistageCheckpointSchedule``, the
binomial schedule of Griewank and Walther's revolve in Stumm and Walther's formulation), driven
here as its action stream.  Its checkpoints are kept in the *state* dtype, not the storage dtype:
the steps recomputed from a rounded checkpoint would follow another trajectory than the forward
did, and c states cost little.  With adaptive steps the number of steps is known only at the end
of the forward: the forward then keeps only ``y0`` (and the accepted times, as every adaptive solve
does), and the backward runs the whole binomial stream from ``y0`` -- one forward sweep more than a
fixed grid needs (``SolveStats.recomputed_steps`` counts it).
"""

from __future__ import annotations

import math

import torch

from .._storage import ChunkedStore
from ._candidates import StepMeasure, register_budget_candidate
from ._problem import _Carried

__all__ = ["CheckpointSchedule", "StepsSchedule", "GraphsSchedule", "SegmentsSchedule", "BinomialSchedule",
           "checkpoint_schedule", "CHECKPOINT_CHOICES", "StepMeasure", "revolve_advances"]

CHECKPOINT_CHOICES = ("'steps' (default)", "'graphs'", "an integer c >= 1 (binomial, c stored states)",
                      "a rampde_plugins schedule object (StepsSchedule, GraphsSchedule, SegmentsSchedule(k), BinomialSchedule(c))")


class CheckpointSchedule:
    """A checkpoint schedule: what the forward keeps for the backward and how the backward gets each
    step's graph back.  Subclass it to write one; pass an instance as ``checkpoint``.

    What a subclass implements:

    * ``keeper(n_steps, storage) -> Keeper`` -- the per-solve record (``n_steps`` is None for adaptive
      steps, whose number is known only after the forward; see :class:`Keeper`);
    * ``replays_steps(n_steps)`` -- does the backward recompute forward steps (default True);

    and, for :class:`~rampde_plugins.MemoryBudget` to choose it (then registered once with
    ``register_budget_candidate(Family)``, see ``_candidates``):

    * ``predict_peak(m) -> int | None`` -- the peak bytes of a whole solve (forward and backward:
      what it keeps, the graphs its largest VJP reverses, the solution, the adjoint, the VJP's own
      memory) from the measured step ``m`` (a :class:`StepMeasure`), usually through
      ``m.solve_peak(forward_held, backward_held)``; None: no prediction (never chosen);
    * ``steps_run(m)`` and ``vjps(m)`` -- forward + backward steps and the number of VJPs, which order
      the schedules that fit (``budget_cost``);
    * ``budget_instances(m)`` -- the instances of the family a budget may choose, cheapest first (or
      ``within_budget(m, budget)`` directly, e.g. from a closed form).
    """

    name = "schedule"
    #: steps rebuilt per VJP in the backward when that is more than one (SolveStats.segment_steps)
    segment_steps = 0
    #: works with adaptive steps (whose number is known only after the forward)
    adaptive_ok = True
    #: explicit steps are taped stage by stage: the backward holds one stage's graph, not one step's
    #: (``_stagewise``; one more field evaluation per stage)
    stages = False
    #: a second backward through the same solve works (retain_graph=True): nothing kept is freed
    repeatable = True

    def replays_steps(self, n_steps: int | None) -> bool:
        """Does the backward recompute forward steps (so random numbers and buffer writes must be
        replayed)?"""
        return True

    def keeper(self, n_steps: int | None, storage: torch.dtype) -> "Keeper":  # pragma: no cover - interface
        raise NotImplementedError

    # -- what a memory budget asks --------------------------------------------------------------
    def predict_peak(self, m: StepMeasure) -> int | None:
        """Peak bytes of a whole solve under this schedule, predicted from the measured step ``m``
        (see ``_candidates``); None where this schedule does not predict one."""
        return None

    def steps_run(self, m: StepMeasure) -> int:
        """Steps run by the forward and the backward together (with or without a graph)."""
        return 2 * m.n

    def vjps(self, m: StepMeasure) -> int:
        """VJPs the backward takes (each costs autograd's per-call overhead)."""
        return m.n

    def budget_cost(self, m: StepMeasure) -> tuple:
        """What a budget minimises among the schedules that fit, compared in order: sweeps over the
        grid (``ceil(steps_run / N)``: a schedule that saves a fraction of a sweep saves less than its
        bookkeeping costs -- measured, binomial with N - 1 checkpoints is not faster than "steps",
        benchmarks/results/schedules-cpu.md), VJPs (the per-call cost a small field's backward pays
        for most), a backward that can be repeated, then the exact steps run."""
        steps = self.steps_run(m)
        return (-(-steps // max(m.n, 1)), self.vjps(m), not self.repeatable, steps)

    @classmethod
    def budget_instances(cls, m: StepMeasure):
        """The instances of this family a budget may choose for ``m``, cheapest first (none: a
        budget never chooses this family)."""
        return ()

    @classmethod
    def within_budget(cls, m: StepMeasure, budget: int) -> "CheckpointSchedule | None":
        """The cheapest instance of this family whose predicted peak fits ``budget`` bytes, or None."""
        for schedule in cls.budget_instances(m):
            peak = schedule.predict_peak(m)
            if peak is not None and peak <= budget:
                return schedule
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: "steps" groups consecutive step graphs into one VJP while together they stay below this size
GROUP_BYTES = 2**20
#: ... and at most this many steps (measured: 16 steps a VJP are as fast as 64 on a tiny field)
GROUP_MAX = 16


class StepsSchedule(CheckpointSchedule):
    """One stored state per step (in the policy's storage dtype); each step is recomputed once, with a
    graph, in the backward.  Memory: N states + one step's graph.

    ``group``: steps reversed per VJP.  ``None`` (default): as many as keep their graphs under 1 MiB
    together, up to 16, decided on the last step's graph -- a small field's backward is dominated by
    autograd's per-call cost, a large one's is not (and is reversed one step at a time, as ``1``
    does).  Under fp16's dynamic adjoint scaling, whose scale follows the adjoint VJP by VJP, always
    one step per VJP.  Each step of a group still starts from its own stored state (the value is the stored
    one, the adjoint passes to the previous step's end as the identity), so grouping changes the
    gradient only by the order of floating-point sums.

    ``stages=True``: each step is rebuilt keeping only its stage states, and its VJP evaluates one
    stage again at a time (memory: one stage's graph instead of one step's; one more evaluation per
    stage; explicit methods only)."""

    name = "steps"

    def __init__(self, group: int | None = None, *, stages: bool = False):
        self.group = None if group is None else _positive_int("StepsSchedule(group)", "group", group)
        self.stages = _flag("StepsSchedule(stages)", "stages", stages)

    def keeper(self, n_steps, storage):
        return _StatesKeeper(self, n_steps, storage, every=1)

    def _group_size(self, m: StepMeasure) -> int:
        """Steps per VJP (at most: fp16's dynamic scaling reverses one at a time)."""
        if self.group is not None:
            return self.group
        return max(1, min(GROUP_MAX, GROUP_BYTES // max(m.one_graph(), 1)))

    def predict_peak(self, m):
        if m.n_steps is None or self.stages:  # (stage-wise graphs are not measured)
            return None
        held = m.fp(m.n * m.stored)  # one tensor for all states
        return m.solve_peak(held, held + m.widen + m.chain_graph(min(self._group_size(m), m.n)))

    def vjps(self, m):
        return -(-m.n // self._group_size(m))

    @classmethod
    def budget_instances(cls, m):
        # one step per VJP (the least memory "steps" can have; grouping is what segments do)
        return (cls(group=1),)

    def __repr__(self) -> str:
        args = [] if self.group is None else [f"group={self.group}"]
        return f"StepsSchedule({', '.join(args + _stages_arg(self))})"


class SegmentsSchedule(CheckpointSchedule):
    """Every ``k``-th state stored; the backward rebuilds ``k`` steps at a time and takes one VJP for
    the segment (fewer, larger autograd calls: the lever for small fields).  Memory: N/k states + k
    steps' graphs (``stages=True``: k steps' stage states + one stage's graph)."""

    name = "segments"

    def __init__(self, k: int, *, stages: bool = False):
        self.k = _positive_int("SegmentsSchedule(k)", "k", k)
        self.stages = _flag("SegmentsSchedule(stages)", "stages", stages)

    @property
    def segment_steps(self) -> int:
        return self.k

    def keeper(self, n_steps, storage):
        return _StatesKeeper(self, n_steps, storage, every=self.k)

    def predict_peak(self, m):
        if m.n_steps is None or self.stages:  # (stage-wise graphs are not measured)
            return None
        held = m.fp(-(-m.n // self.k) * m.stored)  # one tensor for the kept states
        return m.solve_peak(held, held + m.widen + m.chain_graph(min(self.k, m.n)))

    def vjps(self, m):
        return -(-m.n // self.k)

    @classmethod
    def budget_instances(cls, m):
        # The same steps as "steps" with one VJP per k steps instead of one per step -- what a small
        # field's backward pays for most (benchmarks/results/schedules-cpu.md: problem (b) 1.08x
        # torchdiffeq with k = 16, 1.39x with one VJP per step; k = 64 is no faster than 16, so 16
        # is the largest offered).  Largest first: fewest VJPs.
        return tuple(cls(k) for k in SEGMENT_SIZES if k < m.n)

    def __repr__(self) -> str:
        return f"SegmentsSchedule({', '.join([str(self.k)] + _stages_arg(self))})"


class GraphsSchedule(CheckpointSchedule):
    """Every step's low-precision graph kept from the forward: no recomputation (the cost of direct
    backprop).  The VJP is still taken one step at a time, so the adjoint and the parameter gradients
    are summed over steps in fp32: autocast's weight-cast cache lives for one step only (see
    ``_tape._step_with_cast_cache``), so no bf16/fp16 sum spans steps -- only the ``s`` stages of one
    step share a weight cast, as with every other schedule.  The hidden-tensor walk of a kept graph
    runs in the backward, right before its VJP, as for a recomputed step (the first step's in the
    forward: see ``_tape.check_tape``).  Memory: N steps' graphs.  With adaptive steps every trial
    is built with a graph and a rejected trial's graph is dropped at once; with per-sample steps
    (torchode's layout) each iteration's trial is taped for the whole batch and the rows of the
    samples that rejected it are the identity (``_drivers._mask_tape``)."""

    name = "graphs"
    repeatable = False

    def replays_steps(self, n_steps):
        return False

    def keeper(self, n_steps, storage):
        return _GraphsKeeper(self)

    def predict_peak(self, m):
        if m.n_steps is None:
            return None
        # forward: the graphs of the steps before the last, while the last is built (``m.step``)
        return m.solve_peak(m.all_graphs() - m.graph - m.kept, m.all_graphs(), recomputes=False)

    def steps_run(self, m):
        return m.n

    @classmethod
    def budget_instances(cls, m):
        return (cls(),)


class BinomialSchedule(CheckpointSchedule):
    """Binomial checkpointing (revolve) with ``c`` stored states, ``y0`` one of them: the provably
    minimal number of recomputed steps for ``c`` states and a known number of steps.  Memory: c states
    + one step's graph; with ``stages=True`` c states + one step's stage states + one stage's graph
    (one more evaluation per stage of every reversed step; explicit methods only)."""

    name = "binomial"
    repeatable = False

    def replays_steps(self, n_steps):
        # one step is taped in the forward: nothing is recomputed (but its stages, stage by stage)
        return n_steps != 1 or self.stages

    def __init__(self, c: int, *, stages: bool = False):
        self.c = _positive_int("BinomialSchedule(c)", "c", c)
        self.stages = _flag("BinomialSchedule(stages)", "stages", stages)

    def keeper(self, n_steps, storage):
        return _BinomialKeeper(self, n_steps)

    def predict_peak(self, m):
        if m.n_steps is None or self.stages:  # (stage-wise graphs are not measured)
            return None
        held = min(self.c, m.n) * m.state
        return m.solve_peak(held, held + m.one_graph())

    def steps_run(self, m):
        return revolve_advances(m.n, min(self.c, max(m.n - 1, 1))) + m.n

    @classmethod
    def within_budget(cls, m, budget):
        # The peak grows by one state per checkpoint: the most that fit, from one checkpoint's peak.
        least = cls(1).predict_peak(m)
        if least is None or least > budget:
            return None
        c = m.n if m.state <= 0 else min(m.n, 1 + (budget - least) // m.state)
        return cls(max(int(c), 1))

    def __repr__(self) -> str:
        return f"BinomialSchedule({', '.join([str(self.c)] + _stages_arg(self))})"


#: segment lengths a budget offers, fewest VJPs first
SEGMENT_SIZES = (16, 8, 4, 2)


def revolve_advances(n_steps: int, c: int) -> int:
    """Steps advanced without a graph by binomial checkpointing of ``n_steps`` steps with ``c``
    checkpoints, ``y0`` one of them, the forward sweep included (Griewank's t(l, c)): with ``r`` the
    least number of sweeps for which ``C(c + r, c) >= l``, ``t = r l - C(c + r, r - 1)``."""
    if n_steps <= 1:
        return 0
    if c == 1:  # r = l - 1: every step advanced from y0 again
        return n_steps * (n_steps - 1) // 2
    r = 0
    while math.comb(c + r, c) < n_steps:
        r += 1
    return r * n_steps - math.comb(c + r, r - 1)


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def _flag(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _stages_arg(schedule) -> list[str]:
    return ["stages=True"] if schedule.stages else []


# The families a memory budget chooses from (the chooser names none of them: see _candidates).
register_budget_candidate(GraphsSchedule)
register_budget_candidate(SegmentsSchedule)
register_budget_candidate(StepsSchedule)
register_budget_candidate(BinomialSchedule)


def checkpoint_schedule(spec, *, owner: str = "checkpoint") -> CheckpointSchedule:
    """The schedule for a user's ``checkpoint`` setting: ``"steps"``, ``"graphs"``, an integer ``c``
    (binomial with ``c`` stored states) or a :class:`CheckpointSchedule`."""
    if spec is None or spec == "steps":
        return StepsSchedule()
    if isinstance(spec, CheckpointSchedule):
        return spec
    if isinstance(spec, str):
        if spec == "graphs":
            return GraphsSchedule()
        raise ValueError(f"{owner}={spec!r} is not a checkpoint schedule; choose {', '.join(CHECKPOINT_CHOICES)}")
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"{owner}={spec!r}: a binomial schedule needs at least 1 stored state (y0); "
                             f"choose {', '.join(CHECKPOINT_CHOICES)}")
        return BinomialSchedule(spec)
    raise TypeError(f"{owner} must be {', '.join(CHECKPOINT_CHOICES)}; got {spec!r} ({type(spec).__name__})")


class Keeper:
    """What one solve keeps for its backward (made by a schedule; see the module docstring).

    Forward: ``keep(n, y, k0)`` before step n with its state (state dtype) and its carried first stage
    (or None); ``tape_now(n)``: build step n's graph now and hand it over with ``put_tape``;
    ``end_forward(n_steps)``.  Backward: ``reverse(sweep)``.  ``checkpoints`` and ``nbytes()`` report.
    """

    schedule: CheckpointSchedule
    consumed = False
    checkpoints = 0
    #: steps reversed per VJP when more than one (SolveStats.segment_steps), else 0
    grouped = 0
    #: a fixed-grid forward may tape a group of steps at once (``tape_now`` then covers the group)
    groups_tapes = False

    def keep(self, n, y, k0) -> None:
        pass

    def tape_now(self, n) -> bool:
        return False

    def put_tape(self, n, tape) -> None:  # pragma: no cover - only for keepers that tape
        raise NotImplementedError

    def end_forward(self, n_steps: int) -> None:
        self.n_steps = n_steps

    def nbytes(self) -> int:
        return 0

    def states(self):
        """The stored states in the storage dtype (checked for overflow), or None."""
        return None

    def release_states(self) -> None:
        """Drop the reference to a stored-state tensor that autograd now keeps (save_for_backward)."""

    def use_states(self, states) -> None:
        """Get it back, unpacked, for the backward."""

    def _once(self) -> None:
        # A kept graph is freed by its VJP and binomial checkpoints are dropped as the sweep passes
        # them: a second backward through the same solve has nothing left to work with.
        if self.consumed:
            raise RuntimeError(
                f"checkpoint schedule {self.schedule!r} frees what it kept during the backward, so a second "
                "backward through the same solve (retain_graph=True) is not available; use "
                "checkpoint='steps' (or SegmentsSchedule) for repeated backward passes"
            )
        self.consumed = True


class _StatesKeeper(Keeper):
    """Steps (every=1) and segments (every=k): states in the storage dtype."""

    def __init__(self, schedule, n_steps, storage, every):
        self.schedule, self.every, self.storage = schedule, every, storage
        self.n_steps = n_steps
        self._fixed = None
        # A known grid: one preallocated tensor of exactly the states kept (a ChunkedStore would
        # allocate up to 1 MiB more than the entries: counted in full by CUDA's allocator).
        self._store = ChunkedStore() if n_steps is None else None
        self._k0 = _Carried()

    def keep(self, n, y, k0):
        if n % self.every:
            return
        if self._store is None:  # a known grid: one preallocated tensor
            if self._fixed is None:
                count = -(-self.n_steps // self.every)
                self._fixed = torch.empty((count, *y.shape), dtype=self.storage, device=y.device)
            self._fixed[n // self.every] = y
        else:
            self._store.append(y.to(self.storage))
        if k0 is not None:
            self._k0[n] = k0.to(self.storage)
        self.checkpoints += 1

    def _state(self, n):
        i = n // self.every
        return self._fixed[i] if self._fixed is not None else self._store[i]

    def states(self):
        return self._fixed if self._fixed is not None else self._store

    def release_states(self):
        self._fixed = None

    def use_states(self, states):
        self._fixed = states

    def nbytes(self):
        if self._fixed is not None:
            base = self._fixed.numel() * self._fixed.element_size()
        else:
            base = self._store.nbytes() if self._store is not None else 0
        return base + self._k0.nbytes()

    def reverse(self, sweep):
        last, k = sweep.last, self.every
        if k == 1:
            return self._reverse_grouped(sweep)
        for n0 in range((last // k) * k if last >= 0 else -1, -1, -k):
            n1 = min(n0 + k, last + 1)
            sweep.reverse(sweep.tape(n0, n1, self._state(n0), self._k0.get(n0)))

    def _stored(self, n):
        return self._state(n), self._k0.get(n)

    def _reverse_grouped(self, sweep):
        """Steps: groups of steps per VJP, each step from its own stored state (see StepsSchedule)."""
        n1, group = sweep.last + 1, self.schedule.group
        if sweep.scaling.per_step:  # fp16's dynamic scale is chosen per VJP (see _scaling)
            group = 1
        size = group or 1
        while n1 > 0:
            n0 = max(n1 - size, 0)
            tape = sweep.tape(n0, n1, self._state(n0), self._k0.get(n0), stored=self._stored if n1 - n0 > 1 else None)
            if group is None:  # decided once, on the last step's graph
                size = group = max(1, min(GROUP_MAX, GROUP_BYTES // max(sweep.tape_bytes(tape), 1)))
            sweep.reverse(tape)
            del tape
            n1 = n0
        self.grouped = size if size > 1 else 0


class _GraphsKeeper(Keeper):
    """Every step's tape, built in the forward; nothing is recomputed.  On a fixed grid a tape holds a
    group of steps (``_drivers._tape_group``), reversed by one VJP."""

    groups_tapes = True

    def __init__(self, schedule):
        self.schedule, self._tapes = schedule, []

    def tape_now(self, n):
        return True

    def put_tape(self, n, tape):
        self._tapes.append(tape)

    def nbytes(self):
        return 0  # graphs: measured by the saved-tensor meter, not counted here

    def reverse(self, sweep):
        self._once()
        tapes, self._tapes = self._tapes, []
        for n in range(len(tapes) - 1, -1, -1):
            tape, tapes[n] = tapes[n], None
            if tape.n0 <= sweep.last:
                sweep.reverse(tape)
            del tape


class _BinomialKeeper(Keeper):
    """Drives ``checkpoint_schedules.MultistageCheckpointSchedule``'s action stream."""

    def __init__(self, schedule, n_steps):
        self.schedule, self.c, self.n_steps = schedule, schedule.c, n_steps
        self._snaps: dict[int, tuple] = {}
        self._taped: set = set()
        self._tapes: dict[int, object] = {}
        self.planned = n_steps is not None  # fixed grid: the forward is the stream's first sweep
        if self.planned:
            write, taped = set(), set()
            for action in self._actions(n_steps, until_end_forward=True):
                kind = type(action).__name__
                if kind == "Forward":
                    if action.write_ics:
                        write.add(action.n0)
                    if action.write_adj_deps:
                        taped.update(range(action.n0, action.n1))
            self._write, self._taped = write, taped
        else:
            self._write = {0}

    def _actions(self, n_steps, until_end_forward=False):
        try:
            from checkpoint_schedules import MultistageCheckpointSchedule
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("binomial checkpointing needs the package 'checkpoint-schedules' "
                              "(pip install checkpoint-schedules)") from e
        if n_steps < 1:
            return
        for action in MultistageCheckpointSchedule(n_steps, min(self.c, max(n_steps - 1, 1)), 0):
            kind = type(action).__name__
            if kind == "EndForward" and until_end_forward:
                return
            yield action
            if kind == "EndReverse":
                return

    def keep(self, n, y, k0):
        if n in self._write:
            self._snaps[n] = (y.detach().clone(), None if k0 is None else k0.detach().clone())
            self.checkpoints = max(self.checkpoints, len(self._snaps))

    def tape_now(self, n):
        return n in self._taped

    def put_tape(self, n, tape):
        self._tapes[n] = tape

    def nbytes(self):
        return sum(y.numel() * y.element_size() + (0 if k is None else k.numel() * k.element_size())
                   for y, k in self._snaps.values())

    def reverse(self, sweep):
        self._once()
        snaps, pending = self._snaps, self._tapes  # kept on self while the sweep runs (nbytes)
        at, work = None, None  # position and (state, carried first stage) of the working copy
        started = not self.planned  # a planned stream's forward part already ran in the forward
        peak = len(snaps)
        for action in self._actions(self.n_steps):
            kind = type(action).__name__
            if not started:
                started = kind == "EndForward"
                continue
            if kind == "Forward":
                if at is None and action.n0 == 0 and not self.planned:
                    at, work = 0, snaps[0]
                if at != action.n0:
                    raise RuntimeError(f"internal error: binomial schedule at step {at}, action {action!r}")
                for n in range(action.n0, action.n1):
                    if n == action.n0 and action.write_ics:
                        snaps[n] = work
                        peak = max(peak, len(snaps))
                    if action.write_adj_deps:
                        tape = sweep.tape(n, n + 1, *work) if n <= sweep.last else None
                        work = sweep.after(tape, n, *work)
                        pending[n] = tape
                    else:
                        work = sweep.advance(n, *work)
                at = action.n1
            elif kind == "Reverse":
                for n in range(action.n1 - 1, action.n0 - 1, -1):
                    tape = pending.pop(n)
                    if tape is not None:
                        sweep.reverse(tape)
                    del tape
                at = None
            elif kind in ("Copy", "Move"):
                i = action.n
                at, work = i, (snaps.pop(i) if kind == "Move" else snaps[i])
            elif kind == "EndReverse":
                break
        self.checkpoints = max(self.checkpoints, peak)
        self._snaps, self._tapes = {}, {}
