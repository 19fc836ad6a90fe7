"""``rampde_plugins.solve``: one host-neutral entry to the engine, for adapters and for direct use.

It takes a field ``f(t, y)``, an initial state, output times and a registered method, and returns the
solution at the output times with a backward that is either rampde's exact discrete adjoint (under
any checkpoint schedule) or the Gauss--Legendre quadrature adjoint.  No host library is imported:
the torchsde adapter solves its Wong--Zakai ODEs here, so it works whether or not torchdiffeq (or its
adapter) is installed.

What runs is what the torchdiffeq adapter runs for ``odeint(..., method="rampde_<name>")``, so the
two give the same numbers:

* fixed steps on ``grid`` (or on ``t0 + k * step_size``, the last point replaced by ``t[-1]``), with
  outputs on the grid or interpolated (``interp``);
* adaptive steps when the method has an error estimate and no grid is given: Hairer's initial step
  selection, the RMS norm of the error relative to ``atol + rtol * max(|y0|, |y1|)``, the step-size
  update ``h * min(ifactor, max(safety * ratio^(-1/order), dfactor))`` (no shrink limit on an accepted
  step) and the last stage reused as the next step's first.  Outputs are read off the quartic through
  ``y0``, ``y1``, a mid-step value and the end slopes for the pairs whose mid-step weights are known
  (dopri5, bosh3, fehlberg2, adaptive_heun), off the stage states for implicit methods (whose steps
  land on the outputs) and off cubic Hermite otherwise;
* the quadrature adjoint integrates ``[x, a]`` back through each output interval with the adjoint
  method: on the forward grid reversed (fixed steps, outputs read off cubic Hermite), or adaptively
  with ``adjoint_rtol``/``adjoint_atol`` under the norm ``max(rms(x), rms(a))``, each interval starting
  with the step the forward accepted across its output.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Mapping, Sequence

import torch

from ._engine import (
    INTERPOLATIONS,
    QUADRATURE_OPTIONS,
    QuadratureOptions,
    QuadratureProblem,
    StageInterpolation,
    StepData,
    RmsController,
    newton_options,
    quadrature_options,
    solve_adaptive,
    solve_grid,
    solve_quadrature,
)
from ._engine._controller import rms_norm
from ._config import ADJOINTS, OptionSyntax, configure
from ._manager import get_registry
from ._policy import PrecisionPolicy, check_tolerance
from ._scaler import AdjointScaler

__all__ = ["solve", "SOLVE_ADJOINTS"]

#: ``adjoint=``: rampde's exact discrete adjoint of the steps, or the Gauss--Legendre quadrature adjoint.
SOLVE_ADJOINTS = ADJOINTS

_PARAM_HINT = "pass them explicitly: rampde_plugins.solve(..., params=(A, b))"

#: The mid-step weights ``w`` of the quartic dense output (``y(t0 + h/2) ~ y0 + h * sum_i w_i k_i``) of
#: the embedded pairs that carry one, with the solution weights ``b`` they belong to: a method is read
#: with them only when its name and its ``b`` both match.  dopri5: Shampine's continuous extension at
#: the mid-step (Dormand--Prince 5(4)); the low-order pairs take half a step of one stage.
_MID_STEP = {
    "dopri5": (
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
         187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2),
    ),
    "bosh3": ((2 / 9, 1 / 3, 4 / 9, 0.0), (0.0, 0.5, 0.0, 0.0)),
    "fehlberg2": ((1 / 512, 255 / 256, 1 / 512), (0.0, 0.5, 0.0)),
    "adaptive_heun": ((0.5, 0.5), (0.5, 0.0)),
}

_AUTOGRAD = ("a solver that backpropagates through its steps: a host library's own method (torchdiffeq's, "
             "torchode's AutoDiffAdjoint, torchsde's own methods)")


# -- validation --------------------------------------------------------------------------------------

def _owner(method) -> str:
    return f"rampde_plugins.solve(method={method!r})"


def _tableau(method, argument: str, owner: str):
    registry = get_registry()
    if not isinstance(method, str) or method not in registry.tableaus:
        hint = ""
        if isinstance(method, str) and method.startswith("rampde_") and method[len("rampde_"):] in registry.tableaus:
            hint = f" (the registry name of {method!r} is {method[len('rampde_'):]!r})"
        raise ValueError(f"{owner}: {argument}={method!r} is not a registered method{hint}; registered methods: "
                         f"{', '.join(sorted(registry.tableaus))}")
    return registry.tableau(method)


def _positive(value, argument: str, owner: str, *, allow_zero: bool = False, allow_inf: bool = False) -> None:
    v = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    ok = (not isinstance(v, bool) and isinstance(v, numbers.Real) and not math.isnan(v)
          and (v >= 0 if allow_zero else v > 0) and (allow_inf or math.isfinite(v)))
    if not ok:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{owner}: {argument}={value!r} must be {what}{'' if allow_inf else ' finite'} number")


def _tolerance(value, argument: str, owner: str) -> None:
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        if not value.is_floating_point() or value.requires_grad or not bool(
                (torch.isfinite(value) & (value >= 0)).all()):
            raise ValueError(f"{owner}: {argument} must hold non-negative finite numbers (and need no gradient)")
        return
    _positive(value, argument, owner, allow_zero=True)


def _check_times(t, y0, owner: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: t must be a 1-D torch.Tensor of output times, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{owner}: t has dtype {t.dtype}; use float32 or float64 (the state may still be low precision)")
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"{owner}: t must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    tc = t.detach().cpu()
    if not bool(torch.isfinite(tc).all()):
        raise ValueError(f"{owner}: t contains NaN or inf (first at index {int(torch.nonzero(~torch.isfinite(tc))[0])})")
    if tc.shape[0] > 1 and not bool((tc[1:] > tc[:-1]).all()):
        bad = int(torch.nonzero(~(tc[1:] > tc[:-1]))[0])
        raise ValueError(f"{owner}: t must be strictly increasing; t[{bad}]={tc[bad].item()!r}, "
                         f"t[{bad + 1}]={tc[bad + 1].item()!r}")
    return t if t.device == y0.device else t.to(y0.device)


def _check_grid(grid, t, owner: str) -> torch.Tensor:
    if not isinstance(grid, torch.Tensor) or grid.ndim != 1 or grid.shape[0] < 2 or not grid.is_floating_point():
        raise ValueError(f"{owner}: grid must be a 1-D floating-point tensor of at least 2 times, got "
                         f"{tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__}")
    grid = grid.to(device=t.device, dtype=t.dtype)
    g = grid.detach().cpu()
    if not bool(torch.isfinite(g).all()) or not bool((g[1:] > g[:-1]).all()):
        raise ValueError(f"{owner}: grid must be finite and strictly increasing")
    if g[0] != t[0].item() or g[-1] != t[-1].item():
        raise ValueError(f"{owner}: grid must start at t[0]={t[0].item()!r} and end at t[-1]={t[-1].item()!r}; got "
                         f"[{g[0].item()!r}, {g[-1].item()!r}]")
    return grid


def _grid_from_step_size(t: torch.Tensor, step_size) -> torch.Tensor:
    """``t[0] + k * step_size`` up to ``t[-1]``, whose last point is replaced by ``t[-1]`` itself; a
    second-to-last point that rounding put on or past ``t[-1]`` is merged into the last step."""
    start, end = t[0], t[-1]
    count = int(torch.ceil((end - start) / step_size + 1).item())
    grid = torch.arange(0, count, dtype=t.dtype, device=t.device).mul_(step_size).add_(start)
    grid[-1] = end
    return _merge_short_end(grid)


def _merge_short_end(grid: torch.Tensor) -> torch.Tensor:
    g = grid.detach().cpu()
    keep = g.shape[0]
    while keep > 2 and g[keep - 2] >= g[-1]:
        keep -= 1
    return grid if keep == g.shape[0] else torch.cat([grid[: keep - 1], grid[-1:]])


# -- fields ------------------------------------------------------------------------------------------

class _TimeCast:
    """``f(t.to(dtype), y)``: the field sees its time in the dtype of the state (or wider)."""

    __slots__ = ("f", "dtype")

    def __init__(self, f, dtype):
        self.f, self.dtype = f, dtype

    def __call__(self, t, y):
        return self.f(t.to(self.dtype), y)


class _Reversed:
    """``s -> -f(-s, z)``: a field integrated through decreasing times ``t = -s`` as increasing ``s``."""

    __slots__ = ("f",)

    def __init__(self, f):
        self.f = f

    def __call__(self, s, z):
        return -1.0 * self.f(-s, z)


def _field(f, y0, policy, engine_time):
    field_time = torch.promote_types(y0.abs().dtype, policy.state_dtype)
    return (f if field_time == engine_time else _TimeCast(f, field_time)), field_time


# -- adaptive steps ----------------------------------------------------------------------------------

def _dense_output(tableau):
    """``interp(step_data, t)`` of an adaptive solve (see the module docstring)."""
    if tableau.implicit:
        stages = StageInterpolation(tableau)
        return lambda sd, t: stages(sd).at(t)
    known = _MID_STEP.get(tableau.name)
    if known is not None and len(known[0]) == len(tableau.b) and all(
            abs(x - y) <= 1e-12 for x, y in zip(known[0], tableau.b)):
        mid = known[1]

        def quartic(sd, t):
            dt = sd.h.to(sd.y0.dtype)
            y_mid = sd.y0 + dt * sum(w * k for w, k in zip(mid, sd.ks) if w != 0.0)
            return _quartic(sd.y0, sd.y1, y_mid, sd.ks[0], sd.ks[-1], dt, sd.t0, sd.t1, t)

        return quartic

    return StepData.hermite


def _quartic(y0, y1, y_mid, f0, f1, dt, t0, t1, t):
    """The quartic ``p(x)``, ``x = (t - t0) / (t1 - t0)``, with ``p(0) = y0``, ``p(1/2) = y_mid``,
    ``p(1) = y1``, ``p'(0) = dt f0`` and ``p'(1) = dt f1``, evaluated by powers of ``x``."""
    # (highest power first: the order the graph is built in decides how the backward sums gradients)
    x4 = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    x3 = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    x2 = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    coefficients = (y0, dt * f0, x2, x3, x4)
    x = ((t - t0) / (t1 - t0)).to(y0.dtype)
    total = coefficients[0] + x * coefficients[1]
    power = x
    for c in coefficients[2:]:
        power = power * x
        total = total + power * c
    return total


# -- the solve ---------------------------------------------------------------------------------------

class _Plan:
    """A validated solve: everything the forward (and the quadrature adjoint's backward) needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def forward(self, f, y0, t, *, params, buffers, checkpoint, track=False):
        """One solve of ``f`` from ``y0`` through ``t`` (``track``: record the grid or the output steps)."""
        policy = self.policy
        if self.adaptive:
            inner, field_time = _field(f, y0, policy, torch.float64)
            check_tolerance(policy, self.rtol, self.owner)
            controller = RmsController(y0, self.tableau.order, self.rtol, self.atol, first_step=self.first_step,
                                     land_at=t[1:] if self.tableau.implicit else None, owner=self.owner,
                                     **self.steps)
            if track:
                controller.track(t[1:])
                self.output_steps = controller.output_steps
            return solve_adaptive(
                inner, y0, t, tableau=self.tableau, policy=policy, controller=controller,
                interp=_dense_output(self.tableau), params=params, buffers=buffers, scaler=self.scaler,
                method=self.name, param_hint=_PARAM_HINT, checkpoint=checkpoint, newton=self.newton,
                field_time_dtype=field_time,
            )
        inner, field_time = _field(f, y0, policy, torch.promote_types(t.dtype, policy.state_dtype))
        if self.grid is not None:
            grid = self.grid
        elif self.step_size is not None:
            grid = _grid_from_step_size(t, self.step_size)
        else:
            grid = t
        if track:
            self.last_grid = grid
        return solve_grid(
            inner, y0, grid, t, tableau=self.tableau, policy=policy, params=params, buffers=buffers,
            interp=self.interp, perturb=self.perturb, scaler=self.scaler, method=self.name, param_hint=_PARAM_HINT,
            checkpoint=checkpoint, newton=self.newton, field_time_dtype=field_time,
        )


def solve(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    method: str,
    precision: str | PrecisionPolicy | None = None,
    step_size: float | None = None,
    grid: torch.Tensor | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    first_step: float | None = None,
    min_step: float = 0.0,
    max_step: float = math.inf,
    safety: float = 0.9,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
    max_num_steps: int = 2**31 - 1,
    interp: str = "linear",
    perturb: bool = False,
    adjoint: str = "discrete",
    checkpoint=None,
    memory_budget=None,
    quadrature: Mapping | QuadratureOptions | None = None,
    adjoint_method: str | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    params: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    newton=None,
    linear_solver: str | None = None,
) -> torch.Tensor:
    """Solve ``dy/dt = f(t, y)`` from ``y0`` at ``t[0]`` and return the solution at the times ``t``.

    Args:
        f: the field, ``f(t, y) -> dy/dt`` with ``t`` a 0-d tensor (in the state dtype, or wider) and ``y``
            of ``y0``'s shape; an ``nn.Module``'s parameters are differentiated (see ``params``).
        y0: the initial state, a floating-point tensor of any shape.
        t: strictly increasing 1-D float32/float64 output times; ``t[0]`` is the start.
        method: a registered method (tableau) name, e.g. ``"rk4"`` or ``"dopri5"``
            (``rampde_plugins.get_registry().tableaus``).
        precision: a registered precision policy name or a ``PrecisionPolicy`` (default: from the active
            ``torch.autocast`` and ``y0``'s dtype).
        step_size, grid: fixed steps -- of ``step_size`` from ``t[0]`` (the last one shortened onto ``t[-1]``),
            or on the 1-D ``grid`` from ``t[0]`` to ``t[-1]`` (outputs between grid points are interpolated,
            ``interp``).  Neither: adaptive steps for a method with an error estimate, else one step per
            output interval.
        rtol, atol: adaptive steps: the error tolerances (non-negative numbers, or tensors per component).
        first_step, min_step, max_step, safety, ifactor, dfactor, max_num_steps: adaptive steps: the first
            step (default: chosen from the field), the bounds of the step size, the step-size update's
            safety factor and its largest growth and shrink factors, and the most trial steps.
        interp, perturb: fixed steps: ``"linear"`` or ``"cubic"`` output between grid points; evaluate just
            inside each step's ends (a field that jumps at grid points).
        adjoint: ``"discrete"`` (the exact gradient of the steps that ran) or ``"quadrature"`` (the
            Gauss--Legendre quadrature adjoint: the continuous gradient to the backward solve's tolerance,
            memory flat in the number of steps; the field must be the same function at every evaluation).
        checkpoint, memory_budget: the discrete adjoint: what the forward keeps for the backward --
            ``"steps"`` (default), ``"graphs"``, an integer (binomial checkpoints) or a schedule object
            (``rampde_plugins.SegmentsSchedule(k)``, ...) -- or a budget (bytes, ``"512MB"``) rampde picks
            a schedule for.  One of the two at most.
        quadrature, adjoint_method, adjoint_rtol, adjoint_atol: the quadrature adjoint: its node rule
            (a mapping with ``rampde_plugins.QUADRATURE_OPTIONS`` keys, or a ``QuadratureOptions``), the
            method of its backward solves (default ``method``; fixed steps replay the forward grid reversed,
            adaptive steps need an error estimate) and their tolerances (default ``rtol``/``atol``).
        params: the tensors differentiated besides ``y0`` and ``t`` (default: ``f.parameters()`` for an
            ``nn.Module``, else none).  A tensor requiring grad that ``f`` uses but ``params`` lacks raises.
        scaler: a ``rampde_plugins.AdjointScaler`` carrying the fp16 adjoint scale across iterations.
        newton, linear_solver: implicit methods: ``NewtonOptions`` fields (a dict) and ``"auto"``,
            ``"dense"`` or ``"krylov"``; Newton's default tolerances are 1e-2 of ``rtol``/``atol``.

    Returns:
        ``(len(t), *y0.shape)`` in the policy's output dtype.  :func:`rampde_plugins.collect_stats`
        records the solve.

    Raises:
        ValueError / TypeError: naming the argument, its value and the valid choices, before anything is
        evaluated.
    """
    owner = _owner(method)
    tableau = _tableau(method, "method", owner)
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"{owner}: y0 must be a torch.Tensor, got {type(y0).__name__}")
    if not torch.is_floating_point(y0):
        raise TypeError(f"{owner}: y0 must be floating point, got {y0.dtype}")
    finite = torch.isfinite(y0)
    if not bool(finite.all()):
        raise ValueError(f"{owner}: y0 contains NaN or inf (first at flat index "
                         f"{int(torch.nonzero((~finite).reshape(-1))[0])})")
    t = _check_times(t, y0, owner)
    if not callable(f):
        raise TypeError(f"{owner}: f must be callable f(t, y), got {type(f).__name__}")
    # the options every host shares (precision, adjoint, checkpoint, Newton, scaler, params)
    config = configure(tableau, OptionSyntax(owner), precision=precision, adjoint=adjoint, checkpoint=checkpoint,
                       memory_budget=memory_budget, newton=newton, linear_solver=linear_solver, scaler=scaler,
                       params=params, rtol=rtol, atol=atol)
    quadrature_adjoint = config.adjoint == "quadrature"
    policy = config.policy(y0)

    # the steps
    if step_size is not None and grid is not None:
        raise ValueError(f"{owner}: step_size={step_size!r} and grid= both set the fixed steps; give one of them")
    if step_size is not None:
        _positive(step_size, "step_size", owner)
    if grid is not None:
        grid = _check_grid(grid, t, owner)
        grid = _merge_short_end(grid)
    adaptive = tableau.b_err is not None and step_size is None and grid is None
    steps = dict(min_step=min_step, max_step=max_step, safety=safety, ifactor=ifactor, dfactor=dfactor,
                 max_num_steps=max_num_steps)
    defaults = dict(min_step=0.0, max_step=math.inf, safety=0.9, ifactor=10.0, dfactor=0.2, max_num_steps=2**31 - 1)
    if adaptive:
        for name in ("rtol", "atol"):
            _tolerance(locals()[name], name, owner)
        if first_step is not None:
            _positive(first_step, "first_step", owner)
        _positive(min_step, "min_step", owner, allow_zero=True)
        _positive(max_step, "max_step", owner, allow_inf=True)
        if not min_step <= max_step:
            raise ValueError(f"{owner}: min_step={min_step!r} exceeds max_step={max_step!r}")
        for name in ("safety", "ifactor", "dfactor"):
            _positive(steps[name], name, owner)
        if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
            raise ValueError(f"{owner}: max_num_steps={max_num_steps!r} must be a positive integer")
        if interp != "linear" or perturb:
            given = [n for n, v in (("interp", interp != "linear"), ("perturb", perturb)) if v]
            raise ValueError(f"{owner}: {', '.join(given)} apply to fixed steps; {method!r} adapts its steps here "
                             "(give step_size or grid for fixed steps)")
    else:
        given = [n for n, v in steps.items() if v != defaults[n]] + (["first_step"] if first_step is not None else [])
        if given:
            why = "it has no error estimate" if tableau.b_err is None else "fixed steps were asked for"
            raise ValueError(f"{owner}: {', '.join(given)} apply to adaptive steps; {method!r} takes fixed steps "
                             f"({why})")
        if interp not in INTERPOLATIONS:
            raise ValueError(f"{owner}: interp={interp!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if not isinstance(perturb, bool):
            raise TypeError(f"{owner}: perturb must be True or False, got {type(perturb).__name__}")
        if tableau.implicit or tableau.b_err is None:  # rtol/atol only set Newton's tolerances here
            for name in ("rtol", "atol"):
                _tolerance(locals()[name], name, owner)

    # the adjoint
    newton_spec, newton, params = newton, config.newton, config.params
    if quadrature_adjoint:
        if quadrature is not None and not isinstance(quadrature, (Mapping, QuadratureOptions)):
            raise TypeError(f"{owner}: quadrature must be a mapping with keys {', '.join(QUADRATURE_OPTIONS)} or a "
                            f"QuadratureOptions, got {type(quadrature).__name__}")
        options = quadrature_options(quadrature, owner=f"{owner}: quadrature")
        back_tableau = tableau if adjoint_method is None else _tableau(adjoint_method, "adjoint_method", owner)
        if adaptive and back_tableau.b_err is None:
            raise ValueError(f"{owner}: adjoint_method={adjoint_method!r} has no error estimate, but the forward adapts "
                             "its steps and so does the backward; name a method with one (e.g. 'dopri5')")
        back_rtol = rtol if adjoint_rtol is None else adjoint_rtol
        back_atol = atol if adjoint_atol is None else adjoint_atol
        if adaptive:
            for name, value in (("adjoint_rtol", back_rtol), ("adjoint_atol", back_atol)):
                _tolerance(value, name, owner)
        else:
            given = [n for n, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)) if v is not None]
            if given and not back_tableau.implicit:
                raise ValueError(f"{owner}: {', '.join(given)} apply to adaptive steps; the backward of fixed steps "
                                 "replays the forward's grid reversed")
        back_newton = None
        if back_tableau.implicit:
            back_newton = newton_options(newton_spec, owner=f"{owner}: newton", linear_solver=linear_solver,
                                         rtol=back_rtol, atol=back_atol)
    else:
        given = [n for n, v in (("quadrature", quadrature), ("adjoint_method", adjoint_method),
                                ("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)) if v is not None]
        if given:
            raise ValueError(f"{owner}: {', '.join(given)} apply to adjoint='quadrature' (the discrete adjoint "
                             "replays the forward's own steps)")
        schedule = config.schedule
        if adaptive and not schedule.adaptive_ok:
            raise ValueError(f"{owner}: checkpoint={checkpoint!r} is not available with adaptive steps; use "
                             "'steps', an integer (binomial) or a SegmentsSchedule, or fixed steps (step_size or grid)")

    plan = _Plan(tableau=tableau, name=f"rampde_{tableau.name}", owner=owner, policy=policy, adaptive=adaptive,
                 grid=grid, step_size=step_size, rtol=rtol, atol=atol, first_step=first_step, steps=steps,
                 interp=interp, perturb=perturb, scaler=scaler, newton=newton if tableau.implicit else None)
    if t.shape[0] == 1:  # a copy, never y0's storage
        return y0.to(policy.output, copy=True).unsqueeze(0)
    if params is None:
        params = tuple(f.parameters()) if isinstance(f, torch.nn.Module) else ()
    buffers = tuple(f.buffers()) if isinstance(f, torch.nn.Module) else ()
    if not quadrature_adjoint:
        return plan.forward(f, y0, t, params=params, buffers=buffers, checkpoint=schedule)
    back = _Plan(**{**plan.__dict__, "tableau": back_tableau, "name": f"rampde_{back_tableau.name}",
                    "rtol": back_rtol, "atol": back_atol, "newton": back_newton})
    return _quadrature(plan, back, f, y0, t, tuple(p for p in params if p.requires_grad), buffers, options)


# -- the quadrature adjoint --------------------------------------------------------------------------

def _adjoint_norm(z: torch.Tensor) -> torch.Tensor:
    """The backward solve's error norm on ``z = [x, a]``: the larger RMS of the two."""
    return max(torch.zeros((), dtype=z.dtype, device=z.device), rms_norm(z[0]), rms_norm(z[1]))


def _quadrature(plan: _Plan, back: _Plan, f, y0, t, params, buffers, options) -> torch.Tensor:
    field_time = torch.promote_types(y0.abs().dtype, plan.policy.state_dtype)
    # The backward starts each interval with the step the forward accepted across its output when it
    # runs the forward's method at the forward's tolerances (not the initial-step heuristic, which
    # costs two evaluations and a step the controller must grow from), unless first_step is given.
    seed = (plan.adaptive and back.tableau is plan.tableau and plan.first_step is None
            and _same(back.rtol, plan.rtol) and _same(back.atol, plan.atol))
    held = {}

    def forward(y0_):
        sol = plan.forward(f, y0_, t, params=params, buffers=buffers, checkpoint=None, track=True)
        held["grid"] = getattr(plan, "last_grid", None)
        held["steps"] = getattr(plan, "output_steps", None) if seed else None
        return sol

    def backsolve(aug, z0, times):
        # times: [t_i, nodes..., t_{i-1}], decreasing; solved as s = -times, increasing.
        s = -times
        field = _Reversed(aug)
        if not plan.adaptive:
            grid = held.get("grid")
            g = grid.detach().to(device=times.device, dtype=torch.float64)
            hi, lo = times[0].to(torch.float64), times[-1].to(torch.float64)
            inside = g[(g > lo) & (g < hi)].flip(0)
            reversed_grid = torch.cat([times[:1].to(torch.float64), inside, times[-1:].to(torch.float64)])
            run = _Plan(**{**back.__dict__, "grid": _merge_short_end(-reversed_grid.to(times.dtype)),
                           "step_size": None, "interp": "cubic"})
        else:
            first = back.first_step
            steps = held.get("steps")
            if steps:
                i = int((t.detach().to(torch.float64) - float(times[0])).abs().argmin())
                if 1 <= i <= len(steps):
                    first = steps[i - 1]
            run = _Plan(**{**back.__dict__, "first_step": first})
            return _solve_adaptive_with_norm(run, field, z0, s)
        return run.forward(field, z0, s, params=(), buffers=(), checkpoint=None)

    qp = QuadratureProblem(
        f=_TimeCast(f, field_time), policy=plan.policy, forward=forward, backsolve=backsolve, options=options,
        params=params, buffers=buffers, hint=_PARAM_HINT, scaler=plan.scaler, unused_zero=True, method=plan.name,
        implicit=plan.tableau.implicit,
    )
    out = solve_quadrature(qp, y0, t, owner=f"rampde_plugins.solve(method={plan.tableau.name!r}, adjoint='quadrature')",
                           instead="adjoint='discrete'", autograd=_AUTOGRAD)
    return out


def _solve_adaptive_with_norm(plan: _Plan, field, z0, s):
    """An adaptive backward solve of ``[x, a]`` under :func:`_adjoint_norm`."""
    policy = plan.policy
    inner, field_time = _field(field, z0, policy, torch.float64)
    check_tolerance(policy, plan.rtol, plan.owner)
    controller = RmsController(z0, plan.tableau.order, plan.rtol, plan.atol, norm=_adjoint_norm,
                             first_step=plan.first_step, land_at=s[1:] if plan.tableau.implicit else None,
                             owner=plan.owner, **plan.steps)
    return solve_adaptive(
        inner, z0, s, tableau=plan.tableau, policy=policy, controller=controller,
        interp=_dense_output(plan.tableau), params=(), buffers=(), scaler=plan.scaler, method=plan.name,
        param_hint=_PARAM_HINT, newton=plan.newton, field_time_dtype=field_time,
    )


def _same(a, b) -> bool:
    try:
        return bool(torch.equal(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))
    except (TypeError, RuntimeError):
        return False
