"""``RampdeAdjoint``: torchode's ``AutoDiffAdjoint`` interface on the rampde engine.

torchode semantics kept: batch-first ``(batch, features)`` states; per-sample ``t_start``, ``t_end``,
``t_eval`` and ``dt0`` (samples may differ in span, number of steps and direction); ``f`` receives
``t`` of shape ``(batch,)`` in the problem's time dtype; outputs use the step method's own dense
output; ``Solution(ts, ys, stats, status)``.  The time grid is built with torchode's own arithmetic
(``t <- t + dt`` with the last step clamped to ``t_end``), so fixed-step solutions agree with
``AutoDiffAdjoint`` to rounding.
"""

from __future__ import annotations

import dataclasses

import functools
from typing import Callable

import torch
from torchode import status_codes
from torchode.interpolation import ThirdOrderPolynomialInterpolation
from torchode.problems import InitialValueProblem
from torchode.single_step_methods import Euler
from torchode.single_step_methods.base import StepResult
from torchode.single_step_methods.euler import LinearInterpolationData
from torchode.single_step_methods.runge_kutta import ERKInterpolationData, ExplicitRungeKutta
from torchode.solution import Solution
from torchode.step_size_controllers import FixedStepController
from torchode.terms import ODETerm

from rampde_plugins import (
    BUILTIN_TABLEAUS,
    BatchedOutputs,
    BatchedStepController,
    ButcherTableau,
    StageInterpolation,
    OptionSyntax,
    check_tolerance,
    configure,
    get_registry,
    solve_batched,
    solve_batched_adaptive,
)

PARAM_HINT = "pass them explicitly: RampdeAdjoint(step_method, controller, params=(A, b))"
_EULER = next(t for t in BUILTIN_TABLEAUS if t.name == "euler")


class RampdeStepMethod(torch.nn.Module):
    """The step method torchode's ``solve_ivp(method="rampde_<name>")`` constructs.

    It only names a registered tableau; the solving is done by :class:`RampdeAdjoint`, to which the
    adapter routes every solve whose step method is one of these.
    """

    def __init__(self, tableau_name: str, term: ODETerm | None = None):
        super().__init__()
        self.tableau_name = tableau_name
        self.term = term

    @property
    def tableau(self) -> ButcherTableau:
        return get_registry().tableau(self.tableau_name)

    def convergence_order(self) -> int:
        return self.tableau.order

    def __repr__(self):
        return f"RampdeStepMethod('rampde_{self.tableau_name}')"


@functools.lru_cache(maxsize=None)
def _tableau_of_class(cls, order: int) -> ButcherTableau:
    t = cls.TABLEAU if hasattr(cls, "TABLEAU") else None
    if t is None:
        raise TypeError(f"{cls.__name__} has no TABLEAU")
    s = t.c.shape[0]
    return ButcherTableau(
        f"torchode_{cls.__name__.lower()}",
        c=t.c.tolist(),
        a=[t.a[i, :i].tolist() for i in range(s)],
        b=t.b.tolist(),
        order=order,
        b_err=t.b_err.tolist(),
        description=f"torchode's {cls.__name__}",
    )


def tableau_of(step_method) -> ButcherTableau:
    """The Butcher tableau of a torchode step method (Euler, Heun, Dopri5, Tsit5, any ERK) or of ours."""
    if isinstance(step_method, RampdeStepMethod):
        return step_method.tableau
    if isinstance(step_method, Euler):
        return _EULER
    if isinstance(step_method, ExplicitRungeKutta):
        t = step_method.tableau
        s = t.c.shape[0]
        if type(step_method).__dict__.get("TABLEAU") is t or getattr(type(step_method), "TABLEAU", None) is t:
            return _tableau_of_class(type(step_method), int(step_method.convergence_order()))
        return ButcherTableau(
            f"torchode_{type(step_method).__name__.lower()}",
            c=t.c.tolist(), a=[t.a[i, :i].tolist() for i in range(s)], b=t.b.tolist(),
            order=int(step_method.convergence_order()), b_err=t.b_err.tolist(),
        )
    raise TypeError(
        f"RampdeAdjoint cannot run step method {type(step_method).__name__}: supported are torchode's "
        "Euler and explicit Runge-Kutta methods (Heun, Dopri5, Tsit5, any ExplicitRungeKutta) and "
        "the registered 'rampde_<name>' methods"
    )


def _host_method_for(step_method):
    """The torchode method object whose dense output the outputs use (None: cubic Hermite)."""
    if isinstance(step_method, RampdeStepMethod):
        from ._adapter import HOST_METHODS  # tableaus that torchode itself defines

        cls = HOST_METHODS.get(step_method.tableau_name)
        return None if cls is None else cls(None)
    return step_method


def make_interpolant(step_method, problem):
    """``callable(StepData) -> interpolation`` following the host method's dense output."""
    host = _host_method_for(step_method)
    if isinstance(host, Euler):
        return lambda sd: host.build_interpolation(LinearInterpolationData(sd.t0, sd.h, sd.y0, sd.y1))
    if isinstance(host, ExplicitRungeKutta):
        tab = None

        def interp(sd):
            nonlocal tab
            if tab is None:
                tab = host.tableau.to(device=sd.y0.device, time_dtype=sd.t0.dtype, data_dtype=sd.y0.dtype)
            return host.build_interpolation(ERKInterpolationData(tab, sd.t0, sd.h, sd.y0, sd.y1, torch.stack(sd.ks)))

        return interp
    tableau = tableau_of(step_method)
    if tableau.implicit:  # through the stage states: a stiff component's slope amplifies its error
        return StageInterpolation(tableau)
    # A registered tableau torchode has no method for: cubic Hermite with the true end slope
    # f(t1, y1) (one evaluation per step that holds outputs), in torchode's own polynomial form.
    return lambda sd: ThirdOrderPolynomialInterpolation.from_k(sd.t0, sd.h, sd.y0, sd.y1,
                                                               torch.stack([sd.f_start(), sd.f_end()]))


def fixed_step_grid(t_start, t_end, dt0, max_steps):
    """torchode's fixed-step time sequence, per sample, and where each sample stopped.

    Mirrors ``AutoDiffAdjoint.solve`` with ``FixedStepController``: ``t <- t + dt`` while running, with
    ``dt`` clamped to the remaining span (so the last step lands on ``t_end``), finished samples
    taking zero-length steps.  Returns ``(grid (N+1, B), anchored_at_end (N+1, B), n_steps (B,),
    reached_max (bool))``; ``anchored_at_end`` marks points produced by a step clamped to ``t_end``
    (their derivative with respect to the times is that of ``t_end``, the others that of ``t_start``).
    """
    with torch.no_grad():
        direction = torch.where(t_end > t_start, 1, -1).to(t_start.dtype)
        t_min, t_max = torch.minimum(t_start, t_end), torch.maximum(t_start, t_end)
        minus_t_end_normalized = -direction * t_end
        t = t_start.clone()
        dt = torch.clamp(dt0, t_min - t, t_max - t)
        anchored = dt != dt0
        rows, anchors = [t], [torch.zeros_like(t, dtype=torch.bool)]
        running = torch.addcmul(minus_t_end_normalized, direction, t) < 0.0
        n_steps = torch.zeros_like(t, dtype=torch.long)
        reached_max = False
        while bool(running.any()):
            if max_steps is not None and int(n_steps.max()) >= max_steps:
                reached_max = True
                break
            n_steps += running
            t = torch.where(running, t + dt, t)
            rows.append(t)
            anchors.append(anchors[-1] | (anchored & running))
            running = torch.addcmul(minus_t_end_normalized, direction, t) < 0.0
            dt = torch.where(running, dt0, dt)
            clamped = torch.clamp(dt, t_min - t, t_max - t)
            anchored = clamped != dt
            dt = clamped
        if len(rows) == 1:  # every span is empty: one zero-length step keeps the engine's shapes
            rows.append(t)
            anchors.append(anchors[0])
    return torch.stack(rows), torch.stack(anchors), n_steps, reached_max


class TorchodeController(BatchedStepController):
    """torchode's own adaptive controller (IntegralController, PIDController) deciding per sample.

    Its ``init`` (initial step selection), ``adapt_step_size`` (error ratio, acceptance, step-size
    update, status) and ``merge_states`` are called as they are, on the engine's state-dtype
    tensors -- fp32 or wider whatever the precision policy.
    """

    def __init__(self, controller, problem, order, args):
        self.controller, self.problem, self.order, self.args = controller, problem, order, args
        self.stats: dict = {}

    def start(self, f, t0, y0, dt0):
        term = ODETerm(f)
        problem = InitialValueProblem(y0, self.problem.t_start, self.problem.t_end, self.problem.t_eval)
        term.init(problem, self.stats)
        dt, self.state, f0 = self.controller.init(term, problem, self.order, dt0, stats=self.stats, args=None)
        return dt, None if f0 is None else f0.to(y0.dtype)

    def judge(self, t0, dt, y0, y1, err):
        accept, dt_next, self.next_state, status = self.controller.adapt_step_size(
            t0, dt, y0, StepResult(y1, err), self.state, self.stats
        )
        return accept, dt_next, status

    def merge(self, running):
        self.state = self.controller.merge_states(running, self.next_state, self.state)

    def rejecting_error(self, y0):
        # 1e4 of the controller's own error bound: an error ratio of 1e4 cuts the step by its factor_min
        # for methods up to order 8 (0.9 * 1e4^(-1/q) <= 0.2), and stays finite in fp32's norm (an inf
        # estimate would be torchode's INFINITE_NORM status, stopping the sample instead).
        atol = torch.as_tensor(getattr(self.controller, "atol", 1e-6), dtype=y0.dtype, device=y0.device)
        rtol = torch.as_tensor(getattr(self.controller, "rtol", 1e-3), dtype=y0.dtype, device=y0.device)
        return 1e4 * (atol + rtol * y0.abs())


class RampdeAdjoint(torch.nn.Module):
    """Use where torchode's ``AutoDiffAdjoint`` is used; runs the rampde engine.

    Args:
        step_method: a torchode step method (``Euler``, ``Heun``, ``Dopri5``, ``Tsit5``, any
            ``ExplicitRungeKutta``) -- its Butcher tableau is read and run on the engine -- or a
            ``rampde_<name>`` method from ``torchode.interface.METHODS``.
        step_size_controller: ``torchode.FixedStepController()`` (needs ``dt0``), or one of torchode's
            adaptive controllers (``IntegralController``, ``PIDController``), which then decide every
            step per sample exactly as in torchode, on fp32-or-wider error estimates.
        max_steps: stop after this many steps (status ``REACHED_MAX_STEPS`` for unfinished samples).
        precision: policy name or ``PrecisionPolicy`` (default: from ``torch.autocast``/``y0``'s dtype).
        params: tensors to differentiate (default: the term's parameters, i.e. those of ``f`` when it
            is an ``nn.Module``).  Tensors requiring grad that ``f`` uses otherwise raise an error.
        scaler: a persistent :class:`rampde_plugins.AdjointScaler` for the ``fp16`` policy.
        checkpoint: what the forward keeps for the backward: ``"steps"`` (default: one state per step,
            each step recomputed once), ``"graphs"`` (every step's graph, no recomputation; fixed
            steps), an integer ``c`` (binomial checkpointing with ``c`` stored states) or a
            ``rampde_plugins`` schedule object (``SegmentsSchedule(k)``, ...).
        memory_budget: bytes or a size such as ``"512MB"`` instead of ``checkpoint``: the first of
            ``"graphs"`` (fixed steps), ``"steps"``, binomial whose predicted peak fits is chosen per
            solve (``stats["rampde"]`` says which).
        linear_solver: implicit (DIRK) methods: ``"auto"`` (default), ``"dense"`` (per-sample LU of the
            Jacobian) or ``"krylov"`` (matrix-free GMRES).
        newton: implicit methods: a dict of :class:`rampde_plugins.NewtonOptions` fields (``rtol``,
            ``atol``, ``max_iter``, ...); default tolerances 1e-2 x the controller's ``rtol``/``atol``
            (1e-9/1e-11 with fixed steps).

    ``solve(problem, term=None, dt0=None, args=None)`` returns a torchode ``Solution``; its ``stats``
    has torchode's keys (``n_f_evals``, ``n_steps``, ``n_accepted``, ``n_initialized``) plus
    ``rampde`` (the solve's :class:`rampde_plugins.SolveStats`, filled in by the backward too).
    """

    def __init__(self, step_method, step_size_controller, *, max_steps=None, precision=None, params=None,
                 scaler=None, checkpoint=None, memory_budget=None, linear_solver=None, newton=None,
                 backprop_through_step_size_control=True):
        super().__init__()
        tableau = tableau_of(step_method)  # fail early on an unsupported method
        # The options every host shares, validated once by the core.  Newton to 1e-2 of the
        # controller's tolerances (1e-9 / 1e-11 with fixed steps: see NewtonOptions).
        self.config = configure(
            tableau, OptionSyntax("RampdeAdjoint"), precision=precision, checkpoint=checkpoint,
            memory_budget=memory_budget, newton=newton, linear_solver=linear_solver, scaler=scaler, params=params,
            rtol=getattr(step_size_controller, "rtol", None), atol=getattr(step_size_controller, "atol", None),
        )
        self.newton, self.checkpoint = self.config.newton, self.config.schedule
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r} must be a positive int or None")
        self.step_method = step_method
        self.step_size_controller = step_size_controller
        self.max_steps = max_steps
        self.params = self.config.params
        self.scaler = scaler
        self._output_steps = None  # the last adaptive solve's step at each output (QuadratureAdjoint reads it)

    @property
    def precision(self):
        """The precision policy (a name, a ``PrecisionPolicy``, or None: from autocast and ``y0``)."""
        return self.config.precision

    @precision.setter
    def precision(self, value) -> None:
        self.config = dataclasses.replace(self.config, precision=value)

    def solve(self, problem, term=None, dt0=None, args=None) -> Solution:
        method = self.step_method
        term = term if term is not None else getattr(method, "term", None)
        if term is None:
            raise ValueError("no ODE term: pass term= to solve() or construct the step method with one")
        controller = self.step_size_controller
        adaptive = not isinstance(controller, FixedStepController)
        if adaptive and not all(hasattr(controller, m) for m in ("init", "adapt_step_size", "merge_states")):
            raise TypeError(
                f"RampdeAdjoint: {type(controller).__name__} is not a torchode step-size controller "
                "(needs init, adapt_step_size and merge_states)"
            )
        y0, t_start, t_end = problem.y0, problem.t_start, problem.t_end
        if y0.ndim != 2:
            raise ValueError(f"y0 must be (batch, features) as in torchode, got shape {tuple(y0.shape)}; flatten it")
        time_dtype = t_start.dtype
        if time_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"time dtype {time_dtype}: use float32 or float64 (fp16 time cannot resolve small steps)")
        tableau = tableau_of(method)
        if adaptive and (tableau.b_err is None or not any(x != 0.0 for x in tableau.b_err)):
            # torchode's controllers read a method without an error estimate as "error ratio 1": every
            # step accepted, its size kept -- fixed steps of dt0, which is what runs here too.
            if dt0 is None:
                raise ValueError(
                    f"{method!r} has no error estimate, so {type(controller).__name__} keeps the initial step "
                    "size throughout (torchode's rule): pass dt0=h for fixed steps of h, or use an embedded "
                    "method (Dopri5, Tsit5, Heun) to adapt the steps"
                )
            adaptive = False
        batch = y0.shape[0]
        for name, tt in (("t_start", t_start), ("t_end", t_end)):
            if not bool(torch.isfinite(tt).all()):
                b = int(torch.nonzero(~torch.isfinite(tt))[0])
                raise ValueError(f"{name}[{b}]={tt[b].item()!r}: start and end times must be finite")
        if dt0 is not None:
            dt0 = torch.as_tensor(dt0, dtype=time_dtype, device=y0.device)
            if dt0.ndim > 1 or (dt0.ndim == 1 and dt0.shape[0] != batch):
                raise ValueError(f"dt0 must be a number or a (batch,) = ({batch},) tensor, got shape {tuple(dt0.shape)}")
            dt0 = dt0.expand(batch)
            direction = torch.where(t_end > t_start, 1, -1).to(time_dtype)
            # A sample with an empty span (t_start == t_end) takes no step: its dt0 is not used.
            bad = ~((dt0 * direction > 0) & torch.isfinite(dt0)) & (t_end != t_start)
            if bool(bad.any()):
                b = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"dt0 must be finite, non-zero and point from t_start to t_end; sample {b} has dt0={dt0[b].item()!r} "
                    f"for t_start={t_start[b].item()!r}, t_end={t_end[b].item()!r}"
                )
        elif not adaptive:
            raise ValueError(
                f"fixed-step solving with {method!r} needs dt0 (torchode would pick a ~1e-9 step for a "
                "method without error estimate): pass dt0=h, a number or a (batch,) tensor"
            )
        t_eval = self._check_t_eval(problem)
        policy = self.config.policy(y0)
        if batch == 0:  # torchode answers an empty batch with an empty solution
            ys = y0.to(policy.output)[:, None].expand(0, t_eval.shape[1], *y0.shape[1:])
            empty = torch.zeros(0, dtype=torch.long, device=y0.device)
            stats = {"n_f_evals": empty, "n_steps": empty, "n_accepted": empty, "n_initialized": empty, "rampde": None}
            return Solution(ts=t_eval, ys=ys, stats=stats, status=empty)
        f = term_field(term, args, problem)
        common = dict(newton=self.newton,
            tableau=tableau, policy=policy, params=solve_params(self.params, term, args),
            buffers=tuple(term.buffers()), scaler=self.scaler, param_hint=PARAM_HINT, checkpoint=self.checkpoint,
            method=f"rampde_{tableau.name}" if isinstance(method, RampdeStepMethod) else tableau.name,
        )
        outputs = BatchedOutputs(t_eval, make_interpolant(method, problem))
        from rampde_plugins import collect_stats

        with collect_stats() as collected:
            if adaptive:
                rtol = getattr(controller, "rtol", None)
                if rtol is not None:
                    check_tolerance(policy, rtol, f"RampdeAdjoint({type(controller).__name__})")
                ys, info = solve_batched_adaptive(
                    f, y0, t_start, t_end, outputs, controller=TorchodeController(controller, problem,
                                                                                 int(method.convergence_order()), args),
                    dt0=dt0, max_steps=self.max_steps, **common,
                )
                n_steps, n_accepted, status = info["n_steps"], info["n_accepted"], info["status"]
                # (batch, n_eval): the step that reached each output -- QuadratureAdjoint's backward starts there
                self._output_steps = info["output_steps"]
            else:
                grid_values, anchored, n_steps, reached_max = fixed_step_grid(t_start, t_end, dt0, self.max_steps)
                # Exact values with torchode's arithmetic; derivatives: d grid / d t_start = 1 before the
                # clamped last step, d grid / d t_end = 1 from it on (the step size dt0 is a constant).
                anchored = anchored.to(time_dtype)
                grid = grid_values + (1 - anchored) * (t_start - t_start.detach()) + anchored * (t_end - t_end.detach())
                ys = solve_batched(f, y0, grid, outputs, **common)
                n_steps, n_accepted = n_steps.to(y0.device), n_steps.to(y0.device)
                status = torch.full((batch,), status_codes.SUCCESS, dtype=torch.long, device=y0.device)
                if reached_max:
                    status = torch.where(n_steps >= self.max_steps, status_codes.REACHED_MAX_STEPS, status)
        record = collected.last
        initialized = ~torch.isnan(ys.detach().reshape(batch, ys.shape[1], -1)).any(dim=2)
        stats = {
            "n_f_evals": torch.full((batch,), record.forward_nfe, dtype=torch.long),
            "n_steps": n_steps,
            "n_accepted": n_accepted,
            "n_initialized": initialized.long().cumprod(dim=1).sum(dim=1),
            "rampde": record,
        }
        return Solution(ts=t_eval, ys=ys, stats=stats, status=status)

    def _check_t_eval(self, problem):
        t_start, t_end, t_eval = problem.t_start, problem.t_end, problem.t_eval
        if t_eval is None:
            return t_end[:, None]
        if t_eval.ndim != 2 or t_eval.shape[0] != t_start.shape[0]:
            raise ValueError(f"t_eval must be (batch, n_eval) = ({t_start.shape[0]}, n) as in torchode, got shape "
                             f"{tuple(t_eval.shape)}; solve_ivp expands a 1-D t_eval for you")
        if not bool(torch.isfinite(t_eval).all()):
            b, j = (int(x) for x in torch.nonzero(~torch.isfinite(t_eval))[0])
            raise ValueError(f"t_eval[{b}, {j}]={t_eval[b, j].item()!r}: output times must be finite")
        lo = torch.minimum(t_start, t_end)[:, None]
        hi = torch.maximum(t_start, t_end)[:, None]
        outside = (t_eval < lo) | (t_eval > hi)
        if bool(outside.any()):
            b, j = (int(x) for x in torch.nonzero(outside)[0])
            raise ValueError(
                f"t_eval[{b}, {j}]={t_eval[b, j].item()!r} lies outside sample {b}'s span "
                f"[{t_start[b].item()!r}, {t_end[b].item()!r}]"
            )
        return t_eval

    def __repr__(self):
        return (f"RampdeAdjoint(step_method={self.step_method}, step_size_controller={self.step_size_controller}, "
                f"max_steps={self.max_steps}, precision={self.precision!r}, checkpoint={self.checkpoint!r})")


def tensors_in_args(args) -> list:
    """The tensors that need grad in torchode's ``args`` (inside tuples, lists and dict values).

    torchode hands ``args`` to the field at every evaluation, and its ``AutoDiffAdjoint``
    differentiates them like any input, so the discrete adjoint takes them as parameters.  A tensor
    kept elsewhere (an attribute of a custom object) is not found here; the hidden-tensor check
    then names it and asks for ``params=``."""
    found, stack = [], [args]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.requires_grad and all(x is not y for y in found):
                found.append(x)
        elif isinstance(x, (tuple, list)):
            stack.extend(reversed(x))
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
    return found


def solve_params(given, term, args) -> tuple:
    """What a solve differentiates: ``params`` if given, else the term's parameters; and, when the
    term takes ``args``, the tensors in them that need grad."""
    params = list(given if given is not None else term.parameters())
    if term.with_args:
        params += [a for a in tensors_in_args(args) if all(a is not p for p in params)]
    return tuple(params)


def _with_args(f, args, t, y):
    return f(t, y, args)


def term_field(term, args, problem) -> Callable:
    """The field ``f(t, y)`` the engine evaluates for torchode's ``term``.

    torchode's own solvers evaluate ``term.vf(t, y, stats, args)``, so a term class that overrides
    ``vf`` (an ``ODETerm`` subclass that rescales, counts or reads ``args`` there) is called through it,
    with a ``stats`` dict of its own (``term.init(problem, stats)`` fills in what torchode's ``vf``
    counts).  ``ODETerm``'s own ``vf`` only counts evaluations and calls ``term.f`` -- with ``args`` when
    ``with_args`` -- which the engine then calls directly (its statistics count the evaluations)."""
    vf = getattr(type(term), "vf", None)
    if vf is ODETerm.vf or not callable(vf):
        return term.f if not term.with_args else functools.partial(_with_args, term.f, args)
    stats: dict = {}
    init = getattr(term, "init", None)
    if callable(init):
        init(problem, stats)
    return functools.partial(_vf, term.vf, stats, args)


def _vf(vf, stats, args, t, y):
    return vf(t, y, stats, args)  # torchode's convention (0.2.0 to 1.0.x)
