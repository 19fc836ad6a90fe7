"""The mixed-precision bounds of the linear problem, across hosts, methods and checkpoint schedules.

Problem: ``y' = y A`` (10-dim, stable, rotating; ``tests/helpers.linear_problem``), loss ``|y(1)|^2``,
gradients with respect to ``A`` and ``y0``.

References, none of them rampde:
* fixed steps: the discrete solution in closed form.  Every 4-stage, 4th-order Runge--Kutta method
  maps ``y_n`` to ``y_n R(hA)`` on a linear autonomous problem, ``R(Z) = I + Z + Z^2/2 + Z^3/6 +
  Z^4/24``, so ``y_N = y0 R(hA)^N``: a matrix power, differentiated by plain autograd in float64;
* adaptive steps (dopri5, rtol = atol = 1e-4): the float64 solve at the same tolerances.

Tolerances: autocast rounds ``A`` and every stage input to the compute dtype, so a low-precision
solve is that of a problem perturbed by about one unit roundoff ``u`` per evaluation (fp16 4.9e-4,
bf16 3.9e-3), and no solver does better than ``~u * T * |A| ~ u`` here.  The bounds, 1e-3 (fp16) and
5e-3 (bf16), are about ``2u`` and ``1.3u``.  What fails without fp32 accumulation is the sum over
4096 steps (torchdiffeq under autocast reaches O(1) errors on ``dL/dA``, see test_mixed_precision).
Every schedule must meet the same bounds: they differ in what is kept, not in the arithmetic --
``"graphs"`` included, whose explicit steps share one weight cast per step (a cache cleared at each step's
start and end): a step's stage gradients meet in the compute dtype, the sum over steps stays in fp32.
"""

import importlib
import math

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import SegmentsSchedule, collect_stats, solve_grid
from rampde_torchode import RampdeAdjoint

from .helpers import linear_problem, rel

interface = importlib.import_module("torchode.interface")

N_STEPS, T_END = 4096, 1.0
BOUNDS = {"fp16": 1e-3, "bf16": 5e-3}
SQRT_N = math.ceil(math.sqrt(N_STEPS))
FIXED_SCHEDULES = ["steps", "graphs", SQRT_N, SegmentsSchedule(8)]
ADAPTIVE_SCHEDULES = ["steps", "graphs", SQRT_N, SegmentsSchedule(8)]


def _ids(s):
    return s if isinstance(s, str) else (f"c={s}" if isinstance(s, int) else repr(s))


@pytest.fixture(scope="module")
def closed_form():
    a64, y064 = linear_problem()
    a, y0 = a64.clone().requires_grad_(), y064.clone().requires_grad_()
    z = (T_END / N_STEPS) * a
    eye = torch.eye(z.shape[0], dtype=torch.float64)
    r = eye + z + z @ z / 2 + z @ z @ z / 6 + z @ z @ z @ z / 24
    y = y0 @ torch.linalg.matrix_power(r, N_STEPS)
    ga, gy = torch.autograd.grad((y**2).sum(), [a, y0])
    # the closed form is the discrete problem the hosts solve: torchdiffeq's own rk4 in fp64 agrees
    a2, y2 = a64.clone().requires_grad_(), y064.clone().requires_grad_()
    y_host = odeint(lambda t, y: y @ a2, y2, torch.tensor([0.0, T_END], dtype=torch.float64), method="rk4",
                    options={"step_size": T_END / N_STEPS})[-1]
    ga_host, gy_host = torch.autograd.grad((y_host**2).sum(), [a2, y2])
    assert rel(ga, ga_host) < 1e-10 and rel(gy, gy_host) < 1e-10
    return ga, gy


def _fixed(host, policy, schedule):
    a64, y064 = linear_problem()
    a, y0 = a64.float().requires_grad_(), y064.float().requires_grad_()
    with collect_stats() as stats:
        if host == "core":
            reg = rampde_plugins.get_registry()
            grid = torch.linspace(0.0, T_END, N_STEPS + 1, dtype=torch.float64)
            y = solve_grid(lambda t, y: y @ a, y0, grid, grid[[0, -1]], tableau=reg.tableau("rk4"),
                           policy=reg.policy(policy), params=(a,), checkpoint=schedule)[-1]
        elif host == "torchdiffeq":
            y = odeint(lambda t, y: y @ a, y0, torch.tensor([0.0, T_END]), method="rampde_rk4",
                       options={"step_size": T_END / N_STEPS, "precision": policy, "adjoint_params": (a,),
                                "checkpoint": schedule})[-1]
        else:
            t_eval = torch.tensor([0.0, T_END], dtype=torch.float64).expand(y0.shape[0], 2)
            problem = to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1])
            solver = RampdeAdjoint(interface.METHODS["rampde_rk4"](term=None), to.FixedStepController(),
                                   precision=policy, params=(a,), checkpoint=schedule)
            y = solver.solve(problem, term=to.ODETerm(lambda t, y: y @ a),
                             dt0=torch.full((y0.shape[0],), T_END / N_STEPS, dtype=torch.float64)).ys[:, -1]
    ga, gy = torch.autograd.grad((y.double() ** 2).sum(), [a, y0])
    return ga, gy, stats.last


@pytest.mark.parametrize("schedule", FIXED_SCHEDULES, ids=_ids)
@pytest.mark.parametrize("host", ["core", "torchdiffeq", "torchode"])
@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_rk4_4096_steps_within_bounds(policy, host, schedule, closed_form):
    ga, gy, rec = _fixed(host, policy, schedule)
    assert rec.policy == policy and rec.n_steps == N_STEPS and rec.backward_done
    assert ga.dtype == torch.float32  # the user's parameter dtype, never the compute dtype
    name = getattr(schedule, "name", "binomial" if isinstance(schedule, int) else schedule)
    assert rec.schedule == name
    assert rel(ga, closed_form[0]) <= BOUNDS[policy] and rel(gy, closed_form[1]) <= BOUNDS[policy]


def _adaptive(host, dtype, policy, schedule):
    a64, y064 = linear_problem()
    a, y0 = a64.to(dtype).requires_grad_(), y064.to(dtype).requires_grad_()
    tol = 1e-4
    with collect_stats() as stats:
        if host == "torchdiffeq":
            y = odeint(lambda t, y: y @ a, y0, torch.tensor([0.0, T_END], dtype=torch.float64), method="rampde_dopri5",
                       rtol=tol, atol=tol, options={"precision": policy, "adjoint_params": (a,), "checkpoint": schedule})[-1]
        else:
            t_eval = torch.tensor([0.0, T_END], dtype=torch.float64).expand(y0.shape[0], 2)
            solver = RampdeAdjoint(interface.METHODS["rampde_dopri5"](term=None),
                                   to.IntegralController(atol=tol, rtol=tol), precision=policy, params=(a,),
                                   checkpoint=schedule)
            y = solver.solve(to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1]),
                             term=to.ODETerm(lambda t, y: y @ a)).ys[:, -1]
    return torch.autograd.grad((y.double() ** 2).sum(), [a, y0]), stats.last


@pytest.mark.parametrize("schedule", ADAPTIVE_SCHEDULES, ids=_ids)
@pytest.mark.parametrize("host", ["torchdiffeq", "torchode"])
@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_dopri5_within_bounds(policy, host, schedule):
    (ref_a, ref_y), _ = _adaptive(host, torch.float64, "fp64", "steps")
    (ga, gy), rec = _adaptive(host, torch.float32, policy, schedule)
    assert rec.policy == policy and rec.backward_done
    assert rel(ga, ref_a) <= BOUNDS[policy] and rel(gy, ref_y) <= BOUNDS[policy]


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", FIXED_SCHEDULES, ids=_ids)
@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_rk4_4096_steps_within_bounds_on_cuda(policy, schedule, closed_form):
    """The same bounds on a CUDA device (tensor-core fp16/bf16 matmuls; the same reasoning)."""
    a64, y064 = linear_problem()
    dev = torch.device("cuda")
    a, y0 = a64.to(dev, torch.float32).requires_grad_(), y064.to(dev, torch.float32).requires_grad_()
    y = odeint(lambda t, y: y @ a, y0, torch.tensor([0.0, T_END], device=dev), method="rampde_rk4",
               options={"step_size": T_END / N_STEPS, "precision": policy, "adjoint_params": (a,),
                        "checkpoint": schedule})[-1]
    ga, gy = torch.autograd.grad((y.double() ** 2).sum(), [a, y0])
    assert ga.device.type == "cuda"
    assert rel(ga.cpu(), closed_form[0]) <= BOUNDS[policy] and rel(gy.cpu(), closed_form[1]) <= BOUNDS[policy]
