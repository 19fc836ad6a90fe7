"""The core alone: rampde_plugins' engine and its strategies without any host library.

Nothing here imports torchdiffeq, torchode or torchsde (nor tests/helpers' host parts): the engine's
public entry points (``solve_grid``, ``solve_adaptive`` with a controller written here) are driven
directly, every checkpoint schedule and a memory budget among them.  One test runs the same in a
fresh interpreter where importing a host raises, which is what "the core imports no host" means.

References: the discrete solution of a linear problem in closed form (a matrix power), and
``torch.autograd.gradcheck`` (finite differences) on a nonlinear field.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import rampde_plugins
from rampde_plugins import (BinomialSchedule, MemoryBudget, SegmentsSchedule, StepController, collect_stats,
                            solve_adaptive, solve_grid)

from .helpers import linear_problem, rel

REG = rampde_plugins.get_registry()
SCHEDULES = ["steps", "graphs", 1, 2, 5, "sqrt", SegmentsSchedule(3), BinomialSchedule(4), MemoryBudget("40KB")]


def _ids(s):
    return s if isinstance(s, str) else (f"c={s}" if isinstance(s, int) else repr(s))


def _spec(s, n):
    return math.ceil(math.sqrt(n)) if s == "sqrt" else s


def _closed_form_rk4(a, y0, h, n):
    """y_n R(hA)^n: every 4-stage 4th-order RK method on y' = y A."""
    z = h * a
    r = torch.eye(a.shape[0], dtype=a.dtype) + z + z @ z / 2 + z @ z @ z / 6 + z @ z @ z @ z / 24
    return y0 @ torch.linalg.matrix_power(r, n)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_fixed_grid_every_schedule_equals_the_closed_form(schedule):
    n = 24
    a64, y064 = linear_problem()
    grid = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    a, y0 = a64.clone().requires_grad_(), y064.clone().requires_grad_()
    with collect_stats() as stats:
        y = solve_grid(lambda t, y: y @ a, y0, grid, grid[[0, -1]], tableau=REG.tableau("rk4"),
                       policy=REG.policy("fp64"), params=(a,), checkpoint=_spec(schedule, n))[-1]
    got = torch.autograd.grad((y**2).sum(), [a, y0])
    a2, y2 = a64.clone().requires_grad_(), y064.clone().requires_grad_()
    ref = torch.autograd.grad((_closed_form_rk4(a2, y2, 1.0 / n, n) ** 2).sum(), [a2, y2])
    assert rel(got[0], ref[0]) <= 1e-12 and rel(got[1], ref[1]) <= 1e-12
    rec = stats.last
    assert rec.n_steps == n and rec.backward_done and rec.taped_steps == n


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(8, 3, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2 * torch.cos(t)


def _gradcheck_problem(schedule):
    field = _Field()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t_out = torch.tensor([0.0, 0.35, 0.6], dtype=torch.float64, requires_grad=True)

    def fn(y0, t_out, w1, w2):
        grid = torch.cat([t_out[:1], torch.linspace(0.1, 0.5, 5, dtype=torch.float64), t_out[-1:]])
        return solve_grid(lambda t, y: torch.tanh(y @ w1) @ w2 * torch.cos(t), y0, grid, t_out,
                          tableau=REG.tableau("dopri5"), policy=REG.policy("fp64"), params=(w1, w2), interp="cubic",
                          checkpoint=schedule)

    return fn, (y0, t_out, field.w1.detach().clone().requires_grad_(), field.w2.detach().clone().requires_grad_())


@pytest.mark.parametrize("schedule", ["steps", SegmentsSchedule(2)], ids=_ids)
def test_gradcheck_in_time_state_and_parameters(schedule):
    fn, inputs = _gradcheck_problem(schedule)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["graphs", 2, MemoryBudget(5000)], ids=_ids)  # (binomial(2): the whole solve fits)
def test_one_shot_schedules_match_central_differences(schedule):
    """Schedules that free what they kept during the backward allow one backward per solve, so
    gradcheck's row-by-row Jacobian is not available: a directional derivative instead -- one
    backward against central differences along a random direction of every input at once."""
    fn, inputs = _gradcheck_problem(schedule)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(fn(*inputs).shape, dtype=torch.float64, generator=g)
    dirs = [torch.randn(x.shape, dtype=torch.float64, generator=g) for x in inputs]
    dirs[1][0] = 0.0  # keep t_out[0] the grid's first point
    grads = torch.autograd.grad((fn(*inputs) * w).sum(), inputs)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, dirs))
    eps = 1e-6
    with torch.no_grad():
        plus = (fn(*[x + eps * d for x, d in zip(inputs, dirs)]) * w).sum()
        minus = (fn(*[x - eps * d for x, d in zip(inputs, dirs)]) * w).sum()
    assert abs(float(analytic) - float((plus - minus) / (2 * eps))) <= 1e-6 * abs(float(analytic))


class _Scripted(StepController):
    """Proposes steps from a script and rejects the ones marked so -- the driver, its keepers and
    the adjoint see rejected trials and a varying step size without any host's controller."""

    def __init__(self, script, t_end):
        self.script, self.t_end, self.i = list(script), t_end, 0

    def start(self, f, t0, y0, f0):
        self.i = 0

    def propose(self, t0, y0):
        h, _ = self.script[self.i % len(self.script)]
        if float(t0) + h >= self.t_end - 1e-12:  # the last step lands on t_end exactly
            t1 = torch.tensor(self.t_end, dtype=t0.dtype)
            return t1, t1 - t0
        h_t = torch.tensor(h, dtype=t0.dtype)
        return t0 + h_t, h_t

    def judge(self, t0, t1, h, y0, y1, err):
        _, accept = self.script[self.i % len(self.script)]
        self.i += 1
        return accept


def _hermite(sd, t):
    s = ((t - sd.t0) / (sd.t1 - sd.t0)).to(sd.y0.dtype)
    return sd.y0 + s * (sd.y1 - sd.y0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_adaptive_driver_with_rejections_equals_the_fixed_grid_it_accepted(schedule):
    """A scripted controller: accepted steps h = 0.1, 0.05, 0.1, ... with every third trial rejected.
    The gradient must be that of the fixed grid of the accepted steps (the adjoint treats accepted
    steps as constants), for every schedule."""
    field = _Field()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    script = [(0.1, True), (0.05, True), (0.3, False)]
    t_out = torch.tensor([0.0, 0.42, 1.0], dtype=torch.float64)

    def grads(run):
        for p in field.parameters():
            p.grad = None
        y0_ = y0.clone().requires_grad_(True)
        with collect_stats() as stats:
            run(y0_).square().sum().backward()
        return torch.cat([y0_.grad.reshape(-1), field.w1.grad.reshape(-1), field.w2.grad.reshape(-1)]), stats.last

    got, rec = grads(lambda y: solve_adaptive(field, y, t_out, tableau=REG.tableau("bosh3"), policy=REG.policy("fp64"),
                                              controller=_Scripted(script, 1.0), interp=_hermite, params=tuple(field.parameters()),
                                              checkpoint=_spec(schedule, 13)))
    assert rec.rejected_steps > 0 and rec.backward_done
    # the accepted grid, rebuilt here: 0.1, 0.05 alternating (capped at t = 1)
    pts = [torch.tensor(0.0, dtype=torch.float64)]
    for h in [0.1, 0.05] * 20:
        t = pts[-1]
        if float(t) >= 1.0:
            break
        pts.append(torch.tensor(1.0, dtype=torch.float64) if float(t) + h >= 1.0 - 1e-12 else t + h)
    grid = torch.stack(pts)
    assert rec.n_steps == len(pts) - 1

    def fixed(y):
        sol = solve_grid(field, y, grid, t_out, tableau=REG.tableau("bosh3"), policy=REG.policy("fp64"),
                         params=tuple(field.parameters()))
        return sol

    # outputs inside a step are interpolated linearly on both paths (the fixed grid's "linear")
    ref, _ = grads(fixed)
    assert rel(got, ref) <= 1e-12


def test_the_core_imports_no_host():
    """In a fresh interpreter where torchdiffeq, torchode and torchsde cannot be imported: the
    package imports (the host adapters find no host and install nothing), a
    solve runs forward and backward with every kind of schedule, and no host module was loaded."""
    code = textwrap.dedent('''
        import sys, warnings, importlib.abc
        HOSTS = ("torchdiffeq", "torchode", "torchsde")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in HOSTS:
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import rampde_plugins
        import torch
        reg = rampde_plugins.get_registry()
        a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
        grid = torch.linspace(0, 1, 9, dtype=torch.float64)
        for schedule in ("steps", "graphs", 2, rampde_plugins.SegmentsSchedule(2), rampde_plugins.MemoryBudget("1MB")):
            y0 = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
            y = rampde_plugins.solve_grid(lambda t, y: y @ a, y0, grid, grid[[0, -1]], tableau=reg.tableau("rk4"),
                                          policy=reg.policy("fp64"), params=(a,), checkpoint=schedule)
            y.sum().backward()
            assert torch.isfinite(y0.grad).all()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in HOSTS)
        assert not loaded, loaded
        print("OK", len(caught))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")


def test_fp32_state_rounds_once_per_step():
    # A step adds h * sum_i b_i k_i to the fp32 state once: summed stage by stage into y (four
    # roundings per rk4 step, each a sizeable fraction of a tiny increment) the state drifted 2.2e-5
    # relative over 700 steps of dy/dt = 0.2 from 3.2; once per step it is 1.4e-6 (the fp32 limit of
    # 700 additions of a constant increment).
    grid = torch.linspace(0.0, 7.0, 701, dtype=torch.float64)
    y = rampde_plugins.solve_grid(lambda t, y: torch.full_like(y, 0.2), torch.tensor([3.2]), grid, grid[[0, -1]],
                                  tableau=rampde_plugins.get_registry().tableau("rk4"),
                                  policy=rampde_plugins.resolve_policy("fp32"))
    assert abs(y[-1].item() - 4.6) / 4.6 < 5e-6
