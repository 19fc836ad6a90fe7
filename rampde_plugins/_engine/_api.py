"""The engine's entry points: validation, the solve record, and forward or adjoint Function."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._policy import PrecisionPolicy
from .._probe import GraphCheck
from .._replay import StepReplay
from .._scaler import AdjointScaler
from .._stats import _new_record
from .._tableau import ButcherTableau
from ._adjoint import _HIGHER_ORDER, _apply
from ._drivers import BatchedStepController, StepController, _adaptive_forward, _batched_adaptive_once, _forward
from ._outputs import INTERPOLATIONS, BatchedOutputs, _SharedTimeOutputs
from ._problem import _check_storage, _Problem, _with_replay
from ._budget import MemoryBudget, checkpoint_schedule, resolve_budget
from ._implicit import newton_options
from ._steppers import make_stepper
from ._times import _check_time_dtype


def _check_increasing(grid_cpu: torch.Tensor, chunk: int = 1 << 16) -> None:
    """Raise unless the grid is finite and strictly increasing.

    A chunk at a time: whole-grid checks (``isfinite`` makes an ``abs`` copy, each comparison a
    mask) held about 7 bytes per step at once -- more than the grid itself -- on a long solve."""
    n = grid_cpu.shape[0]
    for c0 in range(0, n, chunk):
        part = grid_cpu[c0 : min(c0 + chunk, n - 1) + 1]
        if not bool(torch.isfinite(part).all()):
            raise ValueError("time grid and output times must be finite")
        ok = part[1:] > part[:-1]
        if not bool(ok.all()):
            bad = c0 + int(torch.nonzero(~ok)[0])
            raise ValueError(
                f"the time grid must be strictly increasing; grid[{bad}]={grid_cpu[bad].item()!r} >= "
                f"grid[{bad + 1}]={grid_cpu[bad + 1].item()!r}"
            )


def solve_grid(
    f: Callable,
    y0: torch.Tensor,
    grid: torch.Tensor,
    t_out: torch.Tensor,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    interp: str = "linear",
    perturb: bool = False,
    scaler: AdjointScaler | None = None,
    callback_step: Callable | None = None,
    callback_step_adjoint: Callable | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
    checkpoint=None,
    newton=None,
    field_time_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Solve ``dy/dt = f(t, y)`` on one shared time ``grid`` and return the solution at ``t_out``.

    Args:
        f: ``f(t, y)`` with ``t`` a 0-d tensor in full precision (the promotion of the grid's dtype and
            the state dtype) and ``y`` in the policy's state dtype; called under the policy's autocast.
        y0: initial state, any shape.
        grid: strictly increasing 1-D time grid, ``grid[0] == t_out[0]``.
        t_out: non-decreasing output times inside ``[grid[0], grid[-1]]``; ``t_out[0]`` returns ``y0``
            and ``t_out[j]`` for ``j >= 1`` is interpolated in the step with ``t_n < t_j <= t_{n+1}``
            (``y_{n+1}`` itself when ``t_j == t_{n+1}`` and ``interp == "linear"``).
        tableau, policy: the method and the precision policy.
        params: tensors the adjoint differentiates besides ``y0`` and the times (leaves, or tensors
            computed outside ``f`` such as ``c = encoder(x)``, whose gradient then flows on into
            their graph).  Tensors requiring grad that ``f`` uses but that are missing here raise a
            ``ValueError`` (at the forward, or at the backward step that uses them).
        buffers: module buffers ``f`` may write in place (BatchNorm's running statistics; default:
            ``f.buffers()`` when ``f`` is an ``nn.Module``).  With random numbers drawn by ``f``, they
            are replayed in each recomputed step and left as the forward wrote them.
        interp: ``"linear"`` or ``"cubic"`` (Hermite with the step's end slopes).
        perturb: evaluate the first stage just after ``t_n`` and stages at ``c == 1`` just before
            ``t_{n+1}`` (torchdiffeq's ``perturb``).
        scaler: a persistent :class:`AdjointScaler` for the ``"dynamic"`` scaling mode.
        callback_step: ``callback(t0, y0, dt)`` before each forward step.
        callback_step_adjoint: ``callback(t0, y0, dt)`` before each backward step.
        method: name recorded in the statistics.
        param_hint: how the caller's API declares parameters (ends the hidden-parameter error).
        field_time_dtype: the dtype ``f`` casts its time to, if narrower than the grid's: the time
            nudges of ``perturb`` are taken in it (so that they survive the cast).

    Returns:
        Tensor of shape ``(len(t_out), *y0.shape)`` in the policy's output dtype.
    """
    params = _common_checks(y0, params, policy)
    schedule = _schedule(checkpoint, adaptive=False)
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interp={interp!r} is not supported; choose one of {', '.join(INTERPOLATIONS)}")
    for name, t in (("time grid", grid), ("output times", t_out)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        _check_time_dtype(name, t)
    if grid.shape[0] < 2 or t_out.shape[0] < 1:
        raise ValueError(f"need at least 2 grid points and 1 output time, got {grid.shape[0]} and {t_out.shape[0]}")
    time_dtype = torch.promote_types(torch.promote_types(grid.dtype, t_out.dtype), policy.state_dtype)
    grid_t = grid.to(device=y0.device, dtype=time_dtype)
    t_out_t = t_out.to(device=y0.device, dtype=time_dtype)

    # Host-side bookkeeping, one synchronisation per solve: which output falls in which step.
    grid_cpu = grid_t.detach().cpu()
    tout_cpu = t_out_t.detach().cpu()
    if not bool(torch.isfinite(tout_cpu).all()):
        raise ValueError("time grid and output times must be finite")
    _check_increasing(grid_cpu)
    if tout_cpu[0] != grid_cpu[0] or tout_cpu[-1] > grid_cpu[-1] or bool((tout_cpu[1:] < tout_cpu[:-1]).any()):
        raise ValueError(
            "output times must be non-decreasing, start at the grid's first point and end inside the grid "
            f"(grid spans [{grid_cpu[0].item()}, {grid_cpu[-1].item()}], outputs [{tout_cpu[0].item()}, {tout_cpu[-1].item()}])"
        )
    prob = _new_problem(
        f, y0, tableau, policy, params, _SharedTimeOutputs(t_out_t, grid_cpu, interp), scaler, method, param_hint,
        schedule, n_steps=grid_cpu.shape[0] - 1, per_sample=False, perturb=bool(perturb), newton=newton,
        callback_step=callback_step, callback_step_adjoint=callback_step_adjoint, nudge_dtype=field_time_dtype,
    )
    return _run(prob, y0, grid_t, t_out_t, params, buffers)


def solve_batched(
    f: Callable,
    y0: torch.Tensor,
    grid: torch.Tensor,
    outputs: BatchedOutputs,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
    checkpoint=None,
    newton=None,
) -> torch.Tensor:
    """Solve a batch of problems with one time grid per sample (torchode's layout).

    Args:
        f: ``f(t, y)`` with ``t`` of shape ``(B,)`` in the grid's dtype (the problem's time dtype, never
            changed) and ``y`` of shape ``(B, ...)`` in the policy's state dtype.
        y0: ``(B, ...)`` initial states.
        grid: ``(N+1, B)`` per-sample times, monotone in each sample's direction; a sample that needs
            fewer steps repeats its end time (zero-length steps leave its state unchanged).
        outputs: the :class:`BatchedOutputs` plan (output times ``(B, M)`` and the interpolant).
        tableau, policy, params, buffers, scaler, method, param_hint: as in :func:`solve_grid`.

    Returns:
        ``(B, M, ...)`` solution at the output times, in the policy's output dtype.
    """
    params = _common_checks(y0, params, policy)
    schedule = _schedule(checkpoint, adaptive=False)
    _check_time_dtype("time grid", grid)
    t_eval = outputs.t_eval
    if grid.ndim != 2 or grid.shape[1] != y0.shape[0] or grid.shape[0] < 2:
        raise ValueError(f"per-sample grid must have shape (N+1, B={y0.shape[0]}) with N >= 1, got {tuple(grid.shape)}")
    if t_eval.ndim != 2 or t_eval.shape[0] != y0.shape[0] or t_eval.dtype != grid.dtype:
        raise ValueError(f"output times must have shape (B={y0.shape[0]}, M) and the grid's dtype {grid.dtype}")
    grid_cpu = grid.detach().cpu()
    outputs.plan(grid_cpu)
    prob = _new_problem(f, y0, tableau, policy, params, outputs, scaler, method, param_hint, schedule,
                        n_steps=grid_cpu.shape[0] - 1, per_sample=True, newton=newton)
    return _run(prob, y0, grid, t_eval, params, buffers)


def solve_adaptive(
    f: Callable,
    y0: torch.Tensor,
    t_out: torch.Tensor,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    controller: StepController,
    interp: Callable,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    callback_step_adjoint: Callable | None = None,
    callback_accept_step_adjoint: Callable | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
    checkpoint=None,
    newton=None,
    field_time_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Adaptive-step solve with one shared time, outputs at ``t_out`` (torchdiffeq's layout).

    The controller chooses the steps; the accepted steps are then treated as constants by the
    discrete adjoint (as ACA and PNODE do): the gradient is exact for the step sequence that was
    taken, and moving ``t_out[0]`` shifts the whole sequence.

    Args:
        interp: ``interp(step_data, t) -> y(t)`` dense output inside an accepted step (differentiable).
        controller: a :class:`StepController`.
        callback_step_adjoint, callback_accept_step_adjoint: ``callback(t0, y0, dt)`` before and after
            each accepted step is replayed by the backward (the discrete adjoint replays every
            accepted step once and rejects none).
        others: as in :func:`solve_grid`.

    Returns:
        ``(len(t_out), *y0.shape)`` in the policy's output dtype.
    """
    params = _common_checks(y0, params, policy)
    schedule = _schedule(checkpoint, adaptive=True)
    if not isinstance(t_out, torch.Tensor) or t_out.ndim != 1 or t_out.shape[0] < 1:
        raise ValueError("output times must be a non-empty 1-D tensor")
    _check_time_dtype("output times", t_out)
    time_dtype = torch.promote_types(t_out.dtype, policy.state_dtype)
    t_out_t = t_out.to(device=y0.device, dtype=time_dtype)
    tc = t_out_t.detach().cpu()
    if not bool(torch.isfinite(tc).all()) or bool((tc[1:] <= tc[:-1]).any()):
        raise ValueError("output times must be finite and strictly increasing")
    prob = _new_problem(
        f, y0, tableau, policy, params, _SharedTimeOutputs(t_out_t, None, interp), scaler, method, param_hint,
        schedule, n_steps=0, per_sample=False, nudge_end=True, callback_step_adjoint=callback_step_adjoint, newton=newton,
        callback_accept_step_adjoint=callback_accept_step_adjoint, nudge_dtype=field_time_dtype,
    )
    diff_params = _attach(prob, params, buffers, param_hint, y0.device)
    grad_mode = torch.is_grad_enabled()
    needs_graph = grad_mode and (y0.requires_grad or t_out_t.requires_grad or bool(diff_params))
    # Without an adjoint graph the forward keeps the caller's grad mode, so that a field output
    # that requires grad anyway (a hidden tensor) is seen and reported.
    prob.watch = grad_mode and not needs_graph
    prob.need_grid = prob.need_tout = bool(t_out_t.requires_grad)
    with torch.set_grad_enabled(prob.watch):
        sol, keeper, grid_values = _adaptive_forward(prob, y0, t_out_t, controller, probe=needs_graph)
    prob.n_steps = prob.record.n_steps
    if not needs_graph:
        return sol
    _check_storage(prob, keeper, grid_values)
    # Step sizes are constants: every accepted time moves with the start time.
    grid = grid_values + (t_out_t[0] - t_out_t[0].detach())
    prob.precomputed = (sol, keeper)
    return _apply(prob, y0, grid, t_out_t, diff_params)


def solve_batched_adaptive(
    f: Callable,
    y0: torch.Tensor,
    t_start: torch.Tensor,
    t_end: torch.Tensor,
    outputs: BatchedOutputs,
    *,
    tableau: ButcherTableau,
    policy: PrecisionPolicy,
    controller: BatchedStepController,
    dt0: torch.Tensor | None = None,
    max_steps: int | None = None,
    params: Sequence[torch.Tensor] = (),
    buffers: Sequence[torch.Tensor] | None = None,
    scaler: AdjointScaler | None = None,
    method: str | None = None,
    param_hint: str = "pass them in params",
    checkpoint=None,
    newton=None,
):
    """Adaptive steps with one step size per sample, all samples stepping together.

    Each iteration takes one trial step for every sample; samples accept or reject independently
    (a rejected or finished sample's entry is a zero-length step), and step sizes are clamped to each
    sample's remaining span.  Accepted step sizes are constants for the adjoint.  Every iteration
    stores the batch's state (the memory of a rejected iteration is that of its accepted samples).

    Args:
        buffers: module buffers the field may write (default: ``f.buffers()`` for an ``nn.Module``);
            see :func:`solve_grid`.

    Returns:
        ``(ys, info)`` with ``ys`` of shape ``(B, M, ...)`` and ``info`` a dict with per-sample
        ``n_steps``, ``n_accepted``, ``status`` (long tensors) and the grid.
    """
    params = _common_checks(y0, params, policy)
    schedule = _schedule(checkpoint, adaptive=True)
    if tableau.b_err is None:
        raise ValueError(f"method {tableau.name!r} has no embedded error estimate; it cannot adapt its step size")
    _check_time_dtype("start times", t_start)
    time_dtype = t_start.dtype
    prob = _new_problem(f, y0, tableau, policy, params, outputs, scaler, method, param_hint, schedule,
                        n_steps=0, per_sample=True, newton=newton)
    diff_params = _attach(prob, params, buffers, param_hint, y0.device)
    grad_mode = torch.is_grad_enabled()
    needs_graph = grad_mode and (y0.requires_grad or outputs.t_eval.requires_grad or t_start.requires_grad
                                 or t_end.requires_grad or bool(diff_params))
    prob.watch = grad_mode and not needs_graph
    # which time gradients the backward needs, known before the forward (a "graphs" forward tapes them)
    prob.need_grid = bool(t_start.requires_grad or t_end.requires_grad)
    prob.need_tout = bool(outputs.t_eval.requires_grad)

    if needs_graph and isinstance(prob.schedule, MemoryBudget):
        ts = t_start.detach().to(time_dtype)
        row = ts.numel() * (ts.element_size() + 1)  # one iteration's times and anchor flags
        resolve_budget(prob, y0, torch.stack([ts, ts + 1e-3 * (t_end.detach().to(time_dtype) - ts)]), None,
                       (outputs.t_eval.numel() * outputs.t_eval.element_size() + row, row))

    def run(replaying):
        return _batched_adaptive_once(prob, y0, t_start, t_end, outputs, controller, dt0, max_steps,
                                      needs_graph, replaying)

    with torch.set_grad_enabled(prob.watch):
        sol, keeper, grid, anchors, info = _with_replay(prob, run, needs_graph and prob.schedule.replays_steps(None))
    if not needs_graph:
        return sol, info
    grid_values = grid.stack()
    info["grid"] = grid_values
    if prob.n_steps == 0:  # every sample's span is empty: the solution is y0 itself
        return outputs.allocate(y0.to(policy.state_dtype), policy.output), info
    _check_storage(prob, keeper, grid_values)
    # Accepted step sizes are constants: each sample's times move with its start time, or with its
    # end time from the step clamped onto it (torchode's arithmetic).
    anchor = anchors.stack().to(time_dtype)
    grid = grid_values + (1 - anchor) * (t_start - t_start.detach()) + anchor * (t_end - t_end.detach())
    prob.precomputed = (sol, keeper)
    return _apply(prob, y0, grid, outputs.t_eval, diff_params), info


def _new_problem(f, y0, tableau, policy, params, outputs, scaler, method, param_hint, schedule, *, n_steps,
                 per_sample, perturb=False, callback_step=None, callback_step_adjoint=None, newton=None,
                 **rest) -> _Problem:
    """The record of one solve (and its statistics record, which the collectors see from now on)."""
    newton = newton_options(newton, owner="newton") if tableau.implicit else None
    prob = _Problem(
        f=f, tableau=tableau, policy=policy, params=params, outputs=outputs, perturb=perturb, scaler=scaler,
        callback_step=callback_step, callback_step_adjoint=callback_step_adjoint, device_type=y0.device.type,
        record=_new_record(method or f"rampde_{tableau.name}", policy.name), n_steps=n_steps,
        per_sample=per_sample, param_hint=param_hint, schedule=schedule, y_shape=tuple(y0.shape), **rest,
    )
    if newton is not None:
        if getattr(schedule, "stages", False):
            raise ValueError(
                f"checkpoint={schedule!r}: stage-by-stage VJPs (stages=True) are for explicit methods; "
                f"{prob.record.method!r} is implicit (its Newton iterations are not stages with fixed inputs). "
                f"Use the same schedule without stages=True, or an explicit method (e.g. 'rampde_rk4')")
    prob.stepper = make_stepper(prob, newton)
    return prob


def _schedule(checkpoint, *, adaptive: bool):
    """The checkpoint schedule of a solve (validated before anything runs)."""
    schedule = checkpoint_schedule(checkpoint)
    if adaptive and not schedule.adaptive_ok:
        raise ValueError(
            f"checkpoint={checkpoint!r} is not available with adaptive steps yet (their graphs would have to be "
            "kept for every trial step); use checkpoint='steps', an integer (binomial) or SegmentsSchedule(k), "
            "or a fixed grid for 'graphs'"
        )
    return schedule


def _attach(prob: _Problem, params, buffers, hint: str, device: torch.device) -> tuple:
    """The differentiated parameters, the hidden-tensor check and the replay record of a solve."""
    diff_params = tuple(p for p in params if p.requires_grad)
    prob.params = diff_params
    prob.check = GraphCheck(diff_params, hint)
    if buffers is None:
        buffers = tuple(prob.f.buffers()) if isinstance(prob.f, torch.nn.Module) else ()
    prob.replay = StepReplay(tuple(buffers), device)
    return diff_params


def _run(prob: _Problem, y0, grid, t_out, params, buffers):
    """Forward with the adjoint Function when a gradient can be asked for, plain forward otherwise."""
    diff_params = _attach(prob, params, buffers, prob.param_hint, y0.device)
    needs_graph = torch.is_grad_enabled() and (
        y0.requires_grad or grid.requires_grad or t_out.requires_grad or bool(diff_params)
    )
    if not needs_graph:
        # In grad mode every step's result is checked instead: a field over a tensor that requires
        # grad (a closure) would otherwise be differentiated by plain autograd without a word.
        sol, _ = _forward(prob, y0, grid, t_out, keep=False)
        return sol
    prob.need_grid, prob.need_tout = bool(grid.requires_grad), bool(t_out.requires_grad)
    return _apply(prob, y0, grid, t_out, diff_params)


def _common_checks(y0, params, policy):
    if not isinstance(y0, torch.Tensor) or not torch.is_floating_point(y0):
        raise TypeError(f"y0 must be a floating-point tensor, got {getattr(y0, 'dtype', type(y0).__name__)}")
    params = tuple(params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__}")
    policy.check_device(y0.device.type)
    # A dual tensor (forward-mode AD) would lose its tangent in the engine's detached forward.
    if any(torch.autograd.forward_ad.unpack_dual(x).tangent is not None for x in (y0, *params)):
        raise RuntimeError(_HIGHER_ORDER.format(what="forward-mode differentiation (torch.autograd.forward_ad, jvp)"))
    if policy.compute_dtype is not None:
        # Autocast lowers float32 operands only: with a float64 model the state (float32 here) and
        # the weights would meet in one matmul with different dtypes.
        wide = sorted({str(p.dtype).replace("torch.", "") for p in params
                       if p.is_floating_point() and p.dtype.itemsize > torch.finfo(policy.state_dtype).bits // 8})
        if wide:
            raise ValueError(
                f"precision policy {policy.name!r} runs the state in {str(policy.state_dtype).replace('torch.', '')} "
                f"with {str(policy.compute_dtype).replace('torch.', '')} velocities, but the vector field's parameters "
                f"are {', '.join(wide)}. Convert the model to float32 (model.float()) to use {policy.name!r}, or choose "
                "precision='fp64' to keep the float64 model."
            )
    return params
