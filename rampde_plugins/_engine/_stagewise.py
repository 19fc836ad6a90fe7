"""Stage-wise step VJPs: an explicit step's graph rebuilt and reversed one stage at a time.

A whole-step tape keeps the autograd graph of all ``s`` field evaluations of a step until its VJP,
so the backward of every schedule holds at least one step's graph.  With ``stages=True`` a schedule's
tapes put each field evaluation behind :class:`_Stage`, an autograd Function that keeps only what
the evaluation started from -- the stage time and the stage state ``Y_i = y + h sum_j a_ij k_j`` --
and evaluates the field again, with a graph, when the step's VJP reaches that stage.  The step's own
linear combinations stay in the tape (they save nothing), so autograd itself carries the adjoint
between stages: ``k_i``'s cotangent is ``h (b_i a + sum_{j>i} a_ji Ybar_j)`` without any algebra here.

Memory: a step's tape holds its ``s - 1`` stage states instead of its graph; its VJP holds one
stage's graph at a time.  Cost: each stage is evaluated once more (``s`` more evaluations per
reversed step), counted in ``backward_nfe``.

The recomputation is the same function of the same inputs as the evaluation it replaces:

* it runs under the solve's graph autocast (the backward itself runs outside any autocast region),
  so the compute dtype and the casts are the forward's; without the per-step weight-cast cache of a
  whole-step tape (``_tape._step_with_cast_cache``) each stage casts its weights itself, so a stage's
  weight gradient reaches fp32 before it meets the other stages' -- the same forward values, sums
  of the gradient in fp32 one level earlier;
* a field that draws random numbers or writes buffers (:mod:`rampde_plugins._replay`) gets back
  the generator states and buffer values it saw at that stage (kept per stage when the solve is
  replayed); the generator state the rest of the backward sees is left as it was;
* its graph is walked for hidden tensors, as every tape's is, and the error names the step.

Only explicit Runge--Kutta steps: an implicit stepper's Newton iterations are not a sequence of
stages with fixed inputs (refused when the solve is set up).
"""

from __future__ import annotations

import torch

from .._probe import sequence_mark
from ._steppers import _check_velocity

__all__ = ["stage_field"]


class _StageRun:
    """What the stage evaluations of one tape share: the problem, the replay record and the step."""

    __slots__ = ("prob", "replay", "n", "t0")

    def __init__(self, prob, replay, n: int, t0):
        self.prob, self.replay, self.n, self.t0 = prob, replay, n, t0

    def where(self) -> str:
        return f" (at step {self.n} of {self.prob.n_steps}, t = {float(torch.as_tensor(self.t0).min()):.6g}, a stage recomputed for its VJP)"


class _Stage(torch.autograd.Function):
    """``k = f(t, y)`` that keeps only ``(t, y)`` and re-evaluates ``f`` with a graph for its VJP.

    ``params``: the solve's parameters that require grad, inputs here so that their gradients flow
    out of the stage (the field reads them itself; they are the same tensors)."""

    @staticmethod
    def forward(ctx, run, t, y, *params):
        rp = run.replay
        ctx.run, ctx.params = run, params
        # what the field sees now, before this evaluation draws or writes anything
        ctx.token = rp.snapshot() if rp is not None else None
        # checked here, not only by the step: a Function cannot return what is not a tensor
        k = _check_velocity(run.prob.f(t, y), y, t)
        if k is y or k is t:  # an output that is an input: autograd needs a tensor of its own
            k = k.clone()
        ctx.save_for_backward(t, y)
        return k

    @staticmethod
    def backward(ctx, grad_k):
        run = ctx.run
        prob, rp = run.prob, run.replay
        t, y = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        params = ctx.params
        with torch.random.fork_rng(devices=[y.device] if y.device.type == "cuda" else [],
                                   enabled=ctx.token is not None and ctx.token[0] is not None):
            if ctx.token is not None:
                rp.put_back(ctx.token)
            with torch.enable_grad(), prob.graph_autocast():
                t_leaf = t.detach().requires_grad_(needs[0])
                y_leaf = y.detach().requires_grad_(True)
                mark = sequence_mark()
                k = prob.f(t_leaf, y_leaf)
        prob.nfe_extra += 1
        refs, outside = prob.check.scan([k], (y_leaf, t_leaf), mark)
        inputs = [x for x, need in zip((t_leaf, y_leaf, *params), needs) if need]
        grads = iter(torch.autograd.grad(k, inputs, grad_k, allow_unused=True) if inputs and k.requires_grad
                     else [None] * len(inputs))
        del k
        prob.check.raise_if_hidden(refs, outside, run.where)
        return (None, *(next(grads) if need else None for need in needs))


def stage_field(prob, n: int, t0, replay):
    """The field for the stages of tape step ``n``: each evaluation behind :class:`_Stage`.

    ``replay``: the solve's replay record when the field draws random numbers or writes buffers
    (each stage then keeps what it saw), else None."""
    run = _StageRun(prob, replay if replay is not None and replay.active else None, n, t0)
    params = tuple(p for p in prob.params if isinstance(p, torch.Tensor) and p.requires_grad)

    def f(t, y):  # (stage times are tensors: rows of the solve's stage-time table, or leaves)
        return _Stage.apply(run, t, y, *params)

    return f
