"""``QuadratureAdjoint``: the Gauss--Legendre quadrature adjoint with torchode's interface.

Use it where torchode's ``BacksolveAdjoint`` is used (``QuadratureAdjoint(term, step_method,
controller).solve(problem, dt0=...)``), or say ``solve_ivp(..., method="rampde_<name>",
adjoint="quadrature")``.  It is the memory-light alternative to :class:`RampdeAdjoint`'s exact discrete
adjoint: the forward keeps only the outputs; the backward solves ``[x, a]`` back through every output
interval with the rampde engine under torchode's own controller (per sample, as torchode does) and sums
``a^T df/dtheta`` over Gauss--Legendre nodes read off the method's dense output -- the gradient of the
continuous ODE to the backward solve's tolerance, not the exact gradient of the steps that ran.

Per-sample spans: each sample's intervals get their own nodes (one count for the batch, scaled to
each sample's interval), its backward runs from its own ``t_eval[:, i]`` to ``t_eval[:, i - 1]`` and
finally back to its ``t_start``.  Time gradients (``t_start``, ``t_eval``; ``t_end`` when ``t_eval``
is None) are those of the continuous problem.
"""

from __future__ import annotations

import torch
from torchode.problems import InitialValueProblem
from torchode.solution import Solution
from torchode.step_size_controllers import FixedStepController
from torchode.terms import ODETerm

from rampde_plugins import (
    AdjointScaler,
    PrecisionPolicy,
    QuadratureProblem,
    quadrature_options,
    resolve_policy,
    solve_quadrature,
)

from ._adjoint import RampdeAdjoint, solve_params, tableau_of, term_field

PARAM_HINT = "pass them explicitly: QuadratureAdjoint(term, step_method, controller, params=(A, b))"

_AUTOGRAD = "torchode's AutoDiffAdjoint with torchode's own step method (e.g. Dopri5 or Tsit5)"


class QuadratureAdjoint(torch.nn.Module):
    """torchode's ``BacksolveAdjoint`` interface with rampde's Gauss--Legendre quadrature adjoint.

    Args:
        term: the ``ODETerm`` (or None: then ``solve(..., term=...)`` must give it).
        step_method, step_size_controller: as for :class:`RampdeAdjoint` (torchode's Euler/ERK methods
            or ``rampde_<name>`` methods; ``FixedStepController`` with ``dt0``, or an adaptive
            controller deciding per sample).
        backward_controller: the controller of the backward solves of ``[x, a]`` (default: the
            forward's; e.g. a tighter ``IntegralController``).  With fixed steps the backward takes
            steps of ``backward_dt0`` (``solve``'s argument; default ``-dt0``, torchode's convention).
        quadrature_nodes, gtol, min_nodes, max_nodes: the node rule (see
            ``rampde_plugins.QUADRATURE_OPTIONS``): a fixed count per output interval, or ``"auto"``.
        node_batch: nodes per vectorised (``torch.func.vmap``) VJP, or ``"auto"``; 1 = one call per node.
        max_steps, precision, scaler, linear_solver, newton: as for :class:`RampdeAdjoint`; the
            policy is resolved once at ``solve`` and kept for the backward.
        params: tensors to differentiate (default: the term's parameters).  Tensors requiring grad that
            the field uses otherwise raise an error at the first quadrature node.

    The field must be the same function at every evaluation: one that draws random numbers or writes
    buffers (dropout, BatchNorm in training mode) is refused -- use :class:`RampdeAdjoint`.
    ``solve`` returns a torchode ``Solution`` whose ``stats["rampde"]`` is the solve's
    :class:`rampde_plugins.SolveStats` (``adjoint == "quadrature"``, ``quadrature_nodes``,
    ``backward_nfe``, ``backward_steps`` filled in by the backward).
    """

    def __init__(self, term, step_method, step_size_controller, *, backward_controller=None, max_steps=None,
                 precision=None, params=None, scaler=None, quadrature_nodes="auto", gtol=0.25, min_nodes=8,
                 max_nodes=512, node_batch="auto", linear_solver=None, newton=None):
        super().__init__()
        if term is not None and not isinstance(term, ODETerm):
            raise TypeError(f"QuadratureAdjoint(term=...) must be a torchode ODETerm or None, got {type(term).__name__}")
        tableau_of(step_method)  # an unsupported method fails here
        self.options = quadrature_options(
            {"quadrature_nodes": quadrature_nodes, "gtol": gtol, "min_nodes": min_nodes, "max_nodes": max_nodes,
             "node_batch": node_batch},
            owner="QuadratureAdjoint",
        )
        back = step_size_controller if backward_controller is None else backward_controller
        self.backward_controller_given = backward_controller is not None
        if isinstance(back, FixedStepController) != isinstance(step_size_controller, FixedStepController):
            raise ValueError(
                f"QuadratureAdjoint(backward_controller={type(back).__name__}): the backward controller must be "
                f"fixed-step when the forward's is and adaptive when it is ({type(step_size_controller).__name__})"
            )
        kw = dict(max_steps=max_steps, linear_solver=linear_solver, newton=newton)
        # Validated now (RampdeAdjoint checks method, controller, options); the policy is set per solve.
        self.forward_adjoint = RampdeAdjoint(step_method, step_size_controller, **kw)
        self.backward_adjoint = RampdeAdjoint(step_method, back, **kw)
        if scaler is not None and not isinstance(scaler, AdjointScaler):
            raise TypeError(f"scaler must be a rampde_plugins.AdjointScaler, got {type(scaler).__name__}")
        self.term = term
        self.step_method = step_method
        self.step_size_controller = step_size_controller
        self.precision = precision
        self.params = None if params is None else tuple(params)
        self.scaler = scaler

    def solve(self, problem, term=None, dt0=None, args=None, backward_dt0=None) -> Solution:
        term = term if term is not None else self.term
        if term is None:
            raise ValueError("no ODE term: pass it to QuadratureAdjoint(term, ...) or to solve(..., term=...)")
        y0, t_start, t_end = problem.y0, problem.t_start, problem.t_end
        if not isinstance(y0, torch.Tensor) or y0.ndim != 2:
            raise ValueError(f"y0 must be (batch, features) as in torchode, got shape {tuple(getattr(y0, 'shape', ()))}")
        policy = self.precision if isinstance(self.precision, PrecisionPolicy) else resolve_policy(
            self.precision, device_type=y0.device.type, state_dtype=y0.dtype)
        # Pinned for the backward: the autocast context that chose the policy is gone by then.
        fwd, back = self.forward_adjoint, self.backward_adjoint
        fwd.precision = back.precision = policy
        t_eval = fwd._check_t_eval(problem)
        time_dtype = t_start.dtype
        if backward_dt0 is None and dt0 is not None:
            backward_dt0 = -torch.as_tensor(dt0, dtype=time_dtype, device=y0.device)
        f = term_field(term, args, problem)
        params = solve_params(self.params, term, args)
        held = {}

        # An adaptive backward under the forward's controller starts each interval with the step the
        # forward accepted across that output (per sample), not torchode's initial-step heuristic --
        # as the torchdiffeq host does (see its adapter: two evaluations saved and a step size that
        # needs no growing); a sample without one (an empty interval) keeps the heuristic for all.
        seed = backward_dt0 is None and not self.backward_controller_given and \
            not isinstance(self.step_size_controller, FixedStepController)

        def forward(y0_):
            fwd._output_steps = None
            sol = fwd.solve(InitialValueProblem(y0_, t_start.detach(), t_end.detach(), t_eval.detach()),
                            term=term, dt0=dt0, args=args)
            held["solution"], held["steps"] = sol, fwd._output_steps
            return torch.cat([y0_.to(sol.ys.dtype)[None], sol.ys.transpose(0, 1)])

        def backsolve(field, z0, times):
            te = times.transpose(0, 1).contiguous()  # (batch, len(times)), each row monotone
            start = backward_dt0
            steps = held.get("steps") if seed else None
            if steps is not None:
                # te[:, 0] is the output t_eval[:, j] this interval's backward starts from
                col = (t_eval.detach() == te[:, :1]).all(dim=0).nonzero().flatten()
                if len(col):
                    size = steps[:, int(col[-1])]
                    span = te[:, -1] - te[:, 0]
                    if bool((torch.isfinite(size) & (size > 0)).all()) and bool((span != 0).all()):
                        start = torch.sign(span) * size.to(span.dtype)
            sol = back.solve(InitialValueProblem(z0, te[:, 0], te[:, -1], te), term=ODETerm(field), dt0=start)
            return sol.ys.transpose(0, 1)

        qp = QuadratureProblem(
            f=lambda t, y: f(t.to(time_dtype), y), policy=policy, forward=forward, backsolve=backsolve,
            options=self.options, params=params, buffers=tuple(term.buffers()), hint=PARAM_HINT,
            scaler=self.scaler, stack_dim=None, batched_time=True, method=repr(fwd.step_method),
            implicit=tableau_of(fwd.step_method).implicit,
        )
        times = torch.cat([t_start[None], t_eval.transpose(0, 1)])  # (1 + n_eval, batch), time-major
        out = solve_quadrature(qp, y0, times, owner="QuadratureAdjoint (solve_ivp(..., adjoint='quadrature'))",
                               instead="RampdeAdjoint (solve_ivp's default adjoint for rampde methods)",
                               autograd=_AUTOGRAD)
        sol = held["solution"]
        stats = dict(sol.stats)
        stats["rampde"] = qp.record
        return Solution(ts=t_eval, ys=out[1:].transpose(0, 1), stats=stats, status=sol.status)

    def __repr__(self):
        return (f"QuadratureAdjoint(step_method={self.step_method}, step_size_controller={self.step_size_controller}, "
                f"options={self.options}, precision={self.precision!r})")
