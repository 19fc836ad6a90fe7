"""Memory budgets: the checkpoint schedule that does the least recomputation within a memory budget.

``MemoryBudget(bytes)`` is a schedule that decides once per solve.  Before the forward it builds the
first step's graph once (with the field's random-number generators and buffers put back afterwards,
so the solve sees them as if nothing had run) and measures what that graph saves for its backward,
``G``; a stored state costs ``S`` (storage dtype) or ``S*`` (state dtype, binomial checkpoints).
With ``N`` steps known (fixed grids) the predicted peaks are

=====================  =========================  ============================================
schedule               predicted peak             steps run (forward and backward)
=====================  =========================  ============================================
``graphs``             ``N G``                    ``N``: chosen whenever it fits
``SegmentsSchedule``   ``ceil(N/k) S + k G``      ``2 N``, one VJP per ``k`` steps: the largest
                                                  ``k`` of 16, 8, 4, 2 (below ``N``) that fits
``steps``              ``N S + G``                ``2 N``
``BinomialSchedule``   ``c S* + G``               ``t(N, c) + N`` (revolve), ``c`` the most that fit
=====================  =========================  ============================================

(plus the time grid and, for a field with random numbers or buffers, each step's replay record,
which every schedule but ``graphs`` keeps): the first that fits, in this order.  Below ``S* + G``
(one checkpoint) the solve raises before anything runs.  With adaptive steps ``N`` is known only
at the end of the forward: the forward stores states as ``steps`` does while they fit, and if they
stop fitting it drops them (keeping ``y0``) and the backward runs binomial checkpointing with the
most checkpoints that fit (``graphs`` is not considered there).  ``SolveStats`` reports the schedule that ran,
``predicted_bytes`` and ``peak_bytes`` -- the latter measured on the tensors the schedule actually
held (states, checkpoints and the saved tensors of the graphs alive at the time).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch

from ._schedules import (BinomialSchedule, CheckpointSchedule, GraphsSchedule, Keeper, SegmentsSchedule, StepsSchedule,
                         _BinomialKeeper, _StatesKeeper)
from ._schedules import checkpoint_schedule as _named_schedule
from ._outputs import BatchedOutputs
from ._tape import Frame, build_tape

__all__ = ["MemoryBudget", "checkpoint_schedule", "parse_memory_budget", "graph_nbytes", "tape_nbytes",
           "resolve_budget"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_memory_budget(value, *, owner: str = "memory_budget") -> int:
    """Bytes from ``value``: a positive integer, or a string such as ``"512MB"`` or ``"1.5 GiB"``
    (B, KB/MB/GB/TB in powers of 1000, KiB/MiB/GiB/TiB in powers of 1024; case-insensitive)."""
    units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{owner} must be a number of bytes or a string such as '512MB', got {value!r} "
                        f"({type(value).__name__})")
    if isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{owner}={value!r} is not a size; write a number with one of the units {units}, "
                             "e.g. '512MB'")
        nbytes = float(m.group(1)) * _UNITS[unit]
    else:
        nbytes = float(value)
    if not math.isfinite(nbytes) or nbytes < 1:
        raise ValueError(f"{owner}={value!r} must be at least 1 byte")
    return int(nbytes)


def checkpoint_schedule(spec=None, *, memory_budget=None, owner: str = "checkpoint",
                        budget_owner: str = "memory_budget") -> CheckpointSchedule:
    """The schedule for a user's ``checkpoint`` setting -- ``"steps"`` (default), ``"graphs"``, an
    integer ``c`` (binomial with ``c`` stored states) or a :class:`CheckpointSchedule` -- or for a
    ``memory_budget`` (bytes or a size string: a :class:`MemoryBudget`).  Giving both is an error."""
    if memory_budget is not None:
        if spec is not None:
            raise ValueError(f"{owner}={spec!r} and {budget_owner}={memory_budget!r} both choose the checkpoint "
                             f"schedule; give one of them ({budget_owner} lets rampde choose, {owner} fixes it)")
        if isinstance(memory_budget, MemoryBudget):
            return memory_budget
        return MemoryBudget(parse_memory_budget(memory_budget, owner=budget_owner))
    return _named_schedule(spec, owner=owner)


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit} ({int(n)} bytes)"
    return f"{int(n)} bytes"


class MemoryBudget(CheckpointSchedule):
    """The first of ``graphs``, segments (16, 8, 4 or 2 steps per VJP), ``steps`` and binomial with the
    most checkpoints whose predicted peak memory fits ``budget`` bytes (or a size string); see the module docstring for how the
    prediction is made.  Decided per solve."""

    name = "budget"

    def __init__(self, budget):
        self.budget = parse_memory_budget(budget, owner="MemoryBudget(budget)")

    def __repr__(self) -> str:
        return f"MemoryBudget({self.budget})"

    def keeper(self, n_steps, storage):  # pragma: no cover - resolved before any keeper is made
        raise RuntimeError("internal error: a memory budget is resolved into a schedule before the forward")

    def resolve(self, n_steps: int | None, m: "StepMeasure", state: int, stored: int, counts, outputs,
                times: tuple[int, int] = (0, 0)):
        """(schedule, predicted peak bytes) for ``n_steps`` (None: adaptive, predicted at the end of
        the forward) given one step's measure, one state's bytes in the state and the storage dtype,
        the output evaluations of the steps with outputs (``counts``; None when adaptive) and the
        bytes of the time grid every schedule keeps (``times``: fixed part, bytes per step)."""
        budget, replay = self.budget, m.replay
        # the costliest single step (steps, binomial) and all steps (graphs), outputs included
        graph = m.graph + m.output * max(counts or [0])
        graphs = (n_steps or 0) * m.graph + m.output * sum(counts or [])
        # every recomputed step keeps its replay record; every schedule keeps the time grid
        fixed = (n_steps or 0) * (replay + times[1]) + times[0]
        if state + graph + fixed > budget:
            held = f"the time grid ({_fmt(times[0] + (n_steps or 0) * times[1])})"
            if replay and n_steps:
                held += (f" and the replay records of {n_steps} steps ({_fmt(n_steps * replay)}: the field draws "
                         "random numbers or writes buffers, which recomputed steps must see again)")
            raise ValueError(
                f"memory_budget={_fmt(budget)} is below what even one checkpoint needs: one state "
                f"({_fmt(state)}) plus one step's graph ({_fmt(graph)}) plus {held} = {_fmt(state + graph + fixed)}. "
                "Raise the budget to at least that, or make the problem smaller (batch, width), or solve "
                "without a budget, or (explicit methods) choose checkpoint=BinomialSchedule(c, stages=True): its "
                "backward holds one stage's graph instead of one step's."
            )
        c_most = (budget - graph - fixed) // state
        if n_steps is None:
            return _AdaptiveBudget(budget, m, state, outputs, times), None
        grid = n_steps * times[1] + times[0]
        if graphs + grid <= budget:
            return GraphsSchedule(), graphs + grid
        # Then segments of k steps, the largest k that fits: the same steps as "steps" with one VJP
        # per k steps instead of one per step (a budgeted "steps" reverses one step per VJP: its
        # prediction counts one step's graph) -- what a small field's backward pays for most
        # (benchmarks/results/schedules-cpu.md: problem (b) 1.08x torchdiffeq with k = 16, 1.39x with
        # one VJP per step; k = 64 is no faster than 16, so 16 is the largest tried).
        for k in SEGMENT_SIZES:
            if k >= n_steps:
                continue
            peak = -(-n_steps // k) * stored + _segment_graph(m, counts, k) + fixed
            if peak <= budget:
                return SegmentsSchedule(k), peak
        # Then "steps" while its states fit.  (Binomial with c >= N - 1 would run one step fewer, but
        # measured it is not faster -- benchmarks/results/schedules-cpu.md -- and "steps" allows
        # repeated backward passes.)  Below that, binomial with the most checkpoints that fit.
        if n_steps * stored + graph + fixed <= budget:
            # (one step per VJP: the prediction counts one step's graph)
            return StepsSchedule(group=1), n_steps * stored + graph + fixed
        c = int(min(c_most, n_steps))
        return BinomialSchedule(c), c * state + graph + fixed


#: segment lengths a budget tries, fastest first
SEGMENT_SIZES = (16, 8, 4, 2)


def _segment_graph(m: "StepMeasure", counts, k: int) -> int:
    """The graph of k consecutive steps (one VJP's): k step graphs and, as an upper bound, the output
    evaluations of the k steps with the most of them."""
    most = sorted(counts or [], reverse=True)[:k]
    return k * m.graph + m.output * sum(most)


class _AdaptiveBudget(CheckpointSchedule):
    """One adaptive solve under a budget: steps while the states fit, binomial from y0 otherwise."""

    name = "budget"

    def __init__(self, budget, measure: "StepMeasure", state, outputs, times):
        self.budget, self.measure, self.state, self.outputs = budget, measure, state, outputs
        # per step: the replay record and the accepted time(s); fixed: the output times
        self.replay, self.fixed = measure.replay + times[1], times[0]

    def keeper(self, n_steps, storage):
        return _AdaptiveBudgetKeeper(self, storage)

    def __repr__(self) -> str:
        return f"MemoryBudget({self.budget})"


class _AdaptiveBudgetKeeper(Keeper):
    every = 1

    def __init__(self, schedule: _AdaptiveBudget, storage):
        self.schedule = schedule
        self._steps = _StatesKeeper(StepsSchedule(group=1), None, storage, every=1)
        self._binomial = None
        self._y0 = None
        self.predicted = None
        self._seen, self._most = 0, 0  # steps whose outputs were counted; most output evaluations in one

    def _graph(self, upto: int) -> int:
        """The costliest graph of steps ``< upto`` (their outputs are assigned by now), or of one
        step without outputs."""
        outputs = self.schedule.outputs
        for n in range(self._seen, upto):
            entry = outputs.steps.get(n)
            if entry is not None:
                self._most = max(self._most, _evaluations(outputs, entry))
        self._seen = max(self._seen, upto)
        m = self.schedule.measure
        return m.graph + m.output * self._most

    @property
    def active(self):
        return self._steps if self._steps is not None else self._binomial

    def keep(self, n, y, k0):
        if self._y0 is None:  # y0 in the state dtype: binomial's first checkpoint if states stop fitting
            self._y0 = (y.detach().clone(), None if k0 is None else k0.detach().clone())
        if self._steps is None:
            return
        self._steps.keep(n, y, k0)
        s = self.schedule
        if self._steps.nbytes() + self._y0_bytes() + (n + 1) * s.replay + s.fixed + self._graph(n) > s.budget:
            self._to_binomial()
        self.checkpoints = self.active.checkpoints

    def _to_binomial(self) -> None:
        # The states stop fitting: drop them; the backward recomputes from y0 (binomial).
        self._steps = None
        self._binomial = _BinomialKeeper(BinomialSchedule(1), None)
        self._binomial._snaps[0] = self._y0

    def _y0_bytes(self):
        return sum(0 if x is None else x.numel() * x.element_size() for x in self._y0)

    def end_forward(self, n_steps):
        self.n_steps = n_steps
        s, graph = self.schedule, self._graph(n_steps)
        if self._steps is not None:
            self.predicted = self._steps.nbytes() + self._y0_bytes() + n_steps * s.replay + s.fixed + graph
            if self.predicted <= s.budget:
                self._steps.end_forward(n_steps)
                self.checkpoints = self._steps.checkpoints
                return
            self._to_binomial()  # the last steps' outputs made the states too many after all
        replay = n_steps * s.replay + s.fixed
        c_most = (s.budget - graph - replay) // s.state
        if c_most < 1:
            raise ValueError(
                f"memory_budget={_fmt(s.budget)} cannot hold the backward of this adaptive solve: its "
                f"{n_steps} steps keep {_fmt(replay)} of times and replay records (random numbers, buffers), and one "
                f"checkpoint ({_fmt(s.state)}) plus one step's graph ({_fmt(graph)}) do not fit beside it. "
                "Raise the budget, loosen the tolerances (fewer steps) or solve without a budget."
            )
        c = int(min(c_most, max(n_steps, 1)))
        self._binomial.c = c
        self._binomial.end_forward(n_steps)
        self.predicted = c * s.state + graph + replay
        self.checkpoints = self.active.checkpoints

    @property
    def resolved_name(self):
        return "steps" if self._steps is not None else "binomial"

    def nbytes(self):
        if self._steps is not None:
            return self._steps.nbytes() + self._y0_bytes()
        return self._binomial.nbytes()

    def states(self):
        return self._steps.states() if self._steps is not None else None

    def release_states(self):
        if self._steps is not None:
            self._steps.release_states()

    def use_states(self, states):
        if self._steps is not None:
            self._steps.use_states(states)

    def reverse(self, sweep):
        keeper = self.active
        keeper.reverse(sweep)
        self.checkpoints = max(self.checkpoints, keeper.checkpoints)


# -- measuring graphs ---------------------------------------------------------------------------
_SAVED_NAMES: dict = {}


def _saved_values(node):
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = _SAVED_NAMES[type(node)] = tuple(a for a in dir(node) if a.startswith("_saved_"))
    for name in names:
        try:
            yield getattr(node, name)
        except RuntimeError:  # already freed by a backward
            continue
    if hasattr(node, "saved_tensors"):  # a custom autograd.Function's ctx
        try:
            yield node.saved_tensors
        except RuntimeError:
            pass


def graph_nbytes(roots, exclude=()) -> int:
    """Bytes of the tensors the autograd graphs of ``roots`` saved for their backward (each tensor
    once; tensors sharing memory with ``exclude`` -- the parameters -- are not the graph's)."""
    skip = {t.data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
    seen_nodes, seen = set(), set()
    total = 0
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen_nodes:
            continue
        seen_nodes.add(node)
        for value in _saved_values(node):
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if not isinstance(t, torch.Tensor) or t.data_ptr() in skip:
                    continue
                key = (t.data_ptr(), t.numel(), t.dtype)
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen_nodes:
                stack.append(nxt)
    return total


def tape_nbytes(prob, tape) -> int:
    """Saved bytes of one tape's graph (its end state, last stage and outputs)."""
    roots = [tape.y_end, tape.k_last, *(v for _, values, _ in tape.outs for v in values)]
    return graph_nbytes(roots, prob.params)


def _evaluations(outputs, entry) -> int:
    """Output evaluations (with a graph of their own) of one step's entry: one for all the samples
    of a per-sample entry; one per output that is not the step's end state itself."""
    if isinstance(outputs, BatchedOutputs):
        return 1
    return sum(1 for _, exact in entry if not exact)


def _output_counts(outputs) -> list[int]:
    """Per step with outputs: how many output evaluations it makes."""
    return [c for c in (_evaluations(outputs, e) for e in outputs.steps.values()) if c]


def _probe_entry(outputs, y0, grid2):
    """(entry, output times): one output evaluation at the end of the step ``grid2`` to measure its
    graph (entry None: the solve has no outputs after its start)."""
    if isinstance(outputs, BatchedOutputs):
        b = y0.shape[0]
        dev = outputs.t_eval.device
        return (torch.arange(b, device=dev), torch.ones(b, dtype=torch.long, device=dev)), grid2.T.contiguous()
    if outputs.t_out.shape[0] < 2:
        return None, outputs.t_out
    return [(1, False)], grid2


class StepMeasure(NamedTuple):
    """One step's memory, measured before a budgeted solve (bytes)."""

    graph: int  #: the step's graph without outputs
    output: int  #: one output evaluation's graph inside a step
    replay: int  #: what a recomputed step keeps to see the field's random numbers and buffers again


def measure_step(prob, y0: torch.Tensor, grid2: torch.Tensor) -> StepMeasure:
    """Build the step ``grid2[0] -> grid2[1]`` once (with one output evaluation inside), measure
    its graph and drop it.

    The field runs once more than the solve needs (counted in ``forward_nfe``); its random-number
    generators and buffers are put back afterwards, so the solve draws and writes what it would have.
    """
    outputs = prob.outputs
    planned = outputs.steps
    entry, t_probe = _probe_entry(outputs, y0, grid2.detach())

    def step():
        frame = Frame(prob, grid2, t_probe, y0, prob.need_grid, prob.need_tout)
        tape = build_tape(prob, frame, 0, 1, y0.detach().to(prob.policy.state_dtype), None, replay=False)
        graph = graph_nbytes([tape.y_end, tape.k_last], prob.params)
        prob.nfe_extra += tape.nfe
        return graph, tape_nbytes(prob, tape) - graph

    outputs.steps = {} if entry is None else {0: entry}
    try:
        (graph, output), replay = prob.replay.isolated(step)
    finally:
        outputs.steps = planned
    return StepMeasure(graph, output, replay)


def resolve_budget(prob, y0: torch.Tensor, grid2: torch.Tensor, n_steps: int | None, times=(0, 0)) -> None:
    """Replace the solve's :class:`MemoryBudget` by the schedule it chooses (see the module docstring).

    ``times``: bytes of the time grid the backward keeps whatever the schedule (fixed part, per step)."""
    budget = prob.schedule
    m = measure_step(prob, y0, grid2)
    numel = y0.numel()
    state, stored = numel * prob.policy.state_dtype.itemsize, numel * prob.policy.storage.itemsize
    counts = None if n_steps is None else _output_counts(prob.outputs)
    schedule, predicted = budget.resolve(n_steps, m, state, stored, counts, prob.outputs, times)
    prob.schedule, prob.measure = schedule, True
    prob.time_bytes = times
    rec = prob.record
    rec.schedule, rec.memory_budget, rec.step_graph_bytes = schedule.name, budget.budget, m.graph
    rec.segment_steps = schedule.segment_steps
    rec.predicted_bytes = predicted or 0
