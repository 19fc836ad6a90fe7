"""Diagonally implicit Runge--Kutta steps: Newton's method per stage, and the exact adjoint of a step.

A DIRK stage ``i`` solves ``k_i = f(t_i, base_i + h a_ii k_i)`` with ``base_i = y + h sum_{j<i} a_ij
k_j``.  The forward iterates on ``k`` in the state dtype::

    F = f(t_i, base + h a_ii k)        (the policy's compute dtype, like every evaluation)
    k <- k + N^{-1} (F - k),            N = I - h a_ii J

and stops when the change of the stage state ``h a_ii dk`` is within the Newton tolerance; the stage
value is ``k*``, the iterate the last ``F`` was evaluated at (not ``F``: see ``DirkStepper.step``).

**The adjoint.**  Rebuilt with a graph (a tape), the stage has the value ``k*`` and the derivative
of ``T(f(t_i, base_i + h a_ii k*))`` with ``k*`` a constant and ``T`` the identity whose backward is
``g -> N*^{-T} g``, ``N* = I - h a_ii J(t_i, z*)`` at the converged stage state.  By the implicit function theorem that is the derivative of
the stage equation's solution with respect to ``base_i``, ``h``, ``t_i`` and the parameters -- exact
up to the Newton tolerance (``k*`` differs from the true root by that much, and ``J`` with it) and the
transposed solve's tolerance.  The transposed solve is GMRES on ``v -> v - h a_ii J*^T v`` (one VJP
of ``f`` per iteration), preconditioned by the forward's factorised ``N`` in dense mode (one or two
iterations when ``J`` barely changes over the step).

**Linear solves.**  ``"dense"``: ``J`` at the step's start, formed from VJPs in the state dtype (full
precision: a bf16 iteration matrix would not converge on a stiff problem), LU-factorised once per
distinct diagonal entry and reused over the step's iterations and stages (modified Newton).
``"krylov"``: Jacobian-free Newton--Krylov, ``J v`` by double backward at each iterate, GMRES to
``linear_rtol``.  Jacobians are per sample (blocks of ``d x d``) when the samples have their own
times (torchode's layout, where samples are independent by construction) and over the whole state
otherwise (a torchdiffeq field may couple the batch: BatchNorm, attention).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._linear import DenseSolver, KrylovSolver, Layout, gmres, rms, vjp_or_zeros
from ._steppers import Stepper, _axpy, _bad_velocity, register_stepper

__all__ = ["NewtonOptions", "NewtonFailure", "newton_options", "LINEAR_SOLVERS"]

LINEAR_SOLVERS = ("auto", "dense", "krylov")


class NewtonOptions(NamedTuple):
    """How the implicit stages of a DIRK method are solved.

    Attributes:
        linear_solver: ``"dense"`` (LU of the Jacobian), ``"krylov"`` (matrix-free GMRES) or
            ``"auto"``: dense up to ``dense_max`` unknowns per Jacobian block, Krylov above.
        rtol, atol: the Newton tolerance on each stage state, ``|dz| <= atol + rtol |z|`` (RMS over a
            sample or the state).  Default: 1e-2 times the solver's ``rtol``/``atol``, never below 4
            units of roundoff of the state dtype.
        max_iter: Newton iterations per stage before the step counts as failed (adaptive steps then
            shrink the step; fixed grids raise).
        linear_rtol: relative residual of the forward's GMRES solves (inexact Newton), default 1e-3.
        dense_max: the ``"auto"`` threshold.
    """

    linear_solver: str = "auto"
    rtol: float | None = None
    atol: float | None = None
    max_iter: int = 10
    linear_rtol: float = 1e-3
    dense_max: int = 256


class NewtonFailure(RuntimeError):
    """A stage's Newton iteration did not converge (adaptive drivers reject the step on it)."""

    def __init__(self, message: str, t: float, h: float, residual: float):
        super().__init__(message)
        self.t, self.h, self.residual = t, h, residual


def _tightest(tol) -> float | None:
    """A host's scalar tolerance (torchdiffeq and torchode allow per-component tensors: the tightest)."""
    if tol is None:
        return None
    return float(tol.min()) if isinstance(tol, torch.Tensor) else float(tol)


def newton_options(spec, *, owner: str, linear_solver=None, rtol=None, atol=None) -> NewtonOptions:
    """``spec`` (None, a dict of :class:`NewtonOptions` fields, or a NewtonOptions) validated.

    A host adapter passes its own ``linear_solver`` keyword (it overrides the spec's) and the solve's
    ``rtol``/``atol`` (floats or per-component tensors): unset Newton tolerances become 1e-2 of them."""
    if spec is None:
        fields = NewtonOptions()._asdict()
    elif isinstance(spec, NewtonOptions):
        fields = spec._asdict()
    elif isinstance(spec, dict):
        unknown = sorted(set(spec) - set(NewtonOptions._fields))
        if unknown:
            raise ValueError(f"{owner}: unknown Newton option(s) {unknown}; valid: {', '.join(NewtonOptions._fields)}")
        fields = {**NewtonOptions()._asdict(), **spec}
    else:
        raise TypeError(f"{owner} must be a dict or rampde_plugins.NewtonOptions, got {type(spec).__name__}")
    if linear_solver is not None:
        fields["linear_solver"] = linear_solver
    for name, host in (("rtol", _tightest(rtol)), ("atol", _tightest(atol))):
        if fields[name] is None and host is not None:
            fields[name] = 1e-2 * host
    if fields["linear_solver"] not in LINEAR_SOLVERS:
        raise ValueError(f"{owner}: linear_solver={fields['linear_solver']!r}; choose one of {', '.join(LINEAR_SOLVERS)}")
    for name in ("rtol", "atol"):
        v = fields[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v)):
            raise ValueError(f"{owner}: {name}={v!r} must be a positive finite number or None")
    for name in ("max_iter", "dense_max"):
        v = fields[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name}={v!r} must be a positive integer")
    v = fields["linear_rtol"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ValueError(f"{owner}: linear_rtol={v!r} must be a number in (0, 1)")
    return NewtonOptions(**fields)


def _stage_state(base, hg, k):
    # One formula in the forward and in the tape: the tape's f(z*) must be the forward's F bit for bit.
    if isinstance(hg, float):
        return torch.add(base, k, alpha=hg)
    return torch.addcmul(base, hg, k)


class _TransposedStageSolve(torch.autograd.Function):
    """Identity forward; backward ``g -> N*^{-T} g`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, fk, solver):
        ctx.solver = solver
        return fk.clone()

    @staticmethod
    def backward(ctx, g):
        return ctx.solver(g), None


class _ImpureField(Exception):
    """Raised inside a forward of an implicit method once the field has drawn or written."""


class DirkStepper(Stepper):
    """The stepper of a diagonally implicit tableau: ``step(y, times, h, k0) -> (y_next, stages)``."""

    implicit = True

    def __init__(self, prob, options: NewtonOptions):
        self.prob, self.opts = prob, options
        #: set by a per-sample adaptive driver: a sample (Newton group) whose stage does not converge
        #: is frozen and reported in :attr:`failed` instead of raising for the whole batch
        self.reject_per_sample = False
        self.failed = None
        eps = torch.finfo(prob.policy.state_dtype).eps
        # unset (a core caller without host tolerances): 1e-2 of torchdiffeq's defaults 1e-7, 1e-9
        self.rtol = max(options.rtol if options.rtol is not None else 1e-9, 4 * eps)
        self.atol = options.atol if options.atol is not None else 1e-11
        cd = prob.policy.compute_dtype
        self.u_compute = 0.0 if cd is None or torch.finfo(cd).eps <= eps else torch.finfo(cd).eps
        # the unit roundoff of the velocities (the state dtype's own when there is no autocast)
        self.u_noise = max(self.u_compute, eps)
        self.back_rtol = max(16 * eps, 8 * self.u_compute)

    def deterministic(self, replay, run):
        """Run a forward; raise (with the generators and buffers put back) if the field drew random
        numbers or wrote buffers.  Newton's method evaluates the field several times per stage: a
        field that changes between evaluations (dropout, BatchNorm in training mode) has no root."""
        prob = self.prob
        f, calls = prob.f, [0]

        def checked(t, y):
            # At the second evaluation (the first may be a probe whose closure writes are adopted
            # only after it returns): refuse as soon as the field has drawn or written, not after
            # Newton has failed at every step size down to the step cap.  Once only -- the check
            # reads the generator state and compares every buffer; a field that starts drawing
            # later is refused at the end of the forward (guarded).
            calls[0] += 1
            if calls[0] == 2 and replay.changed_in_guard():
                raise _ImpureField()
            return f(t, y)

        prob.f = checked
        try:
            out, changed, exc = replay.guarded(run)
        finally:
            prob.f = f
        if changed or isinstance(exc, _ImpureField):
            raise ValueError(
                f"method {self.prob.tableau.name!r} is implicit: Newton's method evaluates the vector field several "
                "times per stage, so the field must be the same function at every evaluation -- this one draws "
                "random numbers or writes buffers (dropout, BatchNorm in training mode). Put the module in eval() "
                "mode, or use an explicit method"
            ) from exc
        if exc is not None:
            raise exc
        return out

    # -- one step ---------------------------------------------------------------------------------

    def step(self, y, times, h, k0=None, f=None):  # (f: explicit steppers' stage-wise field; unused)
        prob, tab = self.prob, self.prob.tableau
        layout = Layout(y, prob.per_sample)
        graph = torch.is_grad_enabled()
        solver = self._linear_solver(layout, y, times, h)
        self._last = None
        ks, evals = [], 0
        # per-sample rejection (torchode's layout): the groups whose Newton iteration failed so far
        failed = torch.zeros(layout.groups, dtype=torch.bool, device=y.device) \
            if self.reject_per_sample and prob.per_sample else None
        for i in range(tab.stages):
            gamma = tab.diag[i]
            if gamma == 0.0:
                if i == 0 and k0 is not None:
                    ks.append(k0)
                    continue
                zi = _axpy(y, h, ks, tab.a[i]) if i else y
                ks.append(self._f(times[i], zi))
                evals += 1
                continue
            base = _axpy(y, h, ks, tab.a[i]) if i else y
            guess = ks[-1].detach() if ks else (k0.detach() if k0 is not None else torch.zeros_like(y))
            hg = (h.detach() if isinstance(h, torch.Tensor) else h) * gamma
            with torch.no_grad():
                k_star, F, n_ev = self._newton(solver, layout, base.detach(), hg, gamma, times[i], guess, h, failed)
            evals += n_ev
            # The stage value is the iterate k*, not F = f(z*): y1 and the later stages are then
            # combinations of converged stage *states* (a stiffly accurate method's y1 is z_s), and
            # the Newton error |z* - z| reaches them as it is -- f(z*) would multiply it by h |J|.
            if not graph:
                ks.append(k_star)
                continue
            # The stage with a graph: value k*; derivative that of f at the converged state routed
            # through N*^{-T} (the implicit function theorem, see the module docstring).
            z = _stage_state(base, h * gamma, k_star)
            fk = self._f(times[i], z)
            evals += 1
            routed = _TransposedStageSolve.apply(fk, self._transposed(solver, layout, z.detach(), times[i], h, gamma))
            ks.append(k_star + (routed - routed.detach()))
        prob.nfe_extra += evals - (tab.stages - (k0 is not None))
        self.failed = failed if failed is not None and bool(failed.any()) else None
        return _axpy(y, h, ks, tab.b), ks

    def filter_error(self, err: torch.Tensor) -> torch.Tensor:
        """The embedded error estimate of the last step, filtered: ``(I - h a_ii J)^{-1} err``.

        The raw estimate ``h sum_i b_err_i k_i`` of a stiff component is a multiple of its (large)
        velocities and does not decay as ``h |lambda|`` grows, so it rejects step after step where the
        solution is smooth (Shampine; Hairer & Wanner, Radau5); the solve with the step's own Newton
        matrix damps it as the method damps the stiff components.  Without it, van der Pol with
        mu = 1000 took 1838 steps to t = 500 where SciPy's Radau takes 33 (with it: 77)."""
        last = getattr(self, "_last", None)
        if last is None:
            return err
        solver, layout, gamma, hg_groups, lin = last
        with torch.no_grad():
            return layout.unflat(solver.solve(layout.flat(err), lin, gamma, hg_groups)).to(err.dtype)

    # -- evaluations ------------------------------------------------------------------------------

    def _f(self, t, z):
        k = self.prob.f(t, z)
        if type(k) is not torch.Tensor or k.shape != z.shape or not k.dtype.is_floating_point:
            _bad_velocity(k, z, t)
        return k.to(self.prob.policy.state_dtype)

    def _f_full(self, t, z):
        with self.prob.full_precision():
            return self._f(t, z)

    # -- the forward's linear solver --------------------------------------------------------------

    def _mode(self, layout) -> str:
        mode = self.opts.linear_solver
        if mode == "auto":
            mode = "dense" if layout.n <= self.opts.dense_max else "krylov"
        return mode

    def _linear_solver(self, layout, y, times, h):
        """This step's linear solver (the protocol in :mod:`._linear`): dense or Krylov."""
        if self._mode(layout) == "krylov":
            return KrylovSolver(self, layout)
        return DenseSolver(self, layout, y.detach(), times[0].detach() if isinstance(times[0], torch.Tensor) else times[0])

    def _newton(self, solver, layout, base, hg, gamma, t, k, h, failed=None):
        """``(k*, F, evaluations)`` of one implicit stage.  ``failed`` (per-sample rejection, a
        ``(groups,)`` mask updated in place): groups already failed stay frozen, groups that diverge or
        do not converge join it (their iterate is the starting guess), and nothing is raised."""
        state_dtype = self.prob.policy.state_dtype
        hg_groups = layout.hg(hg, 1.0, state_dtype, base.device)
        prev, prev_worst, evals, worst = None, math.inf, 0, math.inf
        rec = self.prob.record
        guess = k
        for m in range(self.opts.max_iter):
            z = _stage_state(base, hg, k)
            F, lin = solver.evaluate(t, z, gamma)
            evals += 1
            res = F - k
            dk = layout.unflat(solver.solve(layout.flat(res), lin, gamma, hg_groups))
            rec.newton_iterations += 1
            change = (dk * hg).abs()
            err = rms(layout, change / (self.atol + self.rtol * z.abs()))
            conv = err <= 1.0
            if prev is not None:
                # A velocity rounded to unit roundoff u (bf16/fp16 under autocast, else the state
                # dtype's) carries an error of about u |J| |z| (a stiff field's velocity is a
                # cancellation of large terms), which moves the stage state by up to about
                # u (1 + h a_ii |J|) |z|: once the iteration stops contracting at that level it has
                # converged as far as the field's precision allows.  (The stage value is rounded
                # too: h a_ii u |F|.)
                gain = 1.0 + hg_groups.abs() * solver.jacobian_norm(lin)
                hg_abs = hg.abs() if isinstance(hg, torch.Tensor) else abs(hg)
                floor = self.atol + 4.0 * self.u_noise * (
                    z.abs() * layout.unflat(gain[:, None].expand(layout.groups, layout.n)) + hg_abs * F.abs())
                noise = rms(layout, change / floor)
                # Below that floor the iteration has converged as far as the field's precision allows,
                # whether it has stalled there (err > prev / 4: the updates are rounding noise) or is
                # still contracting (err <= prev / 2: what is left is at most this update).
                conv = conv | (noise <= 1.0)
            if failed is not None:
                # per sample: a non-finite or diverging group fails alone; failed groups count as settled
                bad = ~torch.isfinite(err)
                if prev is not None and m >= 2:
                    bad = bad | (err > 2.0 * prev)
                failed |= bad & ~conv
                conv = conv | failed
                err = torch.where(failed, 0.0, err)
            # one host synchronisation per iteration: the worst scaled update, and whether all converged
            worst, done = torch.stack([err.max(), conv.all().to(err.dtype)]).tolist() if err.numel() else (0.0, 1.0)
            if not math.isfinite(worst):
                break
            if done:
                self._last = (solver, layout, gamma, hg_groups, lin)
                return self._frozen(layout, failed, guess, k), F, evals
            if failed is None and prev is not None and m >= 2 and worst > 2.0 * prev_worst:
                break  # diverging
            prev, prev_worst = err, worst
            # A converged group (sample) keeps its iterate: its result does not depend on how long
            # the other samples iterate (the backward recomputes the step with other samples' h = 0).
            k = k + layout.unflat(torch.where(conv[:, None], 0.0, layout.flat(dk)))
        if failed is not None:  # out of iterations: the groups still moving fail, the others stand
            failed |= ~conv
            self._last = (solver, layout, gamma, hg_groups, lin)
            return self._frozen(layout, failed, guess, k), F, evals
        t0 = float(t.min()) if isinstance(t, torch.Tensor) else float(t)
        hh = float(h.abs().max()) if isinstance(h, torch.Tensor) else float(h)
        raise NewtonFailure(
            f"Newton's method did not converge for a stage of {self.prob.tableau.name!r} at t = {t0:.6g} "
            f"(h = {hh:.3g}): scaled update {worst:.3g} after {m + 1} iteration(s) (converged means <= 1 with "
            f"rtol={self.rtol:.3g}, atol={self.atol:.3g}); use a smaller step, looser Newton tolerances "
            "(options['newton']={'rtol': ..., 'atol': ...}) or more iterations (max_iter)",
            t0, hh, worst,
        )

    @staticmethod
    def _frozen(layout, failed, guess, k):
        """``k`` with the failed groups' iterates put back to the (finite) starting guess: the step is
        rejected for them, and a diverged iterate must not reach another sample's arithmetic."""
        if failed is None:
            return k
        return layout.unflat(torch.where(failed[:, None], layout.flat(guess), layout.flat(k)))

    # -- the backward's transposed solve ----------------------------------------------------------

    def _transposed(self, solver, layout, z, t, h, gamma):
        prob = self.prob
        hg_groups = layout.hg(h, gamma, prob.policy.state_dtype, z.device)
        t = t.detach() if isinstance(t, torch.Tensor) else t
        precond = solver.transposed_preconditioner(gamma, hg_groups)

        def solve(g):
            with torch.enable_grad():
                z_leaf = z.detach().requires_grad_(True)
                fz = self._f_full(t, z_leaf)
                prob.nfe_extra += 1

                def op(v):
                    jt = vjp_or_zeros(fz, z_leaf, layout.unflat(v).to(fz.dtype), retain_graph=True)
                    return v - hg_groups[:, None] * layout.flat(jt)

                gf = layout.flat(g.to(z.dtype))
                lam, relres, _ = gmres(op, gf, rtol=self.back_rtol, max_iter=min(layout.n, 50), precond=precond)
            worst = float(relres.max()) if relres.numel() else 0.0
            # GMRES aims at 16 eps; an ill-conditioned stage matrix (large steps on a stiff problem)
            # stalls at about cond(I - h a_ii J) * eps, which a direct solve reaches too.  Only a
            # residual above sqrt(eps) -- no convergence at all -- is an error.  With low-precision
            # velocities GMRES stops at back_rtol (the velocities' own rounding): that is converged too.
            floor = max(math.sqrt(torch.finfo(z.dtype).eps), self.back_rtol)
            if not worst <= floor:
                t0 = float(t.min()) if isinstance(t, torch.Tensor) else float(t)
                raise RuntimeError(
                    f"the adjoint of an implicit stage of {prob.tableau.name!r} at t = {t0:.6g}: the transposed linear "
                    f"solve reached a relative residual of {worst:.3g} (needs <= {floor:.3g}); the "
                    "step is too large for the Jacobian's conditioning -- use smaller steps"
                )
            return layout.unflat(lam).to(g.dtype)

        return solve


register_stepper("dirk", DirkStepper, lambda tableau: tableau.implicit)  # (diagonally implicit: lower-triangular a)
