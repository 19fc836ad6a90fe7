"""Finding tensors the vector field uses that the discrete adjoint would not differentiate.

The adjoint returns gradients for what it is told about: the state, the times and the parameters
(an ``nn.Module``'s, or those passed explicitly).  A field that also uses some other tensor that
requires grad -- a closure over a leaf, a module attribute, the output ``c = encoder(x)`` of
another network -- would silently get no gradient for it.  Every graph the engine builds is
therefore checked:

* the forward's first evaluation of the field (the *probe*, reused as the first stage);
* in the backward, every recomputed step -- a tensor the field uses only for ``t > 0.5`` is found
  at the step that uses it (or the group of small steps one VJP reverses);
* a forward that builds no adjoint graph (nothing rampde knows requires grad) but whose field
  output requires grad: the solve would otherwise fall back to plain autograd without a word.

The walk follows ``grad_fn.next_functions`` from the graph's outputs and stops at what is known:
the leaves it differentiates, the ``grad_fn`` of non-leaf parameters, and nodes created *before*
the graph was built (autograd numbers its nodes per thread in creation order): such a node is a
tensor computed outside the field, like ``c = encoder(x)``, and what the user must pass is that
tensor -- not the encoder's parameters, whose graph the per-step VJPs would free after the first
step.  Only weak references to unknown leaves are kept; leaves created inside the field (a CNF's
``x.detach().requires_grad_()``) die with the step's graph and are not reported.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["GraphCheck", "sequence_mark"]

_ACCUMULATE_GRAD = None


def _accumulate_grad_type():
    global _ACCUMULATE_GRAD
    if _ACCUMULATE_GRAD is None:
        leaf = torch.zeros((), requires_grad=True)
        with torch.enable_grad():
            _ACCUMULATE_GRAD = type((leaf * 1).grad_fn.next_functions[0][0])
    return _ACCUMULATE_GRAD


def sequence_mark() -> int:
    """The sequence number the next autograd node created on this thread will (about) get."""
    leaf = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        return (leaf * 1).grad_fn._sequence_nr() + 1


def _describe(tensors) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors[:5]) + (", ..." if len(tensors) > 5 else "")


class GraphCheck:
    """The known tensors of one solve, and the walk that reports anything else.

    Args:
        params: the tensors the adjoint differentiates (leaves or not).
        hint: how the caller's API declares parameters (ends the error message).
    """

    __slots__ = ("params", "hint", "_stop", "_ids", "_acc")

    def __init__(self, params, hint: str):
        self.params = tuple(params)
        self.hint = hint
        self._ids = {id(p) for p in self.params}
        self._stop = {p.grad_fn for p in self.params if p.grad_fn is not None}
        self._acc = _accumulate_grad_type()

    def scan(self, roots, passed=(), mark: int | None = None):
        """Walk the graphs of ``roots``.  Returns (weak refs to unknown leaves, pre-existing nodes).

        ``passed``: further known leaves (the state, time leaves); ``mark``: nodes numbered below it
        were created before this graph (see :func:`sequence_mark`).
        """
        known = self._ids | {id(x) for x in passed}
        seen = set(self._stop)
        stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
        refs, outside = [], []
        acc = self._acc
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if type(node) is acc:
                variable = node.variable
                if id(variable) not in known:
                    refs.append(weakref.ref(variable))
                continue
            if mark is not None and node._sequence_nr() < mark:
                outside.append(node)
                continue
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in seen:
                    stack.append(nxt)
        return refs, outside

    def raise_if_hidden(self, refs, outside, where="", internal=None) -> None:
        """Raise the hidden-tensor error for what is still alive (call after dropping the graph).

        ``where``: a string, or a callable making it -- called only to raise, so that a per-step
        caller does not format (and synchronise on) a time it will almost never print.
        ``internal``: ``internal(leaf) -> bool``, leaves the field created itself (seen by a
        :class:`rampde_plugins._watch.FieldWatch`): alive only because a kept graph holds them."""
        hidden = [v for v in (r() for r in refs) if v is not None and not (internal is not None and internal(v))]
        if not (outside or hidden):
            return
        if callable(where):
            where = where()
        if outside:
            shapes = []
            for node in outside[:5]:
                meta = getattr(node, "_input_metadata", ())
                shapes.append(f"{node.name()} -> {tuple(meta[0].shape)}" if meta else node.name())
            raise ValueError(
                f"the vector field{where} uses {len(outside)} tensor(s) that require grad and were computed "
                f"outside it ({'; '.join(shapes)}), e.g. a closure over c = encoder(x). The discrete adjoint "
                "recomputes every step, so it must differentiate with respect to that tensor itself: pass the "
                "tensor (c), not the parameters of the module that computed it, and its gradient flows on into "
                f"that module -- {self.hint}."
            )
        if hidden:
            raise ValueError(
                f"the vector field{where} uses {len(hidden)} tensor(s) that require grad but are not among the "
                f"parameters rampde differentiates (shapes: {_describe(hidden)}). The discrete adjoint only "
                "returns gradients for parameters it knows: make the function an nn.Module that owns them, or "
                f"{self.hint}."
            )

    def check_output(self, out: torch.Tensor, where: str, mark: int | None = None) -> None:
        """For a forward without an adjoint graph: ``out`` must not require grad."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            refs, outside = self.scan([out], mark=mark)
            del out
            self.raise_if_hidden(refs, outside, where)
            raise ValueError(
                f"the vector field{where} returned a result that requires grad although nothing rampde "
                f"differentiates does; {self.hint}."
            )
