"""The torchdiffeq solver class that runs a registered tableau on the rampde engine."""

from __future__ import annotations

import math
import numbers

import torch

from rampde_plugins import (
    INTERPOLATIONS,
    OptionSyntax,
    PrecisionPolicy,
    configure,
    get_registry,
    solve_adaptive,
    solve_grid,
)

from ._adaptive import ADAPTIVE_OPTIONS, TorchdiffeqController, check_tolerance, make_interp
from ._events import integrate_until_event

#: Options a rampde method accepts in ``odeint(..., options=...)`` on a fixed grid (and, for the
#: last three, always).  Methods with an embedded error estimate run adaptively unless `step_size` or
#: `grid_constructor` is given, and then accept ADAPTIVE_OPTIONS instead of the grid options.
FIXED_GRID_ONLY = ("step_size", "grid_constructor", "interp", "perturb")
OPTIONS = {
    "step_size": "fixed step; the grid is t[0] + k*step_size with the last point moved to t[-1]",
    "grid_constructor": "callable (func, y0, t) -> grid, exclusive with step_size",
    "interp": "'linear' (default) or 'cubic' output between grid points",
    "perturb": "evaluate just inside each step's ends (for fields that jump at grid points)",
    "precision": "precision policy name or PrecisionPolicy (default: from torch.autocast / y0's dtype)",
    "scaler": "rampde_plugins.AdjointScaler carrying the fp16 adjoint scale across iterations",
    "adjoint_params": "tensors to differentiate when func is not an nn.Module owning them",
    "checkpoint": "what the forward keeps for the backward: 'steps' (default), 'graphs', an integer c "
                  "(binomial, c stored states) or a rampde_plugins schedule object",
    "memory_budget": "bytes or a size such as '512MB': rampde runs the first of 'graphs', 'steps', binomial whose "
                     "predicted peak fits (exclusive with checkpoint)",
    "linear_solver": "implicit methods: 'auto' (default), 'dense' (LU of the Jacobian) or 'krylov' (matrix-free GMRES)",
    "newton": "implicit methods: dict of rampde_plugins.NewtonOptions fields (rtol, atol, max_iter, linear_rtol, "
              "dense_max); default tolerances 1e-2 x the solver's rtol/atol",
}
# torchdiffeq hands these to every solver; a fixed grid has no use for them.
_HOST_ARGS = ("rtol", "atol", "norm")


def parse_options(method: str, options, *, rtol=None, atol=None) -> dict:
    """Validate ``options`` of ``method``; returns a clean dict, with the shared options as a
    ``rampde_plugins`` solve configuration under ``"config"`` (``rtol``/``atol``: the solve's, for
    Newton's defaults).  Raises ValueError/TypeError."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS) - set(ADAPTIVE_OPTIONS) - set(_HOST_ARGS))
    if unknown:
        raise ValueError(
            f"odeint(method={method!r}): unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(OPTIONS)} (fixed grid), {', '.join(ADAPTIVE_OPTIONS)} (adaptive)"
        )
    out = {k: options.get(k) for k in OPTIONS}
    out["adaptive"] = {k: options[k] for k in ADAPTIVE_OPTIONS if k in options}
    step = out["step_size"]
    if step is not None:
        value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"odeint(method={method!r}): options['step_size']={step!r} must be a positive finite number")
        if out["grid_constructor"] is not None:
            raise ValueError(f"odeint(method={method!r}): options 'step_size' and 'grid_constructor' are mutually exclusive")
    if out["grid_constructor"] is not None and not callable(out["grid_constructor"]):
        raise TypeError(f"odeint(method={method!r}): options['grid_constructor'] must be callable (func, y0, t) -> grid")
    interp = "linear" if out["interp"] is None else out["interp"]
    if interp not in INTERPOLATIONS:
        raise ValueError(f"odeint(method={method!r}): options['interp']={interp!r}; choose one of {', '.join(INTERPOLATIONS)}")
    out["interp"] = interp
    out["perturb"] = bool(out["perturb"])
    # the options every host shares: validated once, by the core, in this host's spelling
    tableau = get_registry().tableau(method[len("rampde_"):] if method.startswith("rampde_") else method)
    config = configure(
        tableau, OptionSyntax(f"odeint(method={method!r})", "options['{name}']"),
        precision=out["precision"], checkpoint=out["checkpoint"], memory_budget=out.pop("memory_budget"),
        newton=out["newton"], linear_solver=out["linear_solver"], scaler=out["scaler"], params=out["adjoint_params"],
        rtol=rtol, atol=atol, params_option="adjoint_params",
    )
    out["config"] = config
    out["checkpoint"], out["newton"], out["adjoint_params"] = config.schedule, config.newton, config.params
    return out


def _grid_from_step_size(t: torch.Tensor, step_size) -> torch.Tensor:
    """torchdiffeq's grid: t0 + k*h, last point replaced by t[-1]."""
    start, end = t[0], t[-1]
    niters = int(torch.ceil((end - start) / step_size + 1).item())
    grid = torch.arange(0, niters, dtype=t.dtype, device=t.device).mul_(step_size).add_(start)
    # in place: a concatenated copy would hold the grid twice at the peak of a long solve
    grid[-1] = end
    return grid


class RampdeFixedGridSolver:
    """Base of the classes put into torchdiffeq's ``SOLVERS`` (one subclass per tableau)."""

    tableau_name: str = ""
    _rampde = True  # marks classes this adapter owns (uninstall removes only these)

    def __init__(self, func, y0, rtol=None, atol=None, norm=None, **options):
        self.method = f"rampde_{self.tableau_name}"
        self.options = opts = parse_options(self.method, options, rtol=rtol, atol=atol)
        self.tableau = opts["config"].tableau
        self.adaptive = self.tableau.b_err is not None and opts["step_size"] is None and opts["grid_constructor"] is None
        if self.adaptive:
            grid_opts = [k for k in FIXED_GRID_ONLY if options.get(k) not in (None, False, "linear")]
            if grid_opts:
                raise ValueError(
                    f"odeint(method={self.method!r}): option(s) {grid_opts} apply to fixed grids; this method adapts "
                    "its steps (pass step_size or grid_constructor for a fixed grid)"
                )
        elif opts["adaptive"]:
            raise ValueError(
                f"odeint(method={self.method!r}): option(s) {sorted(opts['adaptive'])} apply to adaptive steps; "
                + ("this method has no error estimate" if self.tableau.b_err is None else "a fixed grid was requested")
            )
        self.rtol, self.atol, self.norm = rtol, atol, norm
        self.func = func
        self.y0 = y0
        self.last_grid = None
        # Set by the quadrature adjoint: the accepted step size at each output (output_steps, adaptive).
        self.track_output_steps, self.output_steps = False, None
        # After an event solve: {"steps", "rejected", "search_nfe"} of its search (integrate_until_event).
        self.last_event = None
        self.dtype = y0.dtype
        self.device = y0.device

    @classmethod
    def valid_callbacks(cls):
        callbacks = {"callback_step"}
        if get_registry().tableaus.get(cls.tableau_name) is not None and get_registry().tableau(cls.tableau_name).b_err is not None:
            callbacks |= {"callback_accept_step", "callback_reject_step"}
        return callbacks

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        opts = self.options
        if opts["step_size"] is not None:
            grid = _grid_from_step_size(t, opts["step_size"])
        elif opts["grid_constructor"] is not None:
            grid = opts["grid_constructor"](self.func, self.y0, t)
        else:
            return t
        if not isinstance(grid, torch.Tensor) or grid.ndim != 1 or grid.shape[0] < 2:
            raise ValueError(f"{self.method}: the time grid must be a 1-D tensor with at least 2 points")
        grid = grid.to(t.dtype)
        g = grid.detach().cpu()
        if g[0] != t[0].item() or g[-1] != t[-1].item():
            raise ValueError(
                f"{self.method}: the time grid must start at t[0]={t[0].item()!r} and end at t[-1]={t[-1].item()!r}; "
                f"got [{g[0].item()!r}, {g[-1].item()!r}]"
            )
        # torchdiffeq's step_size grid can put its second-to-last point on or past t[-1] (rounding
        # in arange * h); that last step would be empty or negative, so merge it into its neighbour.
        keep = g.shape[0]
        while keep > 2 and g[keep - 2] >= g[-1]:
            keep -= 1
        if keep != g.shape[0]:
            grid = torch.cat([grid[: keep - 1], grid[-1:]])
        return grid

    def field(self, policy, time_dtype=None):
        """The user's function as the engine calls it: ``f(t, y)`` with ``t`` cast to the dtype
        torchdiffeq's own methods pass a float32/float64 state (unless it already is ``time_dtype``).

        torchdiffeq wraps the user's function in _PerturbFunc, which casts t to the state's dtype
        (fp16 for an fp16 state); the engine calls the function beneath it -- never with the
        controller's float64 leaking into a float32 field."""
        inner = getattr(self.func, "base_func", self.func)
        field_time = torch.promote_types(self.y0.abs().dtype, policy.state_dtype)
        return inner if field_time == time_dtype else _TimeCast(inner, field_time)

    def _policy(self) -> PrecisionPolicy:
        return self.options["config"].policy(self.y0)

    def _params_buffers(self):
        """The differentiated tensors and the buffers the field may write (BatchNorm's statistics:
        replayed and left as the forward wrote them)."""
        params = self.options["config"].params_of(self.func)
        buffers = tuple(self.func.buffers()) if isinstance(self.func, torch.nn.Module) else ()
        return params, buffers

    def _engine_kwargs(self, policy, params, buffers) -> dict:
        """What every engine solve of this solver passes besides the field, the times and the method."""
        opts = self.options
        return dict(
            policy=policy, params=params, buffers=buffers, scaler=opts["scaler"], method=self.method,
            param_hint="pass them explicitly: options={'adjoint_params': (A, b)}",
            checkpoint=opts["checkpoint"], newton=opts["newton"],
            field_time_dtype=torch.promote_types(self.y0.abs().dtype, policy.state_dtype),
        )

    def _controller(self, land_at) -> TorchdiffeqController:
        """torchdiffeq's step-size control for this solve (``land_at``: times the steps land on)."""
        check_tolerance(self._policy(), self.rtol, f"odeint(method={self.method!r})")
        return TorchdiffeqController(
            self.func, self.y0, self.tableau.order, self.rtol, self.atol, self.norm,
            method=self.method, **self.options["adaptive"], land_at=land_at,
        )

    def integrate(self, t: torch.Tensor) -> torch.Tensor:
        opts = self.options
        policy = self._policy()
        if t.shape[0] == 1:  # a copy, as torchdiffeq's own solvers return (never y0's storage)
            return self.y0.to(policy.output, copy=True).unsqueeze(0)
        engine_time = torch.float64 if self.adaptive else torch.promote_types(t.dtype, policy.state_dtype)
        inner = self.field(policy, engine_time)
        params, buffers = self._params_buffers()
        kw = self._engine_kwargs(policy, params, buffers)
        callback = getattr(self.func, "callback_step", None)
        if callback is not None and _is_null_callback(callback):
            callback = None
        if self.adaptive:
            # An implicit method's steps land on the outputs (as on step_t) instead of stepping
            # past them and interpolating: its dense output runs through stage states (or stage
            # slopes, which a stiff component amplifies) accurate only to the stage order, 2 --
            # kvaerno5 at rtol 1e-6 was 68x the tolerance at HIRES's final time and 213x at an
            # interpolated t = 40 on Robertson, against 2.9x and <10x when its steps land there.
            controller = self._controller(land_at=t[1:] if self.tableau.implicit else None)
            if self.track_output_steps:
                controller.track(t[1:])
                self.output_steps = controller.output_steps
            return solve_adaptive(
                inner, self.y0, t, tableau=self.tableau, controller=controller,
                interp=make_interp(self.tableau_name, self.tableau),
                callback_step_adjoint=getattr(self.func, "callback_step_adjoint", None),
                callback_accept_step_adjoint=getattr(self.func, "callback_accept_step_adjoint", None),
                **kw,
            )
        self.last_grid = grid = self._grid(t)  # the quadrature adjoint's backward reverses it
        return solve_grid(
            inner,
            self.y0,
            grid,
            t,
            tableau=self.tableau,
            interp=opts["interp"],
            perturb=opts["perturb"],
            callback_step=callback,
            callback_step_adjoint=getattr(self.func, "callback_step_adjoint", None),
            **kw,
        )

    def integrate_until_event(self, t0, event_fn):
        """torchdiffeq's event mode: ``(event_t, [y0, y(event_t)])``, the solve ending where the event
        function changes sign (see :mod:`rampde_torchdiffeq._events` for the search, the root finding and
        the gradient).  ``self.last_event`` then holds the search's steps, rejections and evaluations."""
        return integrate_until_event(self, t0, event_fn)


class _TimeCast:
    """``f(t.to(dtype), y)``: the field's time in the dtype torchdiffeq's own methods pass."""

    __slots__ = ("f", "dtype")

    def __init__(self, f, dtype):
        self.f, self.dtype = f, dtype

    def __call__(self, t, y):
        return self.f(t.to(self.dtype), y)


def _is_null_callback(cb) -> bool:
    try:
        from torchdiffeq._impl.misc import _null_callback
    except ImportError:  # pragma: no cover - callbacks API absent (< 0.2.4)
        return False
    return cb is _null_callback


def make_solver_class(tableau) -> type:
    """A torchdiffeq solver class for one registered tableau."""
    return type(
        f"Rampde_{tableau.name}",
        (RampdeFixedGridSolver,),
        {
            "tableau_name": tableau.name,
            "order": tableau.order,
            "__doc__": f"rampde engine running {tableau.description or tableau.name} (order {tableau.order}).",
            "__module__": __name__,
        },
    )
