"""Per-call solver statistics, collected without hand-made counters.

    with rampde_plugins.collect_stats() as stats:
        y = odeint(f, y0, t, method="rampde_rk4")
        y.sum().backward()
    print(stats.last)        # SolveStats(n_steps=..., forward_nfe=..., backward_nfe=..., ...)

A record is created when a solve starts and filled in by its backward whenever that runs (also after
the ``with`` block has closed), so counts are plain Python integers kept next to the solve: no
synchronisation with the device and no global counters.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import asdict, dataclass

__all__ = ["SolveStats", "StatsCollector", "collect_stats", "SavedTensorMeter"]


@dataclass
class SolveStats:
    """What one solve did.  Backward fields stay 0/None until its backward has run."""

    method: str
    policy: str
    n_steps: int = 0
    rejected_steps: int = 0
    n_outputs: int = 0
    forward_nfe: int = 0
    backward_nfe: int = 0
    backward_steps: int = 0
    scale_backoffs: int = 0
    redone_steps: int = 0
    initial_scale: float | None = None
    final_scale: float | None = None
    stored_bytes: int = 0
    backward_done: bool = False
    #: the field drew random numbers or wrote buffers: each step kept them for its recomputation
    replayed: bool = False
    #: 2 when the field began to draw/write only after its first evaluation (the forward was rerun)
    forward_runs: int = 0
    #: the checkpoint schedule that ran: "steps", "graphs", "segments" or "binomial"
    schedule: str = "steps"
    #: steps reversed per VJP when more than one: segments' k, the group of small steps "steps"
    #: reversed together, or the group of kept step graphs "graphs" reverses together; else 0
    segment_steps: int = 0
    #: the schedule reversed explicit steps stage by stage (``stages=True``: one stage's graph at a time)
    stage_vjp: bool = False
    #: states the schedule kept for the backward (peak; binomial: at most its c)
    checkpoints: int = 0
    #: steps whose graph was built (in the forward for "graphs" and revolve's last step, else in the backward)
    taped_steps: int = 0
    #: steps run again without a graph in the backward to reach a taped step (binomial schedules)
    recomputed_steps: int = 0
    #: the memory budget (bytes) that chose ``schedule``, or None
    memory_budget: int | None = None
    #: one step's graph (bytes its autograd graph saves), measured before the forward under a budget
    step_graph_bytes: int = 0
    #: under a budget: the chosen schedule's predicted peak of the whole solve (forward and backward:
    #: states, checkpoints, graphs, replay records, the solution, its cotangent, the VJP's buffers)
    predicted_bytes: int = 0
    #: under a budget: the peak of the same, measured on the tensors the schedule held
    peak_bytes: int = 0
    #: implicit methods: Newton iterations over all implicit stages (forward and recomputed steps)
    newton_iterations: int = 0
    #: implicit methods, adaptive steps: trial steps rejected because Newton's method did not converge
    newton_failures: int = 0
    #: the backward that ran: "discrete" (the steps' exact adjoint, odeint) or "quadrature" (the
    #: Gauss--Legendre quadrature adjoint, odeint_adjoint / QuadratureAdjoint)
    adjoint: str = "discrete"
    #: quadrature adjoint: Gauss--Legendre nodes over all output intervals (one parameter VJP each)
    quadrature_nodes: int = 0
    #: quadrature adjoint: the VJP calls that evaluated those nodes (fewer than the nodes when they are
    #: batched through torch.func.vmap; equal for ``node_batch=1`` or a field vmap cannot map)
    quadrature_calls: int = 0
    #: quadrature adjoint: evaluations of the field at (t0, y0) that check it is one function (and, on
    #: per-sample time lines, that it does not couple the samples); what they draw or write is put back
    field_checks: int = 0
    #: Wong--Zakai solves (rampde_torchsde): K, the Karhunen--Loeve terms of the driving path (0: an ODE)
    noise_terms: int = 0
    #: Wong--Zakai solves: the seed of the path's generator when rampde seeded it (an int ``generator`` or
    #: rampde's own); None for a user's torch.Generator or an ODE
    noise_seed: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class StatsCollector:
    """The records of the solves started inside one :func:`collect_stats` block."""

    def __init__(self) -> None:
        self.records: list[SolveStats] = []

    @property
    def last(self) -> SolveStats:
        if not self.records:
            raise LookupError("no rampde solve ran inside this collect_stats() block")
        return self.records[-1]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def total(self, field: str) -> int:
        """Sum of an integer field over the records (e.g. ``stats.total("forward_nfe")``)."""
        return sum(getattr(r, field) for r in self.records)


_ACTIVE: contextvars.ContextVar[tuple[StatsCollector, ...]] = contextvars.ContextVar("rampde_stats", default=())


@contextlib.contextmanager
def collect_stats():
    """Collect a :class:`SolveStats` record for every rampde solve started in the block (nestable)."""
    collector = StatsCollector()
    token = _ACTIVE.set(_ACTIVE.get() + (collector,))
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def _private_stats():
    """Solves started in the block are counted only by the collector it yields (the inner solves of
    a quadrature adjoint's backward are part of *its* record, not records of their own)."""
    collector = StatsCollector()
    token = _ACTIVE.set((collector,))
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


def _new_record(method: str, policy: str) -> SolveStats:
    record = SolveStats(method=method, policy=policy)
    for collector in _ACTIVE.get():
        collector.records.append(record)
    return record


class SavedTensorMeter:
    """Peak bytes of tensors that autograd keeps alive (saved for backward), via saved_tensors_hooks.

    On a CPU this is the part of memory that grows with the number of steps and the network's
    activations -- the quantity the discrete adjoint is about -- measured exactly and without
    process-wide noise (RSS only grows and includes the allocator's caches).
    """

    def __init__(self, *, unique: bool = False, exclude=()) -> None:
        """``unique``: count memory, not saves -- a tensor saved by several operations (or views of
        one storage with the same extent) once, and tensors sharing memory with ``exclude`` (the
        parameters, which exist anyway) not at all."""
        self.live = 0
        self.peak = 0
        self.unique = unique
        self._skip = {t.data_ptr() for t in exclude}
        self._refs: dict = {}

    def _pack(self, tensor):
        box = _Box(tensor)
        n = tensor.numel() * tensor.element_size()
        if not self.unique:
            self._add(n)
            weakref.finalize(box, self._add, -n)
            return box
        if tensor.data_ptr() in self._skip:
            return box
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        count = self._refs.get(key, 0)
        self._refs[key] = count + 1
        if not count:  # the memory is counted with the first save and freed with the last
            self._add(n)
        weakref.finalize(box, self._drop, key, n)
        return box

    def _add(self, n):
        self.live += n
        self.peak = max(self.peak, self.live)

    def _drop(self, key, n):
        count = self._refs[key] - 1
        if count:
            self._refs[key] = count
        else:
            del self._refs[key]
            self.live -= n

    @staticmethod
    def _unpack(box):
        return box.tensor

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        # Detached: a saved output would otherwise reference its own graph node (a cycle).
        self.tensor = tensor.detach()
