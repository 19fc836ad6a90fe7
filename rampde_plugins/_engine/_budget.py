"""Memory budgets: the checkpoint schedule that does the least recomputation within a memory budget.

``MemoryBudget(bytes)`` is a schedule that decides once per solve.  Before the forward it runs the
first step once with its graph and one VJP of it (with the field's random-number generators and
buffers put back afterwards, so the solve sees them as if nothing had run) and measures
(:func:`measure_step`): what that graph saves for its backward (``G``), the most memory the step
needs while it runs, and what its VJP needs beyond the graph (autograd's buffers, the gradients it
returns).  It counts the rest: a stored state's bytes ``S`` (storage dtype) or ``S*`` (state dtype,
binomial checkpoints), the solution, its cotangent, the adjoint, the gradient sums and the time grid
(:class:`StepMeasure`).  The budget bounds the peak of the *whole* solve, forward and backward.

Then it asks every registered schedule family (``_candidates.register_budget_candidate``) for its
cheapest instance whose predicted peak fits and runs the cheapest of those
(``CheckpointSchedule.budget_cost``: sweeps over the grid, then VJPs, then a repeatable backward).
The built-in families and what they hold besides what every solve holds (``N`` steps):

=====================  =========================  ============================================
schedule               holds at its peak           steps run (forward and backward)
=====================  =========================  ============================================
``graphs``             ``N G``                    ``N``
``SegmentsSchedule``   ``ceil(N/k) S + k G``      ``2 N``, one VJP per ``k`` steps: the largest
                                                  ``k`` of 16, 8, 4, 2 (below ``N``) that fits
``steps``              ``N S + G``                ``2 N`` (one step per VJP)
``BinomialSchedule``   ``c S* + G``               ``t(N, c) + N`` (revolve), ``c`` the most that fit
=====================  =========================  ============================================

(the graphs with the output evaluations inside them, and for a field with random numbers or buffers
each step's replay record, which every schedule but ``graphs`` keeps).  Below the least any schedule
needs -- one checkpoint, one step's graph and the rest -- the solve raises before anything runs,
with the numbers.  With adaptive steps ``N`` is known only at the end of the forward: the forward
stores states as ``steps`` does while they fit, and if they stop fitting it drops them (keeping
``y0``) and the backward runs binomial checkpointing with the most checkpoints that fit (``graphs``
is not considered there).  ``SolveStats`` reports the schedule that ran, ``predicted_bytes`` (the
predicted peak of the whole solve) and ``peak_bytes`` -- measured on the tensors the schedule itself
held (states, checkpoints and the saved tensors of the graphs alive at the time).

Every figure is in the allocator's units (``_memory.footprint``: CUDA's 512-byte blocks, whole pages
for large CPU allocations).  Not counted: memory that is no tensor -- autograd's graph nodes and
Python objects, host memory (on the CPU about 20 KB per kept step of an RK4 MLP, which matters for
``graphs`` of a small field; see tests/test_budget_peak.py) -- and a kernel's scratch buffers; the
user's loss and what it keeps.
"""

from __future__ import annotations

import math
import re

import torch

from ._candidates import StepMeasure, budget_candidates, register_budget_candidate
from ._memory import LiveBytes, footprint
from ._schedules import (SEGMENT_SIZES, BinomialSchedule, CheckpointSchedule, Keeper, StepsSchedule,  # noqa: F401
                         _BinomialKeeper, _StatesKeeper)
from ._schedules import checkpoint_schedule as _named_schedule
from ._outputs import BatchedOutputs
from ._tape import Frame, build_tape, tape_inputs, tape_roots

__all__ = ["MemoryBudget", "checkpoint_schedule", "parse_memory_budget", "graph_nbytes", "tape_nbytes",
           "resolve_budget", "StepMeasure", "register_budget_candidate", "budget_candidates", "measure_step"]

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


def _too_small(budget: int, m: StepMeasure) -> ValueError:
    """The error of a budget below the least any schedule needs, with the numbers."""
    n = m.n
    held = f"the time grid ({_fmt(m.grid())})"
    if m.replay and n:
        held += (f" and the replay records of {n} steps ({_fmt(m.replays())}: the field draws "
                 "random numbers or writes buffers, which recomputed steps must see again)")
    return ValueError(
        f"memory_budget={_fmt(budget)} is below what even one checkpoint needs: one state "
        f"({_fmt(m.state)}) plus one step's graph ({_fmt(m.one_graph())}) plus {held} plus what every solve "
        f"holds at its peak: the solution ({_fmt(m.solution)}), its cotangent, the adjoint and the gradient sums "
        f"({_fmt(m.adjoint)}) and the memory of one step's VJP beyond its graph ({_fmt(m.vjp)}, measured) = "
        f"{_fmt(m.floor())}. Raise the budget to at least that, or make the problem smaller (batch, width), or "
        "solve without a budget, or (explicit methods) choose checkpoint=BinomialSchedule(c, stages=True): its "
        "backward holds one stage's graph instead of one step's."
    )


class MemoryBudget(CheckpointSchedule):
    """The schedule with the least recomputation whose predicted peak memory -- of the whole solve,
    forward and backward -- fits ``budget`` bytes (or a size string), chosen among the registered
    families (built in: ``graphs``, segments of 16, 8, 4 or 2 steps per VJP, ``steps`` and binomial
    with the most checkpoints that fit); see the module docstring for how the prediction is made.
    Decided per solve."""

    name = "budget"

    def __init__(self, budget):
        self.budget = parse_memory_budget(budget, owner="MemoryBudget(budget)")

    def __repr__(self) -> str:
        return f"MemoryBudget({self.budget})"

    def keeper(self, n_steps, storage):  # pragma: no cover - resolved before any keeper is made
        raise RuntimeError("internal error: a memory budget is resolved into a schedule before the forward")

    def choose(self, m: StepMeasure) -> CheckpointSchedule | None:
        """The cheapest registered schedule whose predicted peak fits (fixed grids), or None."""
        best, best_cost = None, None
        for family in budget_candidates():
            schedule = family.within_budget(m, self.budget)
            if schedule is None:
                continue
            cost = schedule.budget_cost(m)
            if best is None or cost < best_cost:  # (ties: the earlier registered family)
                best, best_cost = schedule, cost
        return best

    def resolve(self, m: StepMeasure, outputs=None):
        """(schedule, predicted peak bytes) for the measured step ``m`` (``m.n_steps`` None: adaptive,
        the prediction is made at the end of the forward and is None here)."""
        if m.n_steps is None:
            if m.floor() > self.budget:  # (binomial from y0 is where an adaptive solve ends up)
                raise _too_small(self.budget, m)
            return _AdaptiveBudget(self.budget, m, outputs), None
        schedule = self.choose(m)
        if schedule is None:
            if m.floor() > self.budget:
                raise _too_small(self.budget, m)
            names = ", ".join(f.__name__ for f in budget_candidates()) or "none"
            raise ValueError(f"memory_budget={_fmt(self.budget)}: none of the checkpoint schedules a budget may "
                             f"choose (registered: {names}) fits, though one checkpoint would ({_fmt(m.floor())}). "
                             "Raise the budget, register BinomialSchedule again or solve without a budget.")
        return schedule, schedule.predict_peak(m)


class _AdaptiveBudget(CheckpointSchedule):
    """One adaptive solve under a budget: steps while the states fit, binomial from y0 otherwise."""

    name = "budget"

    def __init__(self, budget, measure: StepMeasure, outputs):
        self.budget, self.measure, self.state, self.outputs = budget, measure, measure.state, outputs
        # per step: the replay record and the accepted time(s); fixed: the output times
        self.replay, self.fixed = measure.replay + measure.times[1], measure.times[0]

    def peak(self, held: int, graph: int, n_steps: int) -> int:
        """The solve's peak with ``held`` bytes kept, the largest VJP's graph ``graph`` and
        ``n_steps`` steps (see _candidates: forward and backward, the larger): the replay records,
        the accepted times (in chunks: ``StepMeasure.store``), the output times, the solution."""
        m = self.measure
        return self._fixed(n_steps) + max(held + m.step, held + graph + m.adjoint + max(m.vjp, m.step - m.graph))

    def forward_peak(self, held: int, n_steps: int) -> int:
        """The forward's peak with ``held`` bytes kept after ``n_steps`` steps."""
        return self._fixed(n_steps) + held + self.measure.step

    def _fixed(self, n_steps: int) -> int:
        m = self.measure
        return n_steps * m.replay + m.store(n_steps, m.times[1]) + self.fixed + m.solution

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
        self._carries = False  # does a step start from a carried first stage (a checkpoint holds two states)
        self._forward = 0  # the forward's peak while it stored states (predicted)
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
        self._carries = self._carries or k0 is not None
        if self._steps is None:
            return
        s = self.schedule
        # decided before the state is stored: storing it can allocate a new chunk
        held = self._held((y, k0))
        if s.peak(held, self._graph(n), n + 1) > s.budget:
            self._to_binomial()
        else:
            self._steps.keep(n, y, k0)
            self._forward = max(self._forward, s.forward_peak(held, n + 1))
        self.checkpoints = self.active.checkpoints

    def _held(self, new=(None, None)) -> int:
        """What the stored states take (whole chunks: ``StepMeasure.store``) with the state and
        carried first stage ``new`` added, y0 included."""
        steps, m = self._steps, self.schedule.measure
        total = self._y0_bytes()
        size = steps.storage.itemsize
        for store, x in zip((steps._store, steps._k0._store), new):  # the states, the carried first stages
            count, entry = len(store), (store.nbytes() // len(store) if len(store) else 0)
            if x is not None:
                count, entry = count + 1, x.numel() * size
            total += m.store(count, entry)
        return total

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
            self.predicted = s.peak(self._held(), graph, n_steps)
            if self.predicted <= s.budget:
                self._steps.end_forward(n_steps)
                self.checkpoints = self._steps.checkpoints
                return
            self._to_binomial()  # the last steps' outputs made the states too many after all
        # a checkpoint: a state, and the carried first stage with it where steps carry one
        per = s.state * (2 if self._carries else 1)
        least = s.peak(per, graph, n_steps)
        if least > s.budget:
            m = s.measure
            raise ValueError(
                f"memory_budget={_fmt(s.budget)} cannot hold the backward of this adaptive solve: its "
                f"{n_steps} steps keep {_fmt(n_steps * m.replay + m.store(n_steps, m.times[1]) + s.fixed)} of times "
                "and replay records (random "
                f"numbers, buffers), and one checkpoint ({_fmt(per)}) plus one step's graph ({_fmt(graph)}) plus "
                f"the solution ({_fmt(m.solution)}), its cotangent, the adjoint and the gradient sums "
                f"({_fmt(m.adjoint)}) and one VJP's memory beyond its graph ({_fmt(m.vjp)}, measured) -- "
                f"{_fmt(least)} in all -- do not fit. Raise the budget, loosen the tolerances (fewer steps) or "
                "solve without a budget."
            )
        c = int(min(1 + (s.budget - least) // per, max(n_steps, 1)))
        self._binomial.c = c
        self._binomial.end_forward(n_steps)
        # (the forward may have stored states before they stopped fitting: its peak counts too)
        self.predicted = max(s.peak(c * per, graph, n_steps), self._forward)
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


def graph_nbytes(roots, exclude=(), size=None) -> int:
    """Bytes of the tensors the autograd graphs of ``roots`` saved for their backward (each tensor
    once; tensors sharing memory with ``exclude`` -- the parameters -- are not the graph's);
    ``size(nbytes, device_type)`` turns a tensor's bytes into what it occupies (default: as they are)."""
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
                    nbytes = t.numel() * t.element_size()
                    total += nbytes if size is None else size(nbytes, t.device.type)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen_nodes:
                stack.append(nxt)
    return total


def tape_nbytes(prob, tape, size=None) -> int:
    """Saved bytes of one tape's graph (its end state, last stage and outputs)."""
    roots = [tape.y_end, tape.k_last, *(v for _, values, _ in tape.outs for v in values)]
    return graph_nbytes(roots, prob.params, size)


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
    """(entry, output times): one output evaluation in the middle of the step ``grid2`` to measure
    what it holds (entry None: the solve has no outputs after its start)."""
    if isinstance(outputs, BatchedOutputs):
        b = y0.shape[0]
        dev = outputs.t_eval.device
        mid = grid2[0] + 0.5 * (grid2[1] - grid2[0])  # inside the step, as outputs are in general
        return (torch.arange(b, device=dev), torch.ones(b, dtype=torch.long, device=dev)), torch.stack([grid2[0], mid]).T.contiguous()
    if outputs.t_out.shape[0] < 2:
        return None, outputs.t_out
    return [(1, False)], torch.stack([grid2[0], grid2[0] + 0.5 * (grid2[1] - grid2[0])])


def _solution_numel(outputs, y0) -> int:
    """Elements of the solution tensor the solve allocates (``outputs.allocate``)."""
    n_out = outputs.t_eval.shape[1] if isinstance(outputs, BatchedOutputs) else outputs.t_out.shape[0]
    return n_out * y0.numel()


def _adjoint_bytes(prob, y0, solution_numel: int, adaptive: bool, grid_bytes: int, fp) -> int:
    """What the reverse sweep holds from its start to its end (``_adjoint._Sweep``), counted: the
    solution's cotangent (a full tensor at most: the user's loss makes it) and its copy in the
    accumulation dtype where that differs, the adjoint ``a``, the end state's cotangent with an
    output at the step's end folded in (``tape_roots``), the adjoint of a carried first stage
    (adaptive steps), the state-sized tensor the backward's step table is made from, the parameter
    gradient sums and the time gradients."""
    pol = prob.policy
    acc, out = pol.accumulation, pol.output
    numel = y0.numel()
    total = fp(solution_numel * out.itemsize)  # the cotangent of the solution
    if out != acc:
        total += fp(solution_numel * acc.itemsize)  # g = grad_sol.to(acc)
    total += fp(numel * acc.itemsize) * (3 if adaptive else 2)  # a, a + an exact output's cotangent (, a_k)
    total += fp(numel * out.itemsize)  # Frame(..., grad_sol.new_empty(y_shape)) in _backward
    total += sum(fp(p.numel() * torch.promote_types(p.dtype, acc).itemsize) for p in prob.params if p.requires_grad)
    if prob.need_grid or prob.need_tout:
        total += fp(grid_bytes)  # the time gradients (an upper bound: grid and output times)
    return total


def measure_step(prob, y0: torch.Tensor, grid2: torch.Tensor, n_steps: int | None = None,
                 times=(0, 0)) -> StepMeasure:
    """Build the step ``grid2[0] -> grid2[1]`` once (with one output evaluation inside), take one VJP
    of it, measure both and drop them; count the rest of what the solve will hold (see
    :class:`StepMeasure`).

    Measured on the tensors alive (:class:`LiveBytes`, as CUDA's ``max_memory_allocated`` counts):
    ``step``, the most the step holds while it is built; ``vjp``, what the VJP needs beyond the saved
    graph -- the tensors the tape keeps besides its saved ones, the cotangents of its outputs, every
    buffer autograd makes and the gradients it returns.  The VJP keeps its graph to the end
    (``retain_graph``, as fp16's dynamic scaling does): without it autograd frees saved tensors as it
    goes, so the figure is an upper bound for the plain VJP.

    The field runs once more than the solve needs (counted in ``forward_nfe``; its VJP once more
    too, so backward hooks on the field see one call more); its random-number generators and buffers
    are put back afterwards, so the solve draws and writes what it would have.
    """
    outputs = prob.outputs
    planned = outputs.steps
    entry, t_probe = _probe_entry(outputs, y0, grid2.detach())
    pol = prob.policy
    state_dtype, acc = pol.state_dtype, pol.accumulation

    def step():
        frame = Frame(prob, grid2, t_probe, y0, prob.need_grid, prob.need_tout)
        meter = LiveBytes()
        with meter:
            tape = build_tape(prob, frame, 0, 1, y0.detach().to(state_dtype), None, replay=False)
            built, step_peak = meter.current, meter.peak
            # the reverse sweep's VJP of this tape (``_Sweep.reverse``); its adjoint is counted apart
            a = torch.zeros(tape.y_end.shape, dtype=acc, device=tape.y_end.device)
            roots = tape_roots(tape, a, None, None, outputs)[0]
            start = meter.mark()
            # an output's cotangent: a slice of the solution's (shared times), a copy (per sample)
            cot = [a, *(torch.zeros_like(r, dtype=acc) for r in roots[1:])]
            inputs = tape_inputs(tape, [p for p in prob.params if p.requires_grad], frame)
            grads = torch.autograd.grad(roots, inputs, [c.to(state_dtype) for c in cot], allow_unused=True,
                                        retain_graph=True)
            vjp = meter.peak - start
            del grads, cot, roots, a
            graph = graph_nbytes([tape.y_end, tape.k_last], prob.params, footprint)
            tape.k_last = None  # what "graphs" keeps of a tape (see _drivers._forward_once)
            kept = meter.current
            # an output evaluation: what goes with it -- its value, its graph and whatever that
            # keeps alive of the step (measured where the output is inside the step, as in general)
            tape.outs = ()
            output = kept - meter.current
            kept = meter.current
        prob.nfe_extra += tape.nfe
        # What the tape holds beyond its saved graph (its end state, last stage, ...) is there during
        # its VJP too, and a kept tape ("graphs") holds it until the backward.  (The saved graph
        # counts a tensor the meter does not when it saves the step's start, which is the caller's
        # y0 here; in a solve it is the previous tape's end state, which the meter does count: so
        # the difference is what the tape holds besides in both cases.)
        return graph, output, step_peak, vjp + max(0, built - graph - output), max(0, kept - graph)

    outputs.steps = {} if entry is None else {0: entry}
    try:
        # (through the stepper: an implicit one refuses a field that draws or writes, as its forward does)
        (graph, output, step_peak, vjp, kept), replay = prob.stepper.deterministic(
            prob.replay, lambda: prob.replay.isolated(step))
    finally:
        outputs.steps = planned
    numel, device = y0.numel(), y0.device.type

    def fp(nbytes):
        return footprint(nbytes, device)

    sol = _solution_numel(outputs, y0)
    grid_bytes = (n_steps or 0) * times[1] + times[0]
    return StepMeasure(
        graph, output, replay,
        state=fp(numel * state_dtype.itemsize), stored=numel * pol.storage.itemsize, n_steps=n_steps,
        counts=() if n_steps is None else tuple(_output_counts(outputs)), times=tuple(times),
        solution=fp(sol * pol.output.itemsize),
        adjoint=_adjoint_bytes(prob, y0, sol, n_steps is None, grid_bytes, fp),
        vjp=vjp, step=step_peak, device=device, kept=kept,
        widen=fp(numel * state_dtype.itemsize) if pol.storage != state_dtype else 0,
        step_data=(prob.tableau.stages + 1) * fp(numel * state_dtype.itemsize),
    )


def resolve_budget(prob, y0: torch.Tensor, grid2: torch.Tensor, n_steps: int | None, times=(0, 0)) -> None:
    """Replace the solve's :class:`MemoryBudget` by the schedule it chooses (see the module docstring).

    ``times``: bytes of the time grid the backward keeps whatever the schedule (fixed part, per step)."""
    budget = prob.schedule
    m = measure_step(prob, y0, grid2, n_steps, times)
    schedule, predicted = budget.resolve(m, prob.outputs)
    prob.schedule, prob.measure = schedule, True
    prob.time_bytes = times
    rec = prob.record
    rec.schedule, rec.memory_budget, rec.step_graph_bytes = schedule.name, budget.budget, m.graph
    rec.segment_steps = schedule.segment_steps
    rec.predicted_bytes = predicted or 0
