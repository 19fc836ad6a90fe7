"""Linear solves of an implicit step: GMRES, and the two Newton-matrix strategies.

A *linear solver* serves one step of :class:`._implicit.DirkStepper` (the Newton matrix is
``N = I - h a_ii J``):

* ``evaluate(t, z, gamma) -> (F, lin)`` -- ``f(t, z)`` and what ``solve`` needs at that iterate;
* ``solve(res, lin, gamma, hg) -> N^{-1} res`` on the flat ``(groups, n)`` layout;
* ``jacobian_norm(lin) -> (groups,)`` -- a size of ``J`` (the rounding-noise floor of Newton);
* ``transposed_preconditioner(gamma, hg)`` -- ``v -> P^{-T} v`` for the adjoint's GMRES, or None.

:class:`DenseSolver` (modified Newton: one Jacobian per step, one LU per diagonal entry) and
:class:`KrylovSolver` (Jacobian-free Newton--GMRES) implement it.
"""

from __future__ import annotations

import math

import torch


def vjp_or_zeros(out: torch.Tensor, inp: torch.Tensor, cot: torch.Tensor, **kwargs) -> torch.Tensor:
    """``(d out / d inp)^T cot``, and zeros where ``out`` does not depend on ``inp``: a field of ``t``
    alone (or of its parameters alone) has a zero Jacobian, which autograd reports as no graph at
    all (``out`` needs no gradient) or as an unused input.  ``is_grads_batched=True`` gives one row
    per leading entry of ``cot``."""
    batched = kwargs.get("is_grads_batched", False)
    zeros = lambda: torch.zeros((cot.shape[0], *inp.shape) if batched else inp.shape,  # noqa: E731
                                dtype=inp.dtype, device=inp.device)
    if not out.requires_grad:
        return zeros()
    (g,) = torch.autograd.grad(out, inp, cot, allow_unused=True, **kwargs)
    return zeros() if g is None else g


def gmres(op, b: torch.Tensor, *, rtol: float, max_iter: int, precond=None, restarts: int = 4):
    """Solve ``op(x) = b`` for a batch of independent systems (rows of ``b``, shape ``(G, n)``).

    Left-preconditioned restarted GMRES (modified Gram--Schmidt Arnoldi); ``op`` and ``precond`` map
    ``(G, n)`` to ``(G, n)``.  Returns ``(x, relres, stalled)`` with ``relres`` the true relative
    residual ``|b - op(x)| / |b|`` per row (0 where ``b`` is 0) and ``stalled`` whether a restart
    stopped reducing it (the rounding floor of an ill-conditioned system: ~ cond * eps)."""
    pre = (lambda v: v) if precond is None else precond
    G, n = b.shape
    x = torch.zeros_like(b)
    bnorm = b.norm(dim=1)
    tiny = torch.finfo(b.dtype).tiny
    m = max(1, min(max_iter, n))
    relres = torch.zeros_like(bnorm)
    last, stalled = math.inf, False
    for _ in range(restarts + 1):
        r = b - op(x) if bool((x != 0).any()) else b
        relres = torch.where(bnorm > 0, r.norm(dim=1) / bnorm.clamp_min(tiny), torch.zeros_like(bnorm))
        worst = float(relres.max()) if relres.numel() else 0.0
        if worst <= rtol:
            break
        if worst > 0.5 * last:
            stalled = True
            break
        last = worst
        r = pre(r)
        beta = r.norm(dim=1)
        V = [r / beta.clamp_min(tiny)[:, None]]
        H = b.new_zeros(G, m + 1, m)
        e1 = b.new_zeros(G, m + 1)
        e1[:, 0] = beta
        target = rtol * pre(b).norm(dim=1)
        y = None
        for j in range(m):
            w = pre(op(V[j]))
            for i in range(j + 1):
                hij = (w * V[i]).sum(dim=1)
                H[:, i, j] = hij
                w = w - hij[:, None] * V[i]
            hn = w.norm(dim=1)
            H[:, j + 1, j] = hn
            V.append(w / hn.clamp_min(tiny)[:, None])
            y = torch.linalg.lstsq(H[:, : j + 2, : j + 1], e1[:, : j + 2, None]).solution[..., 0]
            res = (e1[:, : j + 2] - (H[:, : j + 2, : j + 1] @ y[..., None])[..., 0]).norm(dim=1)
            if bool((res <= target).all()):
                break
        x = x + sum(y[:, i, None] * V[i] for i in range(y.shape[1]))
    else:
        r = b - op(x)
        relres = torch.where(bnorm > 0, r.norm(dim=1) / bnorm.clamp_min(tiny), torch.zeros_like(bnorm))
    return x, relres, stalled


class Layout:
    """Groups of unknowns that share a Jacobian block: one (the whole state) or one per sample."""

    def __init__(self, y: torch.Tensor, per_sample: bool):
        self.shape = y.shape
        self.groups = y.shape[0] if per_sample else 1
        self.n = y.numel() // max(self.groups, 1) if y.numel() else 0

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(self.groups, self.n)

    def unflat(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(self.shape)

    def hg(self, h, gamma: float, dtype, device) -> torch.Tensor:
        """h * gamma per group, ``(G,)``."""
        if isinstance(h, float):
            return torch.full((self.groups,), h * gamma, dtype=dtype, device=device)
        return (h.detach().to(dtype) * gamma).reshape(-1).expand(self.groups) if h.numel() == 1 \
            else (h.detach().to(dtype) * gamma).reshape(self.groups)


def rms(layout, v):
    """RMS of ``v`` per group, ``(G,)``."""
    return layout.flat(v).pow(2).mean(dim=1).sqrt()


class DenseSolver:
    """Modified Newton: ``J`` at the step's start, one LU per distinct diagonal entry."""

    def __init__(self, stepper, layout: Layout, y, t):
        self.stepper, self.layout = stepper, layout
        self.dtype = stepper.prob.policy.state_dtype
        self.J = jacobian(stepper, layout, y, t)
        stepper.prob.nfe_extra += 1
        self.lus = {}
        self.norm = None

    def _lu(self, gamma, hg_groups):
        lu = self.lus.get(gamma)
        if lu is None:
            n = self.layout.n
            eye = torch.eye(n, dtype=self.dtype, device=self.J.device)
            lu = self.lus[gamma] = torch.linalg.lu_factor(eye - hg_groups[:, None, None] * self.J)
        return lu

    def evaluate(self, t, z, gamma):
        return self.stepper._f(t, z), None

    def jacobian_norm(self, lin):
        """``|J|_inf`` per group (the rounding-noise estimate of reduced-precision velocities)."""
        if self.norm is None:
            self.norm = self.J.abs().sum(dim=-1).amax(dim=-1)
        return self.norm

    def solve(self, res, lin, gamma, hg_groups):
        LU, piv = self._lu(gamma, hg_groups)
        return torch.linalg.lu_solve(LU, piv, res[..., None])[..., 0]

    def transposed_preconditioner(self, gamma, hg_groups):
        LU, piv = self._lu(gamma, hg_groups)
        return lambda v: torch.linalg.lu_solve(LU, piv, v[..., None], adjoint=True)[..., 0]


class KrylovSolver:
    """Jacobian-free Newton--Krylov: ``J v`` by double backward at the current iterate."""

    def __init__(self, stepper, layout: Layout):
        self.stepper, self.layout = stepper, layout
        self.norm = None

    def evaluate(self, t, z, gamma):
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_(True)
            F = self.stepper._f(t, z_leaf)
            u = torch.zeros_like(F, requires_grad=True)
            vjp = vjp_or_zeros(F, z_leaf, u, create_graph=True)
        return F.detach(), (vjp, u)

    def solve(self, res, lin, gamma, hg_groups):
        vjp, u = lin
        layout = self.layout

        def op(v):
            with torch.enable_grad():
                jv = vjp_or_zeros(vjp, u, layout.unflat(v).to(vjp.dtype), retain_graph=True)
            return v - hg_groups[:, None] * layout.flat(jv).to(v.dtype)

        x, _, _ = gmres(op, res, rtol=self.stepper.opts.linear_rtol, max_iter=min(layout.n, 50))
        return x

    def jacobian_norm(self, lin):
        """A gain estimate ``|J 1|_rms`` per group, from one more ``J v`` once per step (a size for
        the noise floor: it need not follow the iterates)."""
        if self.norm is None:
            vjp, u = lin
            with torch.enable_grad():
                jv = vjp_or_zeros(vjp, u, torch.ones_like(vjp), retain_graph=True)
            self.norm = rms(self.layout, jv.to(self.stepper.prob.policy.state_dtype))
        return self.norm

    def transposed_preconditioner(self, gamma, hg_groups):
        return None


def jacobian(stepper, layout: Layout, y, t) -> torch.Tensor:
    """``(G, n, n)`` Jacobian blocks of ``f(t, .)`` at ``y`` in the state dtype (full precision)."""
    G, n = layout.groups, layout.n
    with torch.enable_grad():
        y_leaf = y.detach().requires_grad_(True)
        fy = stepper._f_full(t, y_leaf)
        # cotangent j: e_j in every group at once -> row j of every block
        eye = torch.eye(n, dtype=fy.dtype, device=fy.device)
        cots = eye[:, None, :].expand(n, G, n).reshape(n, *layout.shape)
        try:
            rows = vjp_or_zeros(fy, y_leaf, cots, is_grads_batched=True, retain_graph=True)
        except RuntimeError:
            rows = torch.stack([vjp_or_zeros(fy, y_leaf, c, retain_graph=True) for c in cots])
    # rows[j] has shape of y; in group g its entries are J_g[j, :]
    return rows.reshape(n, G, n).permute(1, 0, 2).to(stepper.prob.policy.state_dtype).contiguous()
