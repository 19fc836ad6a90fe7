"""What one evaluation of the vector field writes in place and creates, seen below autograd.

The discrete adjoint recomputes steps, so it must put back every tensor the field writes in place --
not only an ``nn.Module``'s buffers but also a tensor a plain closure writes (``lambda t, y: net(y)``
over a BatchNorm net, a counter in a dict), which no module walk finds.  And it must tell tensors
the field *creates* (a CNF's ``t.detach().clone().requires_grad_()``) from tensors it merely uses.

:class:`FieldWatch` is a ``TorchDispatchMode`` active for one evaluation (the solve's first, and the
first step's graph of a schedule that keeps graphs).  For each operator it sees:

* arguments the operator's schema marks as written (``Tensor(a!)``: in-place ops, ``out=``), and
  BatchNorm's running statistics in training mode (its kernels write them unmarked), whose storage was neither created during the evaluation nor is
  one of the evaluation's inputs: an *external write*.  The first time a storage is written, the
  tensor and a copy of its value before the write are kept -- the replay record adopts them
  (:meth:`rampde_plugins._replay.StepReplay.adopt`);
* outputs that are new tensors (no alias in the schema): their storages are *created* here.

Storages are keyed by their data pointer: an external tensor is alive for the whole evaluation, so
no storage created during it can have its address.  Only the watched evaluations pay the dispatch
overhead; every other evaluation runs as before.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["FieldWatch", "storage_key"]


def storage_key(t: torch.Tensor):
    """The identity of ``t``'s storage (its data pointer), None for tensors without one."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None


_SCHEMA_FACTS: dict = {}


def _schema_facts(func):
    """What the watch needs of an operator's schema, derived once per operator: the arguments it may
    write (index, name, marked written by the schema -- else BatchNorm's running statistics, written
    in training mode), the index of its ``training`` flag (or None), and whether its results are new
    tensors (no alias)."""
    facts = _SCHEMA_FACTS.get(func)
    if facts is None:
        schema = func._schema
        names = [a.name for a in schema.arguments]
        stats = "running_mean" in names and "training" in names
        writes = tuple((i, a.name, bool(a.alias_info is not None and a.alias_info.is_write))
                       for i, a in enumerate(schema.arguments)
                       if (a.alias_info is not None and a.alias_info.is_write)
                       or (stats and a.name in ("running_mean", "running_var")))
        facts = (writes, names.index("training") if stats else None,
                 all(r.alias_info is None for r in schema.returns))
        _SCHEMA_FACTS[func] = facts
    return facts


class FieldWatch(TorchDispatchMode):
    """Record external in-place writes and created storages while active.

    Args:
        inputs: tensors the evaluation receives (state, time): writes to them are not external.
        known: tensors already restored by the caller (module buffers): not reported again.
    """

    def __init__(self, inputs=(), known=()):
        super().__init__()
        self._skip = {k for k in (storage_key(t) for t in (*inputs, *known) if isinstance(t, torch.Tensor)) if k}
        self.created: set = set()
        #: storage key -> (the written tensor, its value before the first write)
        self.written: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        writes, training_at, creates = _schema_facts(func)
        if writes:
            # BatchNorm's kernels (native_batch_norm, cudnn/miopen variants) update the running
            # statistics in training mode although their schema does not mark them written.
            stats_written = training_at is not None and bool(
                args[training_at] if training_at < len(args) else kwargs.get("training"))
            for i, name, marked in writes:
                if not (marked or stats_written):
                    continue
                value = args[i] if i < len(args) else kwargs.get(name)
                for t in (value if isinstance(value, (list, tuple)) else (value,)):
                    if not isinstance(t, torch.Tensor):
                        continue
                    key = storage_key(t)
                    if key and key not in self.created and key not in self._skip and key not in self.written:
                        self.written[key] = (t, t.detach().clone())
        out = func(*args, **kwargs)
        if creates:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    key = storage_key(t)
                    if key:
                        self.created.add(key)
        return out

    def external_writes(self):
        """[(tensor, value before the first write)] for every external storage written."""
        return list(self.written.values())

    def created_here(self, t: torch.Tensor) -> bool:
        """Was ``t``'s storage allocated during the watched evaluation?"""
        key = storage_key(t)
        return bool(key) and key in self.created
