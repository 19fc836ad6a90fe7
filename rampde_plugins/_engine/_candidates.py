"""What a memory budget chooses from: the measured step (:class:`StepMeasure`) every schedule predicts
its peak from, and the registry of schedule families a budget may choose.

A family enters the chooser by two things of its own: the methods of
:class:`~rampde_plugins.CheckpointSchedule` that predict (``predict_peak``, ``budget_cost``,
``budget_instances`` or ``within_budget``) and one call ``register_budget_candidate(Family)`` in the
file that defines it.  :class:`~rampde_plugins.MemoryBudget` then asks every registered family for
its best instance within the budget and runs the cheapest (``_budget``); it names no schedule.

Peak model (bytes; every figure measured or counted before the forward, see ``_budget.measure_step``).
A schedule says what it holds in each phase; the solve holds the rest whatever the schedule:

* forward, at its worst step: what the schedule keeps by then + the solution + the time grid and
  replay records + one step being computed (``step``: measured, the step built with its graph --
  more than a step without graph holds, so a bound);
* backward, during its largest VJP: what the schedule keeps + the graphs that VJP reverses + the
  solution + what the reverse sweep holds throughout (``adjoint``: the solution's cotangent and its
  accumulation-dtype copy, the adjoint state, the parameter and time gradient sums -- counted) + the
  VJP's own memory beyond the graphs it reverses (``vjp``: measured, see ``_budget.measure_step``)
  + the time grid and replay records; a schedule that rebuilds its tapes in the backward also
  holds, while it builds a tape's last step, the tape's other steps and that step's peak (``step``),
  which can be more than the VJP needs.

The peak is the larger of the two.
"""

from __future__ import annotations

from typing import NamedTuple

from ._memory import footprint

__all__ = ["StepMeasure", "register_budget_candidate", "unregister_budget_candidate", "budget_candidates"]


class StepMeasure(NamedTuple):
    """One step's memory and the solve's fixed memory, measured or counted before a budgeted solve
    (bytes).  ``n_steps`` is None for adaptive steps (known only after the forward)."""

    graph: int  #: G: what one step's graph saves for its backward (no outputs inside)
    output: int  #: one output evaluation's graph inside a step
    replay: int  #: what a recomputed step keeps to see the field's random numbers and buffers again
    state: int = 0  #: S*: one state in the state dtype (binomial checkpoints)
    stored: int = 0  #: S: one state in the storage dtype (the states of steps and segments)
    n_steps: int | None = None  #: steps of a fixed grid; None: adaptive
    counts: tuple = ()  #: output evaluations of each step with outputs (fixed grids)
    times: tuple = (0, 0)  #: the time grid every schedule keeps: fixed bytes, bytes per step
    solution: int = 0  #: the solution tensor the solve returns
    adjoint: int = 0  #: what the reverse sweep holds throughout (cotangent, adjoint, gradient sums)
    vjp: int = 0  #: measured: one step's VJP beyond the graph it reverses
    step: int = 0  #: measured: the peak of one step computed in the forward (with its graph: a bound)
    device: str = "cpu"  #: the device type, whose allocator's granularity :meth:`fp` applies
    kept: int = 0  #: measured: what a step's tape kept until the backward holds beyond its saved graph
    widen: int = 0  #: a stored state made a state-dtype leaf to rebuild from (storage dtype narrower), else 0
    step_data: int = 0  #: a step's stage values and end state (state dtype), see :meth:`chain_graph`

    # Every figure is in the allocator's units (``_memory.footprint``): what the memory a user reads
    # (CUDA's max_memory_allocated, RSS on the CPU) counts for a tensor, not just its elements.

    # -- pieces schedules combine -------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.n_steps or 0

    def fp(self, nbytes: int) -> int:
        """What one allocation of ``nbytes`` occupies (see ``_memory.footprint``)."""
        return footprint(nbytes, self.device)

    def store(self, count: int, entry: int) -> int:
        """What ``count`` entries of ``entry`` bytes take in a ``ChunkedStore``: whole chunks of about
        1 MiB, each allocated in full (on the CPU a chunk's pages become resident as they are
        written, so the resident set holds less: the allocation is what CUDA counts)."""
        if count <= 0:
            return 0
        from .._storage import _CHUNK_BYTES, _MAX_CHUNK

        per = max(1, min(_MAX_CHUNK, _CHUNK_BYTES // max(1, entry)))
        return -(-count // per) * self.fp(per * entry)

    def one_graph(self) -> int:
        """The costliest single step's graph: one step and the outputs of the step with the most."""
        return self.graph + self.output * max(self.counts, default=0)

    def all_graphs(self) -> int:
        """Every step's tape kept (its graph and what it holds besides), with every output evaluation."""
        return self.n * (self.graph + self.kept) + self.output * sum(self.counts)

    def chain_graph(self, k: int) -> int:
        """The graph of k consecutive steps (one VJP's): k step graphs, what each step but the last
        holds besides (the last one's is in ``vjp``; measured on the CPU, one state under bf16: the
        step's end in the state dtype) and, as an upper bound, the output evaluations of the k steps
        with the most of them."""
        most = sorted(self.counts, reverse=True)[:k]
        # (_tape.build_tape keeps the StepData of a step with outputs until the tape is built: in a
        # tape of several steps, that step's stage values and end state outlive it -- measured,
        # bf16 segments of 4 steps with one output inside 8 KiB over the prediction without this)
        held = self.step_data if k > 1 and any(most) else 0
        return k * self.graph + (k - 1) * self.kept + self.output * sum(most) + held

    def grid(self) -> int:
        """The time grid every schedule keeps for the backward."""
        return self.n * self.times[1] + self.times[0]

    def replays(self) -> int:
        """The replay records of all steps (kept by every schedule that recomputes steps)."""
        return self.n * self.replay

    def solve_peak(self, forward: int, backward: int, *, recomputes: bool = True) -> int:
        """The solve's peak given what a schedule holds at its forward's worst step (besides that
        step) and during its largest VJP (including the graphs that VJP reverses).  ``recomputes``:
        the backward rebuilds steps (it keeps replay records, and building the last step of a tape
        can need more than its VJP: ``step - graph`` instead of ``vjp`` on top of the tape)."""
        fixed = self.grid() + (self.replays() if recomputes else 0) + self.solution
        extra = max(self.vjp, self.step - self.graph) if recomputes else self.vjp
        return fixed + max(forward + self.step, backward + self.adjoint + extra)

    def floor(self) -> int:
        """What every budgeted solve holds, whatever it keeps: one state, one step's graph and what
        the solve holds besides (the least any schedule can need)."""
        return self.solve_peak(self.state, self.state + self.one_graph())


_CANDIDATES: list = []


def register_budget_candidate(family):
    """Let :class:`~rampde_plugins.MemoryBudget` choose ``family`` (a
    :class:`~rampde_plugins.CheckpointSchedule` subclass that implements ``predict_peak`` and
    ``budget_instances`` or ``within_budget``).  Returns ``family``, so that it also works as a class
    decorator.  Registering a family twice keeps one entry; earlier registrations win ties."""
    if not isinstance(family, type):
        raise TypeError(f"register_budget_candidate takes a CheckpointSchedule class, got {family!r}")
    if family not in _CANDIDATES:
        _CANDIDATES.append(family)
    return family


def unregister_budget_candidate(family) -> None:
    """The opposite of :func:`register_budget_candidate` (nothing happens if it is not registered)."""
    if family in _CANDIDATES:
        _CANDIDATES.remove(family)


def budget_candidates() -> tuple:
    """The registered families, in registration order."""
    return tuple(_CANDIDATES)
