"""The Gauss--Legendre quadrature adjoint: a memory-light backward that re-integrates the state.

Norcliffe & Deisenroth, "Faster Training of Neural ODEs Using Gauss--Legendre Quadrature" (TMLR
2023).  The continuous adjoint (torchdiffeq's ``odeint_adjoint``) integrates ``[x, a, dL/dtheta]``
backward, carrying a parameter-sized vector through every stage of every backward step.  This
adjoint carries only ``[x, a]`` and evaluates the parameter integral separately.  Per output
interval ``[t_{i-1}, t_i]``, last first:

1. the host solves ``x' = f(t, x)``, ``a' = -a^T df/dx(t, x)`` from ``t_i`` back to ``t_{i-1}`` (its
   own controller on ``[x, a]``, or the forward grid reversed), with outputs at ``n`` Gauss--Legendre
   nodes ``u_k`` read off the method's dense output -- VJPs with respect to the state only;
2. ``dL/dtheta += sum_k w_k a(u_k)^T df/dtheta(u_k, x(u_k))`` -- one VJP per node with respect to
   the parameters only, summed in the accumulation dtype;
3. ``x`` restarts from the forward's output ``y_{i-1}`` and ``a`` takes that output's cotangent.

Time gradients are those of the continuous problem: ``dL/dt_i = g_i . f(t_i, y_i)`` for ``i >= 1``
and ``dL/dt_0 = -a(t_0+) . f(t_0, y_0)``.

What it is and is not: the gradient of the continuous ODE, to the tolerance of the backward solve
and the quadrature -- not the exact gradient of the steps that ran (that is the discrete adjoint of
:func:`solve_grid` and friends).  Memory is the outputs plus one backward solve's working set: flat in
the number of steps.  The field must be the same function at every evaluation (the backward
evaluates it at states the forward never visited): a field that draws random numbers or writes
buffers is refused at the forward.

Precision: the field and both VJPs run under the policy's autocast (compute dtype), ``[x, a]`` is
integrated in the state dtype and the parameter sums are kept in the accumulation dtype.  Under a
``"dynamic"`` scaling policy (fp16) each VJP's cotangent is scaled by the power of two that brings
its largest entry to the scaler's target, and redone with the scale backed off if the result
overflows -- per evaluation, because ``a`` can change by orders of magnitude within one solve.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

import torch

from .._policy import PrecisionPolicy
from .._probe import GraphCheck, sequence_mark
from .._replay import StepReplay
from .._watch import FieldWatch
from .._scaler import AdjointScaler, _pow2
from .._stats import _private_stats, collect_stats

__all__ = ["QuadratureOptions", "quadrature_options", "gauss_legendre", "QuadratureProblem", "solve_quadrature",
           "QUADRATURE_OPTIONS"]

#: The quadrature adjoint's options (keys of ``adjoint_options`` in torchdiffeq, of
#: ``QuadratureAdjoint(...)`` in torchode) and what they mean.
QUADRATURE_OPTIONS = {
    "quadrature_nodes": "Gauss--Legendre nodes per output interval: an integer, or 'auto' (default): the rule "
                        "ceil(gtol * forward NFE * interval / span), clamped to [min_nodes, max_nodes]",
    "gtol": "the 'auto' rule's factor (0.25; Norcliffe & Deisenroth use 0.1, see QuadratureOptions)",
    "min_nodes": "floor of the 'auto' rule (8; the rule alone gives 2 nodes on short solves, a ~1e-3 error)",
    "max_nodes": "cap of the 'auto' rule (512)",
    "node_batch": "nodes evaluated together in one torch.func.vmap'ed VJP: an integer, or 'auto' (default): as many "
                  "as make about 256 rows of the state's leading dimensions (1 = one call per node)",
}

#: 'auto' node batches fill about this many rows (nodes x the state's leading dimensions): past a few
#: hundred rows a GEMM reads each weight once for many rows anyway, so bigger batches only cost memory.
_AUTO_ROWS = 256


class QuadratureOptions(NamedTuple):
    """How many Gauss--Legendre nodes each output interval gets (see :data:`QUADRATURE_OPTIONS`).

    Why these defaults: the integrand ``a^T df/dtheta`` varies on the time scale of the steps, and
    Gauss--Legendre converges only once an interval has about one node per forward step -- then
    spectrally.  On torchdiffeq's own ``TestCompareAdjointGradient`` problem (fp64, dopri5 at
    rtol 1e-7, ~45 forward steps per output interval) the parameter gradient's error is 2e-2 with 28
    nodes (the paper's gtol = 0.1, 0.6 nodes per dopri5 step), 1e-3 with 40, 2e-4 with 48 and 6e-6 with
    64 (gtol = 0.25) -- the last equal to the backward solve's own error.  The paper's cap of 64
    nodes per interval would cut that off on longer intervals; the cap here is 512.
    """

    nodes: int | None = None  # fixed count per interval; None: the rule
    gtol: float = 0.25
    min_nodes: int = 8
    max_nodes: int = 512
    #: nodes per vmap'ed VJP; None: 'auto' (see :meth:`batch`)
    node_batch: int | None = None

    def count(self, forward_nfe: int, fraction: float) -> int:
        """Nodes for an interval that is ``fraction`` of the solve's span."""
        if self.nodes is not None:
            return self.nodes
        n = math.ceil(self.gtol * forward_nfe * fraction) if math.isfinite(fraction) else self.max_nodes
        return int(min(max(n, self.min_nodes), self.max_nodes))

    def batch(self, state_shape) -> int:
        """Nodes per vectorised VJP for a state of ``state_shape``.

        Why batch at all: with a small batch each node's VJP is a few matrix-vector-like products that
        read every weight from memory once per node, and its parameter gradient is a full-size tensor
        written and summed once per node.  Evaluated together (``torch.func.vmap``, so the field still
        sees one node's ``(t, x)`` per call, exactly as unbatched), the weights are read once and the
        node sum happens inside one GEMM.  'auto' stops at about :data:`_AUTO_ROWS` rows, where the
        GEMMs are efficient anyway; memory is that many rows' graph."""
        if self.node_batch is not None:
            return self.node_batch
        shape = tuple(state_shape)
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return max(1, _AUTO_ROWS // max(rows, 1))


def quadrature_options(spec: Mapping | QuadratureOptions | None, owner: str) -> QuadratureOptions:
    """Validated :class:`QuadratureOptions` from a mapping with :data:`QUADRATURE_OPTIONS` keys."""
    if spec is None:
        return QuadratureOptions()
    if isinstance(spec, QuadratureOptions):
        spec = {"quadrature_nodes": spec.nodes if spec.nodes is not None else "auto", "gtol": spec.gtol,
                "min_nodes": spec.min_nodes, "max_nodes": spec.max_nodes,
                "node_batch": spec.node_batch if spec.node_batch is not None else "auto"}
    unknown = sorted(set(spec) - set(QUADRATURE_OPTIONS))
    if unknown:
        raise ValueError(f"{owner}: unknown quadrature option(s) {unknown}; valid: {', '.join(QUADRATURE_OPTIONS)}")

    def count(key, value, least, auto=False):
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 1024:
            raise ValueError(f"{owner}: {key}={value!r} must be an integer in [{least}, 1024]"
                             + (" or 'auto'" if auto else ""))
        return value

    nodes = spec.get("quadrature_nodes", "auto")
    if nodes != "auto":
        nodes = count("quadrature_nodes", nodes, 1, auto=True)
    else:
        nodes = None
    gtol = spec.get("gtol", 0.25)
    if isinstance(gtol, bool) or not isinstance(gtol, (int, float)) or not (gtol > 0 and math.isfinite(gtol)):
        raise ValueError(f"{owner}: gtol={gtol!r} must be a positive finite number")
    lo = count("min_nodes", spec.get("min_nodes", 8), 1)
    hi = count("max_nodes", spec.get("max_nodes", 512), 1)
    if lo > hi:
        raise ValueError(f"{owner}: min_nodes={lo} exceeds max_nodes={hi}")
    node_batch = spec.get("node_batch", "auto")
    node_batch = None if node_batch == "auto" else count("node_batch", node_batch, 1, auto=True)
    return QuadratureOptions(nodes, float(gtol), lo, hi, node_batch)


@functools.lru_cache(maxsize=64)
def _leggauss(n: int):
    import numpy

    x, w = numpy.polynomial.legendre.leggauss(n)
    return torch.from_numpy(x), torch.from_numpy(w)


def gauss_legendre(n: int, lo: float, hi: float, dtype=torch.float64):
    """``n`` Gauss--Legendre nodes (increasing) and weights on ``[lo, hi]``: exact for polynomials of
    degree ``2n - 1``."""
    x, w = _leggauss(int(n))
    half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
    return (mid + half * x).to(dtype), (half * w).to(dtype)


class _VJP:
    """One VJP of a field evaluation, its cotangent cast to the evaluation's (compute) dtype.

    ``dynamic`` (fp16): the cotangent is multiplied by ``2**round(log2(target / max|c|))`` and the
    result divided by it in fp32 (exact for powers of two), so that neither a small adjoint underflows
    fp16 nor a large one overflows it; a VJP with inf/NaN is redone with the scale backed off."""

    def __init__(self, policy: PrecisionPolicy, scaler: AdjointScaler | None):
        cfg = scaler._config if scaler is not None else policy.scaler
        self.dynamic = policy.scaling == "dynamic" and (scaler is None or scaler.is_enabled())
        self.target, self.backoff, self.retries = cfg.target, cfg.backoff_factor, cfg.max_retries
        self.backoffs = 0

    def __call__(self, out: torch.Tensor, inputs, cot: torch.Tensor, where, create_graph: bool = False):
        """``where``: a string or a callable making it -- formatted only to raise (a time in it is a
        host sync, and this runs at every evaluation of the backward solve)."""
        if not self.dynamic or create_graph:
            return torch.autograd.grad(out, inputs, cot.to(out.dtype), allow_unused=True, create_graph=create_graph)
        amax = float(cot.abs().amax()) if cot.numel() else 0.0
        scale = _pow2(round(math.log2(self.target) - math.log2(amax))) if amax > 0 and math.isfinite(amax) else 1.0
        for attempt in range(self.retries + 1):
            grads = torch.autograd.grad(out, inputs, (cot * scale).to(out.dtype), allow_unused=True,
                                        retain_graph=attempt < self.retries)
            present = [g for g in grads if g is not None]
            if not present or math.isfinite(float(torch.stack([g.abs().amax().float() for g in present]).amax())):
                break
            # inf/NaN already in the inputs is not an overflow of this VJP: it propagates.
            if not (bool(torch.isfinite(cot).all()) and bool(torch.isfinite(out.detach()).all())):
                break
            if attempt == self.retries:
                raise FloatingPointError(
                    f"fp16 adjoint overflow at {where() if callable(where) else where}: the VJP is still inf/nan after {self.retries} halvings of "
                    f"the adjoint scale (now {scale:g}). Use precision='bf16' (fp32 range) or 'fp32', or bound "
                    "the network's activations."
                )
            scale *= self.backoff
            self.backoffs += 1
        inv = 1.0 / scale
        return tuple(None if g is None else g.float() * inv for g in grads)


class AugmentedField:
    """The backward ODE of ``z = [x, a]`` (stacked along ``stack_dim``, or concatenated along the last
    dimension when it is None): ``[f(t, x), -a^T df/dx]``.

    A host solves it from ``t_i`` to ``t_{i-1}`` with its own machinery (decreasing time, so its
    controller sees the true direction); callbacks a host needs on the field may be set as attributes.
    """

    def __init__(self, f: Callable, vjp: _VJP, stack_dim: int | None = 0):
        self.f, self.vjp, self.stack_dim = f, vjp, stack_dim
        self.nfe = 0
        #: a GraphCheck run on the next evaluation's graph (then dropped), or None
        self.check = None

    def _check(self, check, t, x) -> None:
        self.nfe += 1
        mark = sequence_mark()
        out = self.f(t, x)
        self._report(check, check.scan([out], (x,), mark), t)

    @staticmethod
    def _report(check, scanned, t) -> None:
        check.raise_if_hidden(*scanned, lambda: f" (at the backward solve's evaluation at t = {_when(t)})")

    def split(self, z, lead: int = 0):
        """``(x, a)`` of ``z``, or of a stack of them along ``lead`` leading dimensions."""
        if self.stack_dim is None:  # concatenated features: (batch, 2 * features)
            return z.chunk(2, dim=-1)
        return z.unbind(self.stack_dim + lead)

    def join(self, x, a):
        if self.stack_dim is None:
            return torch.cat([x, a], dim=-1)
        return torch.stack([x, a], dim=self.stack_dim)

    def __call__(self, t, z):
        # An implicit method's Newton iteration differentiates the field itself (z requires grad in
        # grad mode): then the VJP is taken with a graph (a double backward of f); otherwise detached.
        graph = torch.is_grad_enabled() and z.requires_grad
        x, a = self.split(z)
        self.nfe += 1
        with torch.enable_grad():
            x_ = x if graph else x.detach().requires_grad_(True)
            check, self.check = self.check, None
            if check is not None and graph:
                # The check reads a graph that starts at a leaf state; here x is part of Newton's graph
                # (an implicit backward), so the check gets an evaluation of its own, once.
                self._check(check, t, x.detach().requires_grad_(True))
                check = None
            mark = sequence_mark() if check is not None else None
            fx = self.f(t, x_)
            if check is not None:
                self._report(check, check.scan([fx], (x_,), mark), t)
            if type(fx) is not torch.Tensor or fx.shape != x.shape or not fx.dtype.is_floating_point:
                raise ValueError(
                    f"the vector field must return a floating-point tensor of the state's shape {tuple(x.shape)}, "
                    f"got {getattr(fx, 'dtype', type(fx).__name__)} of shape {tuple(getattr(fx, 'shape', ()))}"
                )
            if fx.requires_grad:
                (gx,) = self.vjp(fx, (x_,), a, lambda: f"the backward solve's evaluation at t = {_when(t)}",
                                 create_graph=graph)
            else:
                gx = None
        gx = torch.zeros_like(x) if gx is None else gx
        if not graph:
            fx = fx.detach()
        return self.join(fx.to(z.dtype), -gx.to(z.dtype))


@dataclass
class QuadratureProblem:
    """What a host hands the quadrature adjoint.

    Attributes:
        f: ``f(t, y)`` in the solve's time (a 0-d tensor of any float dtype; the host casts it) and
            the state dtype of ``policy``; called under the policy's autocast.
        policy: the forward's precision policy.
        forward: ``forward(y0) -> (len(t), *y0.shape)`` outputs -- the host's solve, run without graph.
        backsolve: ``backsolve(field, z0, times) -> (len(times), *z0.shape)``: solve ``field`` (an
            :class:`AugmentedField`) from ``times[0]`` through the strictly decreasing ``times``
            (float64, ``[t_i, nodes..., t_{i-1}]``) with the host's adjoint settings.
        options: node rule.
        params: the tensors differentiated besides ``y0`` and ``t``.
        buffers: the field's buffers (a field that writes them is refused).
        hint: how the caller's API declares parameters (ends the hidden-tensor error).
        unused_zero: parameters the field does not use get zeros, not None (torchdiffeq's
            ``odeint_adjoint`` convention).
        stack_dim: where ``[x, a]`` is stacked; None: concatenated along the last dimension (torchode's
            ``(batch, 2 * features)``).
        batched_time: per-sample times: ``t`` is ``(n, batch)`` (time-major, like the outputs), ``f``
            and ``backsolve`` get ``(batch,)`` / ``(len(times), batch)`` times, and every sample's
            interval gets its own nodes (the same count for all, scaled to its length).
    """

    f: Callable
    policy: PrecisionPolicy
    forward: Callable
    backsolve: Callable
    options: QuadratureOptions = QuadratureOptions()
    params: tuple = ()
    buffers: tuple = ()
    hint: str = "pass them in params"
    scaler: AdjointScaler | None = None
    unused_zero: bool = False
    stack_dim: int | None = 0
    batched_time: bool = False
    method: str = ""
    implicit: bool = False  # the forward's method is implicit (Newton): a field that writes is refused
    record: object = field(default=None, repr=False)
    host: object = field(default=None, repr=False)  # host data the backward reads (torchdiffeq: adjoint_options)


_RANDOM = (
    "{owner} runs the quadrature adjoint, which integrates the state backward and evaluates the vector "
    "field at states the forward never visited, so the field must be the same function at every evaluation -- "
    "this one returned another value at the same (t, y): it draws new random numbers at "
    "each evaluation (dropout) or its value depends on what it writes. (Writes that do not change what it "
    "returns -- a call counter, BatchNorm's running statistics, a draw made once and cached -- are fine.) Put "
    "the module in eval() mode, or use {instead}, whose exact discrete adjoint replays random numbers and "
    "buffers step by step."
)


_IMPLICIT = (
    "{owner}: method {method!r} is implicit: Newton's method evaluates the vector field several times per stage, "
    "so the field must be the same function at every evaluation -- this one draws random numbers or writes "
    "buffers (dropout, BatchNorm in training mode, a call counter). Put the module in eval() mode, or use an "
    "explicit method"
)


_COUPLED = (
    "{owner} runs the quadrature adjoint on per-sample time lines (each sample takes its own steps), but the "
    "vector field couples the samples of the batch -- the other samples' velocities changed when only the "
    "first sample's state did (BatchNorm in training mode, a mean over the batch). The backward solves would "
    "evaluate it with the samples at other times than the forward did. Use {instead}, whose exact discrete "
    "adjoint differentiates the steps that ran, or put the module in eval() mode."
)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.equal(a, b)) or bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same_value(x, y) for x, y in zip(a, b))
    return a is b or a == b


_FIRST_ORDER = (
    "{owner} runs rampde's Gauss--Legendre quadrature adjoint, which provides first-order gradients only (its "
    "backward integrates the state and its adjoint without a graph of its own), so {what} through it is not "
    "available. For Hessian-vector products or gradient penalties use {autograd}, which backpropagates through "
    "the steps with autograd."
)


def solve_quadrature(qp: QuadratureProblem, y0: torch.Tensor, t: torch.Tensor, *, owner: str = "the solve",
                     instead: str = "the discrete adjoint",
                     autograd: str = "the host library's own method with the same tableau") -> torch.Tensor:
    """Outputs of ``qp.forward(y0)`` at ``t`` whose backward is the quadrature adjoint.

    ``owner``: the call as the user wrote it (starts error messages); ``instead``: the route with the
    discrete adjoint (suggested for fields that draw random numbers); ``autograd``: a solver that
    backpropagates through its steps (suggested for second derivatives)."""
    qp.owner, qp.instead, qp.autograd = owner, instead, autograd
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(_first_order(qp, "a torch.func transform (grad, vmap, jacrev, jacfwd, hessian)"))
    return _QuadratureAdjoint.apply(qp, y0, t, *qp.params)


def _first_order(qp: QuadratureProblem, what: str) -> str:
    return _FIRST_ORDER.format(owner=qp.owner, what=what, autograd=qp.autograd)


class _QuadratureAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: QuadratureProblem, y0, t, *params):
        # The field must be one function of (t, y) -- the backward evaluates it at states the forward
        # never visited.  What it writes without changing what it returns (a call counter, BatchNorm's
        # running statistics in training mode, a draw made at its first call and cached) is fine and
        # stays, as torchdiffeq's own adjoint leaves it.  Checked at (t0, y0): its first evaluation
        # (watched: tensors a closure writes can be put back) must agree bitwise with one right after
        # it and with one after the forward (both undone); otherwise -- new random numbers at each
        # evaluation, a value that depends on what it wrote -- it is refused with everything put back.
        replay = StepReplay(qp.buffers, y0.device)
        y0d = y0.detach()
        saved = replay.save_state()
        checks = 0
        try:
            watch = FieldWatch((y0d, t[0]), replay.buffers)
            with torch.no_grad(), watch:
                first = qp.f(t[0], y0d)
            replay.adopt(watch.external_writes())
            if qp.implicit and replay.changed_since(saved):
                # Newton's iterations evaluate the field many times per stage (as the discrete adjoint refuses)
                raise ValueError(_IMPLICIT.format(owner=qp.owner, method=qp.method))
            with torch.no_grad():
                again, _ = replay.isolated(lambda: qp.f(t[0], y0d))
            checks += 1
            if not _same_value(first, again):
                raise ValueError(_RANDOM.format(owner=qp.owner, instead=qp.instead))
            if qp.batched_time and y0d.ndim >= 1 and y0d.shape[0] > 1:
                # Per-sample time lines (torchode): a field that couples the samples (BatchNorm in
                # training mode) would be evaluated at mismatched times by the backward solves.
                moved = y0d.clone()
                moved[0] = moved[0] * 1.5 + 0.25
                with torch.no_grad():
                    other, _ = replay.isolated(lambda: qp.f(t[0], moved))
                checks += 1
                if not _same_value(first[1:], other[1:]):
                    raise ValueError(_COUPLED.format(owner=qp.owner, instead=qp.instead))
            with collect_stats() as mine:
                sol = qp.forward(y0d)
            with torch.no_grad():
                again, _ = replay.isolated(lambda: qp.f(t[0], y0d))
            checks += 1
            if not _same_value(first, again):
                raise ValueError(_RANDOM.format(owner=qp.owner, instead=qp.instead))
        except BaseException:
            replay.restore_state(saved)
            raise
        qp.record = mine.records[0] if mine.records else None
        if qp.record is not None:
            qp.record.adjoint = "quadrature"
            qp.record.field_checks = checks
        ctx.qp = qp
        ctx.y0_dtype = y0.dtype
        if qp.host is not None:
            ctx.adjoint_options = getattr(qp.host, "adjoint_options", None)
        # The parameters themselves, not through save_for_backward: a saved-tensor hook (save_on_cpu,
        # a meter) unpacks copies, and the node VJPs must reach the very tensors the field uses.
        ctx.params = params
        ctx.save_for_backward(sol, t)
        return sol

    @staticmethod
    def backward(ctx, grad_sol):
        if torch.is_grad_enabled():
            raise RuntimeError(_first_order(ctx.qp, "create_graph=True (a second derivative)"))
        sol, t = ctx.saved_tensors
        params = ctx.params
        needs = ctx.needs_input_grad
        g_y0, g_t, g_params = _backward(ctx.qp, sol, t, params, grad_sol, needs[1:3], needs[3:])
        return (None, g_y0.to(ctx.y0_dtype) if needs[1] else None, g_t, *g_params)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_first_order(ctx.qp, "forward-mode differentiation (torch.autograd.forward_ad, jvp)"))


def _when(t) -> str:
    """A time for an error message: a number, or the range of a per-sample batch of times."""
    t = torch.as_tensor(t).detach()
    if t.numel() == 1:
        return f"{float(t):.6g}"
    return f"[{float(t.min()):.6g}, {float(t.max()):.6g}] (per sample)"


def _backward(qp: QuadratureProblem, sol, t, params, grad_sol, need_yt, need_params):
    pol = qp.policy
    acc, state = pol.accumulation, pol.state_dtype
    dev = grad_sol.device
    batched = qp.batched_time  # t: (n, batch), else (n,)
    want = [i for i, p in enumerate(params) if need_params[i]]
    diff = [params[i] for i in want]
    sums = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc)) for p in diff]
    touched = [False] * len(diff)
    g = grad_sol.to(acc)
    tt = t.detach().to(device=dev, dtype=torch.float64)
    n_out = t.shape[0]
    # Each interval's share of the solve's span (the node rule's input), and whether it has any length
    # at all; per-sample times: the largest share over the samples (one node count for the batch).
    lengths = tt[1:] - tt[:-1]
    span = tt[-1] - tt[0]
    if batched:
        share = torch.where(span != 0, lengths / torch.where(span != 0, span, 1.0), 0.0).amax(dim=1).tolist()
        has_length = (lengths != 0).any(dim=1).tolist()
    else:
        s = float(span)
        share = (lengths / s).tolist() if s else [1.0] * (n_out - 1)
        has_length = [True] * (n_out - 1)

    def dot(u, v):  # <u, v> per sample (batched) or in all
        return (u * v).reshape(u.shape[0], -1).sum(dim=1) if batched else (u * v).sum()

    vjp = _VJP(pol, qp.scaler)
    aug = AugmentedField(qp.f, vjp, qp.stack_dim)
    if qp.host is not None and hasattr(qp.host, "decorate"):
        qp.host.decorate(aug)
    g_t = torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, acc), device=dev) if need_yt[1] else None
    check = GraphCheck(params, qp.hint)
    checked = False
    rec = qp.record
    forward_nfe = rec.forward_nfe if rec is not None else 0
    extra_nfe, total_nodes, node_calls = 0, 0, 0
    per_call = qp.options.batch(sol.shape[1:])
    vectorise = per_call > 1
    cd = pol.compute_dtype
    device_type = sol.device.type

    def autocast(cache: bool = True):
        if cd is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=cd, cache_enabled=cache)

    def flow(i: int) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return qp.f(tt[i], sol[i].to(state)).to(acc)

    if not diff:
        # No parameter is differentiated, so no node runs the hidden-tensor check: the backward solve's
        # first evaluation does (a tensor the field closes over would otherwise get no gradient
        # silently) -- at a time the solver chose, so a perturbed grid's nudges are honoured too.
        aug.check = check
    a = g[-1]
    x = sol[-1].to(state)
    with _private_stats() as inner:
        for i in range(n_out - 1, 0, -1):
            if g_t is not None:
                g_t[i] = dot(flow(i), g[i])
                extra_nfe += 1
            n = qp.options.count(forward_nfe, share[i - 1]) if diff and has_length[i - 1] else 0
            if n:
                unit, w = _leggauss(n)  # increasing on [-1, 1]; flipped: the backward's order
                unit, w = unit.flip(0).to(dev), w.flip(0).to(dev)
                lo, hi = tt[i - 1], tt[i]
                half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
                if batched:  # (n, batch): every sample's nodes on its own interval (signed weights
                    # when its time runs backward: the integral from t_{i-1} to t_i either way)
                    nodes, weights = mid + half * unit[:, None], half * w[:, None]
                else:
                    nodes, weights = mid + half * unit, half * w
                weights = weights.to(acc)
                times = torch.cat([tt[i : i + 1], nodes, tt[i - 1 : i]])
                # In the time dtype of the solve, where its nodes stay distinct: a float32 field must see
                # the same (perturb-nudged) times as the forward's, which a float64 grid would round away.
                narrow = times.to(t.dtype)
                if batched or bool((narrow[1:] < narrow[:-1]).all()):
                    times = narrow
            else:
                times = t.detach()[i - 1 : i + 1].flip(0)
            if has_length[i - 1]:
                z = qp.backsolve(aug, aug.join(x, a.to(state)), times)
            else:  # every sample's interval is empty (torchode: t_eval[:, 0] == t_start): nothing to solve
                z = aug.join(x, a.to(state))[None]
            k = 0
            while k < n:
                # The first node of the solve runs alone (the hidden-tensor check reads its plain graph);
                # the rest in batches of ``per_call`` nodes through torch.func.vmap, unless the field
                # cannot be vmapped (then one call per node from there on: the same sum, only slower).
                m = min(per_call, n - k) if checked and vectorise else 1
                xk, ak = aug.split(z[1 + k : 1 + k + m], lead=1)
                wk = weights[k : k + m]
                wk = wk.reshape(*wk.shape, *[1] * (ak.ndim - wk.ndim))
                tk = nodes[k : k + m]
                def where(tk=tk, m=m):
                    return f"the quadrature node{'s' if m > 1 else ''} t = {_when(tk)}"

                with torch.enable_grad(), autocast(cache=False):
                    mark = sequence_mark() if not checked else None
                    xk = xk.detach()
                    if m == 1:
                        out = qp.f(tk[0], xk[0])
                        cot = ak[0].to(acc) * wk[0]
                    else:
                        try:
                            out = torch.func.vmap(qp.f)(tk, xk)
                        except Exception:  # noqa: BLE001 -- not vmappable (.item(), data-dependent control
                            # flow, in-place writes into captured tensors): per node from here on.  A field
                            # that fails for any other reason fails again, unvectorised, just below.
                            vectorise = False
                            continue
                        # Under fp16 scaling one power of two serves the batch (its largest entry): the
                        # nodes of one interval are close in time, a small spread next to fp16's 2^40.
                        cot = ak.to(acc) * wk
                    refs = outside = None
                    if not checked:
                        refs, outside = check.scan([out], (xk,), mark)
                    if out.requires_grad:
                        # With m nodes the node sum happens inside the VJP's GEMMs (fp32 accumulators
                        # even under autocast, rounded once to the compute dtype per batch), and the
                        # batches are summed in the accumulation dtype below.
                        grads = vjp(out, diff, cot, where)
                    else:  # the field does not use the parameters here
                        grads = ()
                del out
                node_calls += 1
                if refs is not None:
                    check.raise_if_hidden(refs, outside, lambda: f" (at {where()})")
                    checked = True
                for j, gp in enumerate(grads):
                    if gp is not None:
                        sums[j].add_(gp.to(sums[j].dtype))
                        touched[j] = True
                k += m
            extra_nfe += n
            total_nodes += n
            a = aug.split(z[-1])[1].to(acc)
            if i == 1 and g_t is not None:
                g_t[0] = -dot(flow(0), a)
                extra_nfe += 1
            a = a + g[i - 1]
            x = sol[i - 1].to(state)
    if rec is not None:
        rec.backward_nfe += inner.total("forward_nfe") + extra_nfe
        rec.backward_steps += inner.total("n_steps")
        rec.quadrature_nodes += total_nodes
        rec.quadrature_calls += node_calls
        rec.scale_backoffs += vjp.backoffs
        rec.backward_done = True
    out = [None] * len(params)
    for j, i in enumerate(want):
        if touched[j] or qp.unused_zero:
            out[i] = sums[j].to(params[i].dtype)
    return a, (g_t.to(t.dtype) if g_t is not None else None), out
