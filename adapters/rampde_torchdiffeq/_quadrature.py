"""``torchdiffeq.odeint_adjoint(..., method="rampde_*")``: the Gauss--Legendre quadrature adjoint.

``odeint_adjoint`` normalises its input (tuple states flattened, decreasing time negated, the adjoint
norm built) and then calls the module global ``OdeintAdjointMethod.apply``.  That global is replaced by
an :class:`AdjointDispatch` that hands rampde methods to the core's quadrature adjoint and every other
method to torchdiffeq's own Function unchanged -- so the call is seen whatever the import order, and
uninstalling puts the original back.

The backward solves of ``[x, a]`` run through ``torchdiffeq.odeint`` itself with ``adjoint_method``,
``adjoint_rtol``/``adjoint_atol`` and ``adjoint_options`` (norm included, read when the backward runs),
so they are torchdiffeq's controller on the rampde engine: an adaptive method adapts on ``[x, a]``; a
fixed grid is the forward grid reversed (when the adjoint settings are the forward's) and its
quadrature nodes are read off cubic Hermite interpolation.
"""

from __future__ import annotations

import torch

from rampde_plugins import QUADRATURE_OPTIONS, QuadratureProblem, quadrature_options, resolve_policy, solve_quadrature

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_AUTOGRAD = ("torchdiffeq.odeint with torchdiffeq's own method and the same tableau (e.g. method='rk4' with "
             "options={'step_size': h})")
_NOT_RAMPDE = (
    "odeint_adjoint(method={method!r}, adjoint_method={adjoint!r}): with a rampde method, odeint_adjoint runs "
    "rampde's Gauss--Legendre quadrature adjoint, whose backward solve is a rampde method too. Leave "
    "adjoint_method unset (the same method), or name a rampde method, e.g. adjoint_method={method!r}."
)


class AdjointDispatch:
    """Stands in for ``torchdiffeq._impl.adjoint.OdeintAdjointMethod``: rampde methods get the
    quadrature adjoint; any other method goes to ``original.apply`` as before."""

    _rampde = True

    def __init__(self, original, adapter):
        self.original, self.adapter = original, adapter

    def __getattr__(self, name):
        return getattr(self.original, name)

    def apply(self, shapes, func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol, adjoint_atol,
              adjoint_method, adjoint_options, t_requires_grad, *adjoint_params):
        if not (isinstance(method, str) and self.adapter.owns(method)):
            return self.original.apply(shapes, func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol,
                                       adjoint_atol, adjoint_method, adjoint_options, t_requires_grad, *adjoint_params)
        return quadrature_adjoint(self.adapter, func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol,
                                  adjoint_atol, adjoint_method, adjoint_options, adjoint_params)


class _Host:
    """What the backward reads from the call: the adjoint options (``grad_fn.adjoint_options``, as on
    torchdiffeq's own Function -- its norm may be replaced before the backward runs) and callbacks."""

    def __init__(self, func, adjoint_options, adjoint_params):
        self.func, self.adjoint_options, self.adjoint_params = func, adjoint_options, adjoint_params
        self._zeros = None

    def decorate(self, aug) -> None:
        """torchdiffeq's adjoint callbacks (``callback_step_adjoint`` ...) on the backward field, called
        with ``(t0, (x, a), dt)`` -- the state and its adjoint (there is no parameter adjoint in the state)."""
        for name in _CALLBACKS:
            cb = getattr(self.func, name + "_adjoint", None)
            if cb is not None:
                setattr(aug, name, lambda t0, z, dt, _cb=cb: _cb(t0, tuple(z.unbind(0)), dt))

    def norm(self, z):
        """The adjoint norm on ``[x, a]``: torchdiffeq's takes ``(t, y, adj_y, *adj_params)``; the
        quadrature adjoint carries no parameter adjoint, so a custom norm sees zeros there (stride-0
        views, no memory) and torchdiffeq's own norms none at all (what they contribute is 0)."""
        fn = self.adjoint_options["norm"]
        qual = getattr(fn, "__qualname__", "")
        own = "handle_adjoint_norm_" in qual and qual.rsplit(".", 1)[-1] in ("default_adjoint_norm", "adjoint_seminorm")
        if own or not self.adjoint_params:
            rest = ()
        else:
            if self._zeros is None:
                self._zeros = tuple(torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p) for p in self.adjoint_params)
            rest = self._zeros
        return fn((torch.zeros((), dtype=z.dtype, device=z.device), z[0], z[1], *rest))


def _replays_forward_grid(options, adjoint_options) -> bool:
    # torchdiffeq copies options into adjoint_options when none are given: the same grid settings then
    # mean "the forward grid", which the backward reverses exactly instead of building a new one.
    return (adjoint_options.get("step_size") == options.get("step_size")
            and adjoint_options.get("grid_constructor") is options.get("grid_constructor"))


def quadrature_adjoint(adapter, func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol, adjoint_atol,
                       adjoint_method, adjoint_options, adjoint_params):
    from torchdiffeq._impl.odeint import SOLVERS, odeint

    owner = f"odeint_adjoint(method={method!r})"
    for key in ("checkpoint", "memory_budget"):
        if (options or {}).get(key) is not None:
            raise ValueError(
                f"{owner}: options[{key!r}]={options[key]!r} has no effect here: odeint_adjoint runs rampde's "
                "quadrature adjoint, which keeps no states or graphs (its backward integrates the state back). "
                f"Drop it, or use torchdiffeq.odeint(..., method={method!r}), whose discrete adjoint follows the "
                "checkpoint schedule or memory budget")
    if not (isinstance(adjoint_method, str) and adapter.owns(adjoint_method)):
        raise ValueError(_NOT_RAMPDE.format(method=method, adjoint=adjoint_method))
    if event_fn is not None:
        return _event_adjoint(adapter, func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol, adjoint_atol,
                              adjoint_method, adjoint_options, adjoint_params)
    adjoint_options = dict(adjoint_options)
    quad = quadrature_options({k: adjoint_options.pop(k) for k in QUADRATURE_OPTIONS if k in adjoint_options},
                              owner=f"{owner}: adjoint_options")
    solver = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
    policy = resolve_policy(solver.options["precision"], device_type=y0.device.type, state_dtype=y0.dtype)
    if adjoint_options.get("precision") is None:
        # Pinned now: in backward() the autocast context that chose the forward's policy is gone.
        adjoint_options["precision"] = policy
    adjoint_cls = SOLVERS[adjoint_method]
    # Built once now: bad adjoint options are an error at the call, not in backward().
    fixed = adjoint_cls(func=func, y0=y0, rtol=adjoint_rtol, atol=adjoint_atol,
                        **{k: v for k, v in adjoint_options.items() if k != "norm"}).adaptive is False
    replay_grid = fixed and adjoint_method == method and _replays_forward_grid(options, adjoint_options)
    host = _Host(func, adjoint_options, adjoint_params)
    state = {}

    # An adaptive backward with the forward's method and tolerances starts each interval with the step
    # the forward accepted there, not torchdiffeq's initial-step heuristic: that costs two evaluations
    # and proposes a step the controller then needs several steps (or rejections) to grow from (the
    # width sweep: 38 backward evaluations with it, 19 without).  adjoint_options["first_step"] wins.
    seed_steps = (not fixed and adjoint_method == method and "first_step" not in adjoint_options
                  and _same(adjoint_rtol, rtol) and _same(adjoint_atol, atol))

    def forward(y0_):
        run = SOLVERS[method](func=func, y0=y0_, rtol=rtol, atol=atol, **options)
        run.track_output_steps = seed_steps
        sol = run.integrate(t)
        state["grid"] = getattr(run, "last_grid", None)
        state["steps"] = run.output_steps
        return sol

    def backsolve(field, z0, times):
        opts = {k: v for k, v in host.adjoint_options.items() if k != "norm"}
        opts["norm"] = host.norm
        if fixed:
            opts["interp"] = "cubic"  # the nodes are read off cubic Hermite, not the linear default
            grid = state.get("grid")
            if replay_grid and grid is not None:
                opts.pop("step_size", None)
                opts["grid_constructor"] = _ReversedGrid(grid)
        elif seed_steps and state.get("steps"):
            # times[0] is the output t_i this interval's backward starts from
            i = int((t.detach().to(torch.float64) - float(times[0])).abs().argmin())
            if 1 <= i <= len(state["steps"]):
                opts["first_step"] = state["steps"][i - 1]
        return odeint(field, z0, times, rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method, options=opts)

    qp = QuadratureProblem(
        f=solver.field(policy), policy=policy, forward=forward, backsolve=backsolve, options=quad,
        params=tuple(adjoint_params), buffers=tuple(func.buffers()) if isinstance(func, torch.nn.Module) else (),
        hint="pass them explicitly: odeint_adjoint(..., adjoint_params=(A, b))",
        scaler=solver.options["scaler"], unused_zero=True, method=method, host=host,
        implicit=solver.tableau.implicit,
    )
    return solve_quadrature(qp, y0, t, owner=owner, instead=f"torchdiffeq.odeint(..., method={method!r})",
                            autograd=_AUTOGRAD)


def _event_adjoint(adapter, func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol, adjoint_atol,
                   adjoint_method, adjoint_options, adjoint_params):
    """``odeint_adjoint(..., event_fn=...)`` with a rampde method: ``(event_t, [y0, y(event_t)])``.

    The event is found by the forward method's own event search (``_events``: no graph); then the
    quadrature adjoint runs over ``[t0, event_t]`` as over any output interval.  Its forward is a fresh
    solve to ``event_t``: an adaptive explicit method takes the search's steps again (torchdiffeq's
    controller does not look at the end time) and reads ``y(event_t)`` off the same dense output; a
    fixed grid ends with a short step onto ``event_t``; an implicit adaptive method lands on it.  As in
    torchdiffeq's adjoint, ``event_t`` is returned as part of the graph but nothing is differentiated
    through it here: its gradient is ``odeint_event``'s implicit-function term."""
    from torchdiffeq._impl.odeint import SOLVERS

    search = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
    with torch.no_grad():
        event_t, found = search.integrate_until_event(t[0].detach(), event_fn)
    event_t = event_t.to(t.dtype)
    if not bool(event_t > t[0].detach()):  # the event function is zero at the start: y0 is the answer
        sol = torch.stack([y0, y0]).to(found.dtype)
        return _EventTime.apply(event_t, sol) if sol.requires_grad else event_t, sol
    times = torch.cat([t[:1], event_t.reshape(1)])
    sol = quadrature_adjoint(adapter, func, y0, times, rtol, atol, method, options, None, adjoint_rtol, adjoint_atol,
                             adjoint_method, adjoint_options, adjoint_params)
    return (_EventTime.apply(event_t, sol) if sol.requires_grad else event_t), sol


class _EventTime(torch.autograd.Function):
    """``event_t`` as an output of the adjoint's graph (``event_t.backward()`` runs, as with
    torchdiffeq's own adjoint Function) that contributes no gradient: see :func:`_event_adjoint`."""

    @staticmethod
    def forward(ctx, event_t, sol):
        return event_t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _same(a, b) -> bool:
    """Are two tolerances (numbers or tensors) equal?"""
    try:
        return bool(torch.equal(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))
    except (TypeError, RuntimeError):
        return False


class _ReversedGrid:
    """``grid_constructor`` of one backward interval: the forward grid's points inside it, reversed."""

    def __init__(self, grid):
        self.grid = grid.detach().to(torch.float64)

    def __call__(self, func, y0, times):
        # times: [t_i, nodes..., t_{i-1}] decreasing (torchdiffeq negates it back for the solver)
        hi, lo = times[0].to(torch.float64), times[-1].to(torch.float64)
        g = self.grid.to(times.device)
        inner = g[(g > lo) & (g < hi)].flip(0)
        return torch.cat([times[:1].to(torch.float64), inner, times[-1:].to(torch.float64)]).to(times.dtype)
