"""Terminal events for rampde methods in torchdiffeq: ``odeint(..., event_fn=...)``.

What ``odeint(func, y0, t, event_fn=g, method="rampde_*")`` does (torchdiffeq's contract: it returns
``(event_t, solution)`` with ``solution = [y(t0), y(event_t)]``, ``t[1:]`` ignored):

1. **Search** (no graph).  The method steps from ``t[0]`` as it always does -- adaptive pairs under
   torchdiffeq's own step-size control, fixed-grid methods on ``t0 + k * step_size`` -- and looks at
   the sign of ``g`` at the end of every accepted step.  The first step whose end has another sign
   than ``g(t0, y0)`` (zero counts as another sign) brackets the event; the search stops there, so no
   step is taken past it that torchdiffeq's own method would not take.
2. **Root** on the method's dense output over that step: torchdiffeq's interpolant for its adaptive
   pairs (the quartic through ``y0``, ``y1``, ``y_mid`` and the end slopes), the stage polynomial for
   implicit adaptive methods, and cubic Hermite through the step's end values and slopes on fixed
   grids (whatever ``interp`` says: a linear interpolant's root is only second-order accurate).
   Bisection on the sign, as torchdiffeq's ``find_event``, but not stopped at a width of ``atol``: the
   bracket is halved until its midpoint is no longer strictly inside, i.e. to the resolution of the
   time dtype (float64 on adaptive steps, about 53 halvings of a unit step; the grid's dtype on a fixed
   grid), and ``event_t`` is its midpoint.  Halvings cost dense-output and ``g`` evaluations, never
   ``f``'s.  The dense output and ``g`` run with autocast off, in the state dtype (float32 under the
   ``bf16`` and ``fp16`` policies), with times in float64 (adaptive) or the grid's dtype (fixed) --
   never in the policy's low-precision velocity dtype.  So the sign is resolved down to the state's
   rounding: ``|g(event_t, y(event_t))|`` is within a few units of the state dtype's roundoff of the
   terms of ``g`` (fp32: ~1e-7 relative), whatever ``atol``; a restart from the event state must move
   the state further than that off the surface (or start with ``g == 0``, which ends at once).
3. **Gradient** (only if one can be asked for: grad mode on and ``y0``, ``t[0]`` or a parameter
   requiring grad).  The search's accepted steps are replayed by the engine's ordinary solve --
   adaptive: a controller that proposes exactly the recorded steps (no rejections, no initial-step
   selection); fixed: the grid up to the bracketing step -- with the single output ``event_t`` read off
   the same dense output.  Its backward is rampde's discrete adjoint of those steps (step sizes and
   ``event_t`` are constants, as for every adaptive solve; ``t0`` moves every step).  Cost: one more
   forward over the accepted steps (``n_accepted * (stages - 1) + 1`` evaluations adaptive,
   ``n * stages`` + 1 for the cubic end slope on a grid) plus the usual backward.  The gradient of
   ``event_t`` itself is torchdiffeq's ``odeint_event`` (implicit-function theorem on
   ``g(event_t, y(event_t)) = 0``), which differentiates ``solution[-1]`` -- this solve.

Statistics: the search is its own ``SolveStats`` record, ``method="rampde_<name> (event search)"``
(steps, rejected steps, evaluations); the replay, when it runs, is the ordinary record after it.

How the search stops inside the engine: adaptive steps through the controller's ``accepted(step)``
hook (``rampde_plugins.StepController``), which sees each accepted step's data and raises at the
bracketing step; fixed grids through ``callback_step``, which sees the state at each grid point
before the next step is taken.  ``odeint_adjoint(..., event_fn=...)`` runs this search and then the
quadrature adjoint over ``[t0, event_t]`` (``_quadrature._event_adjoint``).
"""

from __future__ import annotations

import math

import torch

from rampde_plugins import StepController, collect_stats, solve_adaptive, solve_grid

#: Fixed-grid event searches end with a RuntimeError after this many steps (torchdiffeq's limit).
MAX_FIXED_STEPS = 20000
#: Bisection halvings at most (float64 from a bracket of 1e300 to 1e-300 takes about 2000; the
#: loop also stops when the bracket can no longer be halved in its dtype).
_MAX_HALVINGS = 4096


class _Found(Exception):
    """Ends the engine's search solve at the step that brackets the event."""


# -- the event function ---------------------------------------------------------------------------

def _unwrap(event_fn):
    """``(outer layers, user's function, initial signs)`` of the event function torchdiffeq hands a
    solver, or ``None`` if its wrappers are not recognised.

    torchdiffeq's ``_check_inputs`` wraps the user's ``g`` as ``min(g(t, y) * sign(g(t0, y0)))``
    (``combine_event_functions``), then for tuple states and decreasing time in modules with a
    ``base_func``.  The user's ``g`` is checked at every call (shape, dtype, NaN), so it is reached
    through these layers; they are rebuilt around a checked copy with torchdiffeq's own classes."""
    layers, fn = [], event_fn
    for _ in range(8):
        base = getattr(fn, "base_func", None)
        if isinstance(fn, torch.nn.Module) and base is not None:
            layers.append(fn)
            fn = base
            continue
        code = getattr(fn, "__code__", None)
        if (code is not None and getattr(fn, "__name__", "") == "combined_event_fn"
                and {"event_fn", "initial_signs"} <= set(code.co_freevars) and fn.__closure__ is not None):
            cells = dict(zip(code.co_freevars, fn.__closure__))
            return layers, cells["event_fn"].cell_contents, cells["initial_signs"].cell_contents
        return None
    return None


def _rewrap(layer, inner):
    """A copy of one torchdiffeq wrapper module around ``inner`` (its other attributes kept)."""
    clone = layer.__class__.__new__(layer.__class__)
    torch.nn.Module.__init__(clone)
    for key, value in vars(layer).items():
        if not key.startswith("_"):
            setattr(clone, key, value)
    clone.base_func = inner
    return clone


class EventFunction:
    """The event function as the search calls it: ``g(t, y)`` -> a 0-d tensor whose sign change is
    the event, with the user's function checked at every call.

    Raises TypeError (not a tensor, not real floating point) or ValueError (empty, a shape that
    does not broadcast to its first call's, NaN) naming ``event_fn``."""

    def __init__(self, event_fn, method: str):
        self.method, self.shape = method, None
        parts = _unwrap(event_fn)
        if parts is None:  # an unknown torchdiffeq: its own combined function, its output checked
            self.fn = event_fn
            return
        layers, user, signs = parts
        # torchdiffeq evaluated g once already (for the signs): its shape is the reference
        self.shape = signs.shape if isinstance(signs, torch.Tensor) else None

        def combined(t, y):
            return torch.min(self._check(user(t, y), t) * signs)

        fn = combined
        for layer in reversed(layers):
            fn = _rewrap(layer, fn)
        self.fn = fn

    def _check(self, c, t):
        owner = f"odeint(method={self.method!r}, event_fn=...)"
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{owner}: event_fn must return a tensor, got {type(c).__name__}")
        if not c.dtype.is_floating_point:
            hint = " (take .real of a complex value)" if c.dtype.is_complex else ""
            raise TypeError(f"{owner}: event_fn must return a real floating-point tensor, got {c.dtype}{hint}")
        if c.numel() == 0:
            raise ValueError(f"{owner}: event_fn returned an empty tensor (shape {tuple(c.shape)}); it must "
                             "return one value per event (a 0-d tensor, or any shape for several events)")
        if self.shape is None:
            self.shape = c.shape
        elif c.shape != self.shape:
            # torchdiffeq multiplies each value by the first call's signs, so a value that broadcasts
            # to the first shape is one value for every event (its examples/learn_physics.py returns
            # zeros_like(t), shape (), past a horizon); anything else would change the events.
            try:
                fits = torch.broadcast_shapes(c.shape, self.shape) == self.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"{owner}: event_fn returned shape {tuple(c.shape)} at t = {float(t):.6g} but "
                                 f"{tuple(self.shape)} before; it must return the same shape at every call (or "
                                 "one that broadcasts to it)")
            c = c.expand(self.shape)
        return c

    def __call__(self, t, y):
        with torch.no_grad():
            g = self.fn(t, y)
        if not isinstance(g, torch.Tensor) or g.numel() != 1 or not g.dtype.is_floating_point:
            raise TypeError(f"odeint(method={self.method!r}, event_fn=...): the event function must give one real "
                            f"value per call, got {getattr(g, 'shape', type(g).__name__)}")
        g = g.reshape(())
        if bool(torch.isnan(g)):
            raise ValueError(f"odeint(method={self.method!r}, event_fn=...): event_fn returned NaN at t = {float(t):.6g}; "
                             "the state or the event function is not finite there")
        return g


# -- root finding ----------------------------------------------------------------------------------

def bisect(dense, event, sign0, lo, hi, tol=0.0):
    """The event time in ``(lo, hi]`` on the dense output ``dense(t)`` (torchdiffeq's sign bisection).

    ``lo``/``hi``: 0-d time tensors with ``sign(g(lo)) == sign0 != sign(g(hi))``.  Halves the bracket
    until it is at most ``tol`` wide or its midpoint is no longer strictly inside (the time dtype's
    resolution; the default ``tol=0`` goes that far); returns ``(event_t, number of halvings)`` with
    ``event_t`` the last midpoint (``hi`` if that is not above ``lo``)."""
    n = 0
    while n < _MAX_HALVINGS and bool(hi - lo > tol):
        mid = (lo + hi) / 2
        if not bool((mid > lo) & (mid < hi)):
            break
        n += 1
        if bool(torch.sign(event(mid, dense(mid))) == sign0):
            lo = mid
        else:
            hi = mid
    t = (lo + hi) / 2
    return (t if bool(t > lo) else hi), n


# -- the search ------------------------------------------------------------------------------------

class _Counted:
    """The field with a call counter (the search's evaluations for its statistics record)."""

    __slots__ = ("f", "n")

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        return self.f(t, y)


class _Watch(StepController):
    """torchdiffeq's controller, watched: after each accepted step the event function's sign at its
    end; the first change stops the solve with the step's data (``found``).  Records the accepted
    steps ``(t1, h, at_jump)`` for the replay."""

    def __init__(self, inner, event, sign0, device_type):
        self.inner, self.event, self.sign0, self.device_type = inner, event, sign0, device_type
        self.reuse_last_stage = inner.reuse_last_stage
        self.steps, self.found = [], None

    @property
    def at_jump(self):
        return self.inner.at_jump

    def start(self, f, t0, y0, f0):
        return self.inner.start(f, t0, y0, f0)

    def propose(self, t0, y0=None):
        return self.inner.propose(t0, y0)

    def judge(self, t0, t1, h, y0, y1, err):
        return self.inner.judge(t0, t1, h, y0, y1, err)

    def accepted(self, step):
        self.steps.append((step.t1, step.h, bool(self.inner.at_jump)))
        # the driver steps under the policy's autocast: the event function runs without it
        with torch.autocast(self.device_type, enabled=False):
            if bool(torch.sign(self.event(step.t1, step.y1)) != self.sign0):
                self.found = step
                raise _Found


class _Replay(StepController):
    """Proposes exactly the recorded accepted steps and accepts each: the gradient solve retakes the
    search's steps (bit for bit for a deterministic field), without rejections or initial-step choice."""

    def __init__(self, steps, reuse_last_stage, method):
        self.steps, self.reuse_last_stage, self.method, self.i = steps, reuse_last_stage, method, 0

    def start(self, f, t0, y0, f0):
        self.i = 0

    def propose(self, t0, y0=None):
        if self.i >= len(self.steps):  # pragma: no cover - the output lies inside the recorded steps
            raise RuntimeError(f"odeint(method={self.method!r}, event_fn=...): the gradient solve ran past the "
                               "recorded steps of the event search (please report this)")
        t1, h, self._jump = self.steps[self.i]
        return t1, h

    def judge(self, t0, t1, h, y0, y1, err):
        self.at_jump = self._jump
        self.i += 1
        return True


def _search_record(stats, method, n_steps, rejected, nfe):
    """Fill in the search's statistics record (its solve ended by an exception, before the driver did)."""
    if stats.records:
        rec = stats.records[0]
        rec.method = f"{method} (event search)"
        rec.n_steps, rec.rejected_steps, rec.forward_nfe, rec.n_outputs = n_steps, rejected, nfe, 2


def integrate_until_event(solver, t0, event_fn):
    """``(event_t, solution)`` of a rampde solver; see the module docstring.  ``t0`` and the returned
    ``event_t`` are in the solver's (increasing) time: torchdiffeq negates both for decreasing time."""
    method = solver.method
    if not callable(event_fn):
        raise TypeError(f"odeint(method={method!r}): event_fn must be callable (t, y) -> tensor, got {type(event_fn).__name__}")
    event = EventFunction(event_fn, method)
    policy = solver._policy()
    y0 = solver.y0
    state = policy.state_dtype
    dev = y0.device.type
    params, buffers = solver._params_buffers()
    need_grad = torch.is_grad_enabled() and (
        y0.requires_grad or (isinstance(t0, torch.Tensor) and t0.requires_grad) or any(p.requires_grad for p in params))
    y0s = y0.detach().to(state)
    # the search's time dtype: float64 as torchdiffeq's adaptive controller, the grid's on a fixed grid
    time_dtype = torch.float64 if solver.adaptive else torch.promote_types(t0.dtype, state)
    with torch.autocast(dev, enabled=False):
        g0 = event(t0.detach().to(time_dtype), y0s)
    sign0 = torch.sign(g0)
    if bool(g0 == 0):  # torchdiffeq: an event at the start ends the solve there
        out = y0.to(policy.output)
        return t0.detach().clone(), torch.stack([out, out])
    # The search builds no graph.  Without a gradient to come, it keeps the caller's grad mode so that
    # the engine still reports a field output that requires grad through a tensor it was not told of
    # (a closure); with one, the replay does that.
    search_grad = torch.is_grad_enabled() and not need_grad
    if solver.adaptive:
        return _adaptive(solver, policy, params, buffers, t0, event, sign0, need_grad, search_grad)
    return _fixed(solver, policy, params, buffers, t0, event, sign0, need_grad, search_grad)


def _adaptive(solver, policy, params, buffers, t0, event, sign0, need_grad, search_grad):
    from ._adaptive import make_interp

    y0, method, dev = solver.y0, solver.method, solver.y0.device.type
    t0d = t0.detach().to(torch.float64)
    inner = solver.field(policy, torch.float64)
    counted = _Counted(inner)
    watch = _Watch(solver._controller(land_at=None), event, sign0, dev)
    interp = make_interp(solver.tableau_name, solver.tableau)
    # The search's only output lies beyond every reachable time: the engine steps until the watch
    # stops it (or the controller raises: max_num_steps, step size underflow).
    t_out = torch.stack([t0d, torch.full_like(t0d, torch.finfo(torch.float64).max)])
    kw = solver._engine_kwargs(policy, params, buffers)
    with collect_stats() as stats:
        try:
            with torch.set_grad_enabled(search_grad):
                solve_adaptive(counted, y0.detach(), t_out, tableau=solver.tableau, controller=watch, interp=interp, **kw)
        except _Found:
            pass
    trials = watch.inner.trials
    _search_record(stats, method, len(watch.steps), trials - len(watch.steps), counted.n)
    step = watch.found
    if step is None:
        raise RuntimeError(f"odeint(method={method!r}, event_fn=...): the event function kept its sign up to "
                           f"t = {float(watch.steps[-1][0]) if watch.steps else float(t0d):.6g} (the time overflowed)")

    def dense(t):
        with torch.autocast(dev, enabled=False):
            return interp(step, t)

    event_t, _ = bisect(dense, event, sign0, step.t0.to(torch.float64), step.t1.to(torch.float64))
    solver.last_event = {"steps": len(watch.steps), "rejected": trials - len(watch.steps), "search_nfe": counted.n}
    if not need_grad:
        y1 = dense(event_t)
        return event_t, torch.stack([y0.to(policy.output, copy=True), y1.to(policy.output)])
    # The gradient solve: the recorded steps again, with the engine's discrete adjoint.
    t_grad = torch.stack([t0.to(torch.float64), event_t])
    sol = solve_adaptive(
        inner, y0, t_grad, tableau=solver.tableau, controller=_Replay(watch.steps, watch.reuse_last_stage, method),
        interp=interp,
        callback_step_adjoint=getattr(solver.func, "callback_step_adjoint", None),
        callback_accept_step_adjoint=getattr(solver.func, "callback_accept_step_adjoint", None), **kw)
    return event_t, sol


def _slope(solver, policy, inner, t, y, toward):
    """``f(t, y)`` as the engine's cubic output takes it: under the policy's autocast, in the state
    dtype, ``t`` nudged into the step under ``perturb`` (as ``StepData.f_start``/``f_end``)."""
    if solver.options["perturb"]:
        ft = torch.promote_types(y.abs().dtype, policy.state_dtype)
        narrow = t.to(ft)
        t = torch.nextafter(narrow, torch.full_like(narrow, toward)).to(t.dtype)
    cd = policy.compute_dtype
    ctx = torch.autocast(y.device.type, dtype=cd) if cd is not None else torch.autocast(y.device.type, enabled=False)
    with ctx:
        return inner(t, y).to(policy.state_dtype)


def hermite(t0, t1, y0, y1, f0, f1, t):
    """Cubic Hermite through ``(t0, y0, f0)`` and ``(t1, y1, f1)`` at ``t`` -- the engine's fixed-grid
    ``interp="cubic"`` output, term for term (the fraction ``s`` in the time dtype, the rest in y's)."""
    s = ((t - t0) / (t1 - t0)).to(y0.dtype)
    dt = (t1 - t0).to(y0.dtype)
    return ((1 + 2 * s) * (1 - s) * (1 - s) * y0 + s * (1 - s) * (1 - s) * dt * f0
            + s * s * (3 - 2 * s) * y1 + s * s * (s - 1) * dt * f1)


def _fixed(solver, policy, params, buffers, t0, event, sign0, need_grad, search_grad):
    method, opts, y0 = solver.method, solver.options, solver.y0
    dev = y0.device.type
    h = opts["step_size"]
    if h is None:
        raise ValueError(
            f"odeint(method={method!r}, event_fn=...): event handling on a fixed grid needs options['step_size'] "
            "(the grid is t0 + k * step_size, open-ended; a grid_constructor needs an end time, which an event "
            "solve does not have); "
            + ("or leave step_size and grid_constructor out to adapt the steps" if solver.tableau.b_err is not None
               else "pass options={'step_size': h}"))
    h = float(h.item() if isinstance(h, torch.Tensor) else h)
    tdt = torch.promote_types(t0.dtype, policy.state_dtype)
    t0d = t0.detach().to(tdt)
    grid = torch.arange(0, MAX_FIXED_STEPS + 1, dtype=tdt, device=y0.device).mul_(h).add_(t0d)
    inner = solver.field(policy, tdt)
    counted = _Counted(inner)
    user_cb = getattr(solver.func, "callback_step", None)
    from ._solver import _is_null_callback
    if user_cb is not None and _is_null_callback(user_cb):
        user_cb = None
    seen = {"n": 0, "prev": None, "found": None}

    def callback(tn, yn, dt):
        # Before step n: y_n is the end of step n-1, where the sign is looked at.
        n = seen["n"]
        if n:
            with torch.autocast(dev, enabled=False):
                changed = bool(torch.sign(event(tn, yn)) != sign0)
            if changed:
                seen["found"] = (n, seen["prev"], yn)
                raise _Found
        if user_cb is not None:
            user_cb(tn, yn, dt)
        seen["prev"], seen["n"] = yn, n + 1

    kw = solver._engine_kwargs(policy, params, buffers)
    end = None
    with collect_stats() as stats:
        try:
            with torch.set_grad_enabled(search_grad):
                sol = solve_grid(counted, y0.detach(), grid, grid[[0, -1]], tableau=solver.tableau, interp="linear",
                                 perturb=opts["perturb"], callback_step=callback, **kw)
            end = sol[-1].to(policy.state_dtype)
        except _Found:
            pass
    if seen["found"] is None:  # the last grid point is never a step's start: look at it here
        with torch.autocast(dev, enabled=False):
            if bool(torch.sign(event(grid[-1], end)) != sign0):
                seen["found"] = (MAX_FIXED_STEPS, seen["prev"], end)
    found = seen["found"]
    n_steps = MAX_FIXED_STEPS if found is None else found[0]
    if found is None:
        _search_record(stats, method, n_steps, 0, counted.n)
        raise RuntimeError(
            f"odeint(method={method!r}, event_fn=...): no event within {MAX_FIXED_STEPS} steps of step_size={h!r} "
            f"(up to t = {float(grid[-1]):.6g}); use a larger step_size or an adaptive method")
    n, ya, yb = found
    ta, tb = grid[n - 1], grid[n]
    fa = _slope(solver, policy, inner, ta, ya, math.inf)
    fb = _slope(solver, policy, inner, tb, yb, -math.inf)
    _search_record(stats, method, n_steps, 0, counted.n + 2)

    def dense(t):
        with torch.autocast(dev, enabled=False):
            return hermite(ta, tb, ya, yb, fa, fb, t)

    event_t, _ = bisect(dense, event, sign0, ta, tb)
    solver.last_event = {"steps": n_steps, "rejected": 0, "search_nfe": counted.n + 2}
    if not need_grad:
        return event_t, torch.stack([y0.to(policy.output, copy=True), dense(event_t).to(policy.output)])
    # The gradient solve: the grid up to the bracketing step, the event read off its cubic output;
    # every grid point moves with t0 (constant steps), the output time is a constant.
    steps = grid[: n + 1] + (t0.to(tdt) - t0d)
    t_grad = torch.stack([t0.to(tdt), event_t])
    sol = solve_grid(inner, y0, steps, t_grad, tableau=solver.tableau, interp="cubic", perturb=opts["perturb"],
                     callback_step_adjoint=getattr(solver.func, "callback_step_adjoint", None), **kw)
    return event_t, sol


__all__ = ["EventFunction", "MAX_FIXED_STEPS", "bisect", "hermite", "integrate_until_event"]
