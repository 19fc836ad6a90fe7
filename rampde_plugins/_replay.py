"""Replaying a forward step exactly in the backward: random numbers and module buffers.

The discrete adjoint recomputes every step from its stored state.  That recomputation is the
gradient of the forward only if the vector field computes the same function again, and two
everyday fields do not:

* a field that draws random numbers (``nn.Dropout`` in training mode, ``torch.rand*``) would draw
  new ones -- the gradient of a different network;
* a field that writes its module's buffers (``nn.BatchNorm*`` in training mode updates its running
  statistics) would write them once more per recomputation.

:class:`StepReplay` makes the recomputation see what the forward saw, like
``torch.utils.checkpoint(preserve_rng_state=True)`` does for the generators, and goes one step
further for buffers (which checkpoint does not protect):

* **Detection costs nothing per step.**  At the start of a solve it keeps the CPU generator state
  (and that of the state's CUDA device), the buffers' version counters and -- only if the field
  has buffers -- a copy of them.  After the solve's *first* evaluation of the field it compares:
  a field that drew nothing and wrote nothing is never copied again (no per-step generator
  states).  A field that did is replayed: each step keeps the generator states and buffer values
  it started from.
* **A field that starts drawing later** (say only for ``t > 0.5``) is caught at the end of the
  forward, which is then run once more from the states kept at its start, this time replayed.
  Callbacks of that forward run twice.
* **The backward leaves no trace.**  Around the sweep, the user's generator states and buffer
  values are kept and put back afterwards (also when the backward raises): after ``backward()``
  the random stream continues where the forward left it and every buffer holds what the forward
  wrote -- what direct backprop through the same steps leaves.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

__all__ = ["StepReplay"]


class StepReplay:
    """Per-solve record of what each recomputed step must see again (see the module docstring)."""

    __slots__ = ("buffers", "cuda_device", "rng", "mutates", "tokens", "_s0", "_v0", "_b0", "adopted", "last_outside", "_guard")

    def __init__(self, buffers: Sequence[torch.Tensor], device: torch.device):
        # The same tensor may be reachable twice (shared submodules); copy and restore it once.
        seen, unique = set(), []
        for b in buffers:
            if isinstance(b, torch.Tensor) and id(b) not in seen:
                seen.add(id(b))
                unique.append(b)
        self.buffers = unique
        self.cuda_device = device if device.type == "cuda" else None
        self.rng = False  # the field draws random numbers: keep generator states per step
        self.mutates = False  # the field writes buffers: keep buffer values per step
        # key -> (generator states or None, buffer values or None); keys are step indices, and
        # (n, "k0") for a first stage evaluated before step n's trial (adaptive steps)
        self.tokens: dict = {}
        self._s0 = self._b0 = self._v0 = None
        #: (tensor, value before the first write) of every tensor adopted from a field watch
        self.adopted: list = []
        self._guard = None  # what guarded() compares with, while its run runs
        #: what the last :meth:`isolated` run wrote outside the buffers: [(tensor, value before)]
        self.last_outside: list = []

    @property
    def active(self) -> bool:
        return self.rng or self.mutates

    # -- generator states ----------------------------------------------------------------------
    def _rng_state(self):
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.cuda_device) if self.cuda_device is not None else None
        return cpu, cuda

    def _set_rng(self, state) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.cuda_device)

    @staticmethod
    def _same_rng(a, b) -> bool:
        return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))

    def _versions(self):
        return [b._version for b in self.buffers]

    # -- forward -------------------------------------------------------------------------------
    def begin(self) -> None:
        """At the start of the forward, before the field's first evaluation."""
        # The buffer copies are needed only to run the forward again from its start (a field that
        # begins to write its buffers after the first evaluation); one copy per solve, of buffers only.
        self._s0, self._b0, self._v0 = self._snapshot()

    def adopt(self, written) -> None:
        """Replay tensors the field was seen writing in place besides the module buffers (a plain
        closure's BatchNorm, a counter): ``written`` is [(tensor, its value before the first write)]
        (see :class:`rampde_plugins._watch.FieldWatch`).  Call before :meth:`detect`."""
        ids = {id(b) for b in self.buffers}
        for tensor, before in written:
            if id(tensor) in ids:
                continue
            ids.add(id(tensor))
            self.buffers.append(tensor)
            self.adopted.append((tensor, before))
            if self._b0 is not None:
                self._b0.append(before)
                self._v0.append(-1)  # written since the start, whatever its version counter says

    def detect(self) -> bool:
        """After the first evaluation: does the field draw random numbers or write buffers?"""
        self.rng = not self._same_rng(self._rng_state(), self._s0)
        self.mutates = self._written()
        return self.active

    def _written(self, versions=None, values=None) -> bool:
        # Versions, and values too: BatchNorm's kernel writes its running statistics without
        # bumping their version counters (a field calling F.batch_norm on its own buffers).
        versions, values = (self._v0, self._b0) if versions is None else (versions, values)
        return self._versions() != versions or any(not torch.equal(b, b0) for b, b0 in zip(self.buffers, values))

    def isolated(self, run):
        """``run()`` with the generators and buffers put back afterwards, as if it had not run.

        Returns (its result, bytes one step's replay record takes if the field draws random numbers
        or writes buffers as ``run`` did: 0 when it does neither)."""
        from ._watch import FieldWatch  # (the watch sees tensors a closure writes, not only buffers)

        rng, values, versions = self._snapshot()
        watch = FieldWatch(known=self.buffers)
        try:
            with watch:
                out = run()
            outside = watch.external_writes()
            draws, writes = not self._same_rng(self._rng_state(), rng), self._written(versions, values)
        finally:
            self._apply((rng, values))
            with torch.no_grad():
                for tensor, before in watch.external_writes():
                    tensor.copy_(before)
        self.last_outside = outside
        if outside:
            writes = True
            values = [*values, *(before for _, before in outside)]
        nbytes = 0
        if draws:
            nbytes += rng[0].numel() + (rng[1].numel() if rng[1] is not None else 0)
        if writes:
            nbytes += sum(v.numel() * v.element_size() for v in values)
        return out, nbytes

    def guarded(self, run):
        """``(run(), changed, None)``, or ``(None, changed, exception)`` if it raised an Exception;
        ``changed``: it drew random numbers or wrote buffers.  Then, and after an exception, the
        generators and buffers are put back as they were before it."""
        rng, values, versions = self._snapshot()
        n_buffers, n_adopted = len(self.buffers), len(self.adopted)
        out, exc = None, None
        outer, self._guard = self._guard, (rng, values, versions, n_buffers, n_adopted)
        try:
            out = run()
        except Exception as e:  # noqa: BLE001 - handed back to the caller, who raises it
            exc = e
        finally:
            self._guard = outer
        changed = self._changed_since(rng, values, versions, n_buffers, n_adopted)
        adopted = self.adopted[n_adopted:]
        if changed or exc is not None:
            self._apply((rng, values))
            with torch.no_grad():
                for tensor, before in adopted:
                    tensor.copy_(before)
        return out, changed, exc

    def _changed_since(self, rng, values, versions, n_buffers, n_adopted) -> bool:
        # (tensors adopted since -- a closure's writes seen by the probe -- were written)
        return (not self._same_rng(self._rng_state(), rng) or len(self.adopted) > n_adopted
                or self._written(versions[:n_buffers], values))

    def save_state(self):
        """What the field can change, now: the generator states, the buffers' values, and how many
        written tensors have been adopted (:meth:`restore_state` undoes everything since)."""
        rng, values, _ = self._snapshot()
        return rng, values, len(self.adopted)

    def changed_since(self, saved) -> bool:
        """Has the field drawn random numbers or written since :meth:`save_state`?"""
        rng, values, n_adopted = saved
        return (not self._same_rng(self._rng_state(), rng) or len(self.adopted) > n_adopted
                or any(not torch.equal(b, v) for b, v in zip(self.buffers, values)))

    def restore_state(self, saved) -> None:
        """Undo what the field changed since :meth:`save_state` (tensors adopted since included)."""
        rng, values, n_adopted = saved
        self._apply((rng, values))
        with torch.no_grad():
            for tensor, before in self.adopted[n_adopted:]:
                tensor.copy_(before)

    def changed_in_guard(self) -> bool:
        """Inside :meth:`guarded`'s run: has the field drawn random numbers or written buffers so far?"""
        guard = self._guard
        return guard is not None and self._changed_since(*guard)

    def _snapshot(self):
        """(generator states, buffer copies, buffer versions) now: what ``_apply`` and ``_written`` take."""
        return self._rng_state(), [b.detach().clone() for b in self.buffers], self._versions()

    def changed_since_begin(self) -> bool:
        """At the end of a forward that was not replayed: did the field draw or write after all?"""
        return not self._same_rng(self._rng_state(), self._s0) or self._written()

    def restart(self) -> None:
        """Put the generators and buffers back to the forward's start; replay from then on."""
        self.rng = not self._same_rng(self._rng_state(), self._s0)
        self.mutates = self._written()
        self._apply((self._s0, self._b0))
        self.tokens = {}

    def start_token(self):
        """What the field saw at the forward's start (before its first evaluation)."""
        if not self.active:
            return None
        return (self._s0 if self.rng else None, [v.clone() for v in self._b0] if self.mutates else None)

    def snapshot(self):
        """What the field sees now (None when nothing needs replaying)."""
        if not self.active:
            return None
        return (
            self._rng_state() if self.rng else None,
            [b.detach().clone() for b in self.buffers] if self.mutates else None,
        )

    def put(self, key, token) -> None:
        if token is not None:
            self.tokens[key] = token

    def capture(self, key) -> None:
        """Keep what the field sees now as the start of the evaluations recorded under ``key``."""
        if self.active:
            self.tokens[key] = self.snapshot()

    # -- backward ------------------------------------------------------------------------------
    def _apply(self, token) -> None:
        rng, values = token
        if rng is not None:
            self._set_rng(rng)
        if values is not None:
            with torch.no_grad():
                for b, v in zip(self.buffers, values):
                    b.copy_(v)

    def put_back(self, token) -> None:
        """Make the field see again what a :meth:`snapshot` kept (a stage recomputed on its own)."""
        if token is not None:
            self._apply(token)

    def restore(self, key, buffers: bool = True) -> None:
        """Before recomputing the evaluations recorded under ``key``.

        ``buffers=False``: the generator states only -- inside a graph of several steps, where the
        recomputed previous step has just written the very values kept for this one, and writing
        them again in place would invalidate what that step's graph saved (BatchNorm saves its
        running statistics)."""
        token = self.tokens.get(key)
        if token is not None:
            self._apply(token if buffers else (token[0], None))

    @contextlib.contextmanager
    def sweep(self):
        """Around the backward sweep: the user's generators and buffers end as they were."""
        if not self.active:
            yield
            return
        before = self.snapshot()
        try:
            yield
        finally:
            self._apply(before)

    def stored_bytes(self) -> int:
        total = 0
        for rng, values in self.tokens.values():
            if rng is not None:
                total += rng[0].numel() + (rng[1].numel() if rng[1] is not None else 0)
            if values is not None:
                total += sum(v.numel() * v.element_size() for v in values)
        return total
