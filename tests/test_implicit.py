"""Diagonally implicit (DIRK) methods: tableaus, Newton's method per stage, the exact adjoint (issue 12).

References that are not rampde: analytic solutions and observed convergence order, finite
differences (``torch.autograd.gradcheck``), backprop through a fully converged Newton iteration
written here with plain autograd, SciPy's Radau at rtol 1e-12, and torchode / torchdiffeq agreeing.
"""

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import ButcherTableau, NewtonOptions, collect_stats, hookimpl

from .helpers import rel
from .host_helpers import needs_torchdiffeq_callbacks

IMPLICIT = {"implicit_euler": 1, "implicit_midpoint": 2, "trapezoid": 2, "sdirk2": 2, "trbdf2": 2, "kvaerno3": 3,
            "kvaerno5": 5}
TIGHT = {"rtol": 1e-13, "atol": 1e-14}
F64 = torch.float64


def _stiff_matrix(lam_fast=-1000.0):
    q = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64) / math.sqrt(2.0)
    return q @ torch.diag(torch.tensor([-1.0, lam_fast], dtype=F64)) @ q.T


# -- tableaus -----------------------------------------------------------------------------------


def test_builtin_dirk_tableaus_are_implicit_and_validated():
    tabs = {t.name: t for t in rampde_plugins.BUILTIN_TABLEAUS}
    for name, order in IMPLICIT.items():
        t = tabs[name]
        assert t.implicit and t.order == order and not t.fsal
    assert tabs["trbdf2"].explicit_first_stage and tabs["kvaerno3"].explicit_first_stage
    assert not tabs["sdirk2"].explicit_first_stage
    assert tabs["trbdf2"].b_err is not None and tabs["kvaerno3"].b_err is not None
    assert tabs["kvaerno5"].explicit_first_stage and tabs["kvaerno5"].b_err is not None
    assert not tabs["rk4"].implicit and tabs["rk4"].diag == (0.0,) * 4


def test_kvaerno5s_embedded_solution_is_fourth_order():
    # The constructor checks the main method's order conditions (to order 5); the error estimate is
    # b - b_hat with b_hat the sixth stage's row: that row must itself be a 4th-order method (not 5th).
    t = {t.name: t for t in rampde_plugins.BUILTIN_TABLEAUS}["kvaerno5"]
    rows = [list(t.a[i]) + [t.diag[i]] for i in range(len(t.c))]
    b_hat = [x - e for x, e in zip(t.b, t.b_err)]
    assert b_hat == pytest.approx(rows[5] + [0.0], abs=1e-16)
    ButcherTableau("kvaerno5_embedded", c=list(t.c), a=rows, b=b_hat, order=4)
    with pytest.raises(ValueError, match="claims order 5"):
        ButcherTableau("kvaerno5_embedded", c=list(t.c), a=rows, b=b_hat, order=5)


def test_dirk_tableau_errors_name_the_problem():
    g = 1 - math.sqrt(2) / 2
    with pytest.raises(ValueError, match=r"claims order 3 but violates the order condition"):
        ButcherTableau("bad", c=[g, 1], a=[[g], [1 - g, g]], b=[1 - g, g], order=3)
    # Gauss-Legendre 2-stage: fully implicit
    s3 = math.sqrt(3)
    with pytest.raises(ValueError, match=r"a\[0\] has non-zero entries above the diagonal; fully implicit"):
        ButcherTableau("gl4", c=[0.5 - s3 / 6, 0.5 + s3 / 6], a=[[0.25, 0.25 - s3 / 6], [0.25 + s3 / 6, 0.25]],
                       b=[0.5, 0.5], order=4)
    with pytest.raises(ValueError, match=r"row 0 of a sums to 0.5 but c\[0\]=1.0"):
        ButcherTableau("bad", c=[1.0], a=[[0.5]], b=[1.0], order=1)


CROUZEIX = ButcherTableau(  # Crouzeix's two-stage SDIRK of order 3
    "crouzeix3", c=[(3 + math.sqrt(3)) / 6, (3 - math.sqrt(3)) / 6],
    a=[[(3 + math.sqrt(3)) / 6], [-math.sqrt(3) / 3, (3 + math.sqrt(3)) / 6]], b=[0.5, 0.5], order=3)


class _DirkPlugin:
    @hookimpl
    def rampde_register_tableaus(self, registry):
        registry.add_tableau(CROUZEIX)


def test_a_plugin_registers_its_own_dirk_tableau_in_both_hosts():
    import torchode as to

    plugin = _DirkPlugin()
    rampde_plugins.register_plugin(plugin, name="test-dirk")
    try:
        errs = []
        for h in (0.1, 0.05):
            y = odeint(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0], dtype=F64),
                       torch.tensor([0.0, 1.0], dtype=F64), method="rampde_crouzeix3",
                       options={"step_size": h, "newton": TIGHT})
            errs.append(abs(y[-1, 0].item() - math.cos(1.0)))
        assert 2.7 < math.log2(errs[0] / errs[1]) < 3.3
        sol = to.solve_ivp(lambda t, y: -y, torch.ones(2, 1, dtype=F64), torch.tensor([[0.0, 1.0]] * 2, dtype=F64),
                           method="rampde_crouzeix3", dt0=0.1)
        assert abs(sol.ys[0, -1, 0].item() - math.exp(-1)) < 1e-4
    finally:
        rampde_plugins.unregister_plugin(plugin)


# -- accuracy -----------------------------------------------------------------------------------


def _order(method, fn, y0, exact, hs):
    errs = []
    for h in hs:
        y = odeint(fn, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rampde_" + method,
                   options={"step_size": h, "precision": "fp64", "newton": TIGHT})[-1]
        errs.append((y - exact).norm().item())
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


@pytest.mark.parametrize("method", sorted(IMPLICIT))
def test_observed_order_on_a_stiff_linear_problem(method):
    # eigenvalues -1 and -1000, both modes excited.  The A-stable but not L-stable methods (R(-inf) = -1)
    # damp the fast mode only once h * 1000 is below ~2, so their grids are finer.
    a = _stiff_matrix()
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    exact = torch.linalg.matrix_exp(a) @ y0
    l_stable = method not in ("implicit_midpoint", "trapezoid")
    hs = [1 / 20, 1 / 40, 1 / 80, 1 / 160] if l_stable else [1 / 320, 1 / 640, 1 / 1280]
    if IMPLICIT[method] == 5:  # its error reaches Newton's 1e-13 tolerance by h = 1/80 (1e-13): coarser
        hs = [1 / 5, 1 / 10, 1 / 20, 1 / 40]
    orders = _order(method, lambda t, y: y @ a.T, y0, exact, hs)
    assert all(abs(o - IMPLICIT[method]) <= 0.3 for o in orders), orders


@pytest.mark.parametrize("method", sorted(IMPLICIT))
def test_observed_order_on_a_nonstiff_problem(method):
    exact = torch.tensor([math.cos(1.0), -math.sin(1.0)], dtype=F64)
    orders = _order(method, lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0], dtype=F64), exact,
                    [1 / 10, 1 / 20, 1 / 40, 1 / 80])
    assert all(abs(o - IMPLICIT[method]) <= 0.3 for o in orders), orders


def test_stiff_problem_with_a_large_step_stays_bounded_where_rk4_blows_up():
    lam = -1000.0
    f = lambda t, y: lam * (y - torch.cos(t))  # noqa: E731
    y0, t = torch.zeros(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    part = lambda s: (lam ** 2 * math.cos(s) - lam * math.sin(s)) / (lam ** 2 + 1)  # noqa: E731
    exact = part(1.0) - part(0.0) * math.exp(lam)
    for method in ("implicit_euler", "sdirk2"):
        y = odeint(f, y0, t, method="rampde_" + method, options={"step_size": 0.1})[-1].item()
        assert abs(y - exact) < 1e-4, (method, y, exact)  # h*|lambda| = 100: the error is O(h / |lambda|)
    y = odeint(f, y0, t, method="rampde_rk4", options={"step_size": 0.1})[-1].item()
    assert not math.isfinite(y) or abs(y) > 1e10


# -- gradients ----------------------------------------------------------------------------------


class Field(nn.Module):
    """A stiff linear part plus a small nonlinear, time-dependent one."""

    def __init__(self, d=3, stiff=-30.0):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.w = nn.Parameter(torch.tensor(stiff))

    def forward(self, t, y):
        return self.w * y + torch.tanh(self.lin(y)) * torch.cos(t)


def _grid(n):
    return lambda f, y0, t: torch.linspace(0, 1, n, dtype=t.dtype) * (t[-1] - t[0]) + t[0]


@pytest.mark.parametrize("solver", ["dense", "krylov"])
@pytest.mark.parametrize("method", sorted(IMPLICIT))
def test_gradcheck_y0_t_and_parameters(method, solver):
    torch.manual_seed(0)
    f = Field().double()
    opts = {"grid_constructor": _grid(6), "precision": "fp64", "linear_solver": solver, "newton": TIGHT}
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.6], dtype=F64, requires_grad=True)
    # nondet_tol: GMRES's inner products are reductions whose last bit depends on memory alignment
    assert torch.autograd.gradcheck(lambda y0, t: odeint(f, y0, t, method="rampde_" + method, options=opts),
                                    (y0, t), atol=1e-7, nondet_tol=1e-12)
    params = [p.detach().clone().requires_grad_(True) for p in f.parameters()]

    def through_params(*ps):
        return odeint(lambda t, y: torch.func.functional_call(f, dict(zip([n for n, _ in f.named_parameters()], ps)),
                                                              (t, y)),
                      y0.detach(), t.detach(), method="rampde_" + method, options={**opts, "adjoint_params": ps})

    assert torch.autograd.gradcheck(through_params, tuple(params), atol=1e-7, nondet_tol=1e-12)


class _OfTimeOnly(nn.Module):
    """y' = -a exp(-a t): no dependence on the state (J = df/dy = 0), like torchdiffeq's own ``ExpODE``
    test problem (there without the parameter)."""

    def __init__(self, trainable):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.1, dtype=F64), requires_grad=trainable)

    def forward(self, t, y):
        return -self.a * torch.exp(-self.a * t) * torch.ones_like(y)


@pytest.mark.parametrize("trainable", [False, True], ids=["no-parameter", "parameter"])
@pytest.mark.parametrize("solver", ["dense", "krylov"])
@pytest.mark.parametrize("method", sorted(IMPLICIT))
def test_a_field_that_does_not_depend_on_the_state(method, solver, trainable):
    # Newton's Jacobian of such a field is zero: the VJPs that form it find no path to the state and
    # must give zeros, not fail (the no-parameter case has no graph at all).  References: the exact
    # dy/dy0 = 1 of every step map y + h sum b_i g(t_i), the closed form, and finite differences.
    f = _OfTimeOnly(trainable)
    opts = {"grid_constructor": _grid(9), "precision": "fp64", "linear_solver": solver, "newton": TIGHT}
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    ys = odeint(f, y0, t, method="rampde_" + method, options=opts)
    exact = y0.detach() - 1 + torch.exp(-0.1 * t)[:, None]
    assert (ys - exact).abs().max() <= 1e-3 * 8.0 ** -IMPLICIT[method] * 8  # order p on 8 steps
    cot = torch.linspace(0.5, 2.0, ys.numel(), dtype=F64).reshape(ys.shape)
    wanted = [y0, f.a] if trainable else [y0]
    grads = torch.autograd.grad(ys, wanted, cot)
    assert rel(grads[0], cot.sum(0)) <= 1e-12
    if trainable:
        def through_a(a):
            field = lambda tt, y: -a * torch.exp(-a * tt) * torch.ones_like(y)  # noqa: E731
            return odeint(field, y0.detach(), t, method="rampde_" + method, options={**opts, "adjoint_params": (a,)})

        assert torch.autograd.gradcheck(through_a, (f.a.detach().clone().requires_grad_(True),), atol=1e-7,
                                        nondet_tol=1e-12)


def _reference_dirk(f, tab, y0, grid):
    """A DIRK solve by plain autograd: each stage by 30 full Newton iterations (Jacobian at every
    iterate, built with create_graph), so backprop goes through the converged iteration."""
    y = y0
    for n in range(len(grid) - 1):
        t0, h = grid[n], grid[n + 1] - grid[n]
        ks = []
        for i in range(tab.stages):
            ti = t0 + tab.c[i] * h
            base = y + h * sum((a * k for a, k in zip(tab.a[i], ks)), torch.zeros_like(y))
            g = tab.diag[i]
            if g == 0.0:
                ks.append(f(ti, base))
                continue
            k = ks[-1] if ks else f(ti, y)
            for _ in range(30):
                z = base + h * g * k
                jac = torch.autograd.functional.jacobian(lambda zz: f(ti, zz), z, create_graph=True)
                n_ = z.numel()
                m = torch.eye(n_, dtype=z.dtype) - h * g * jac.reshape(n_, n_)
                k = k + torch.linalg.solve(m, (f(ti, z) - k).reshape(-1)).reshape(k.shape)
            ks.append(f(ti, base + h * g * k))
        y = y + h * sum(b * k for b, k in zip(tab.b, ks))
    return y


@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2", "trbdf2", "kvaerno3", "kvaerno5"])
def test_equals_backprop_through_a_converged_newton_solve(method):
    torch.manual_seed(1)
    f = Field(d=2, stiff=-50.0).double()
    tab = rampde_plugins.get_registry().tableau(method)
    y0 = torch.randn(2, dtype=F64, requires_grad=True)
    grid = torch.linspace(0, 0.5, 6, dtype=F64)
    ref = _reference_dirk(f, tab, y0, grid)
    g_ref = torch.autograd.grad(ref.sum(), [y0, *f.parameters()])
    y = odeint(f, y0, grid[[0, -1]], method="rampde_" + method,
               options={"grid_constructor": lambda *_: grid, "precision": "fp64", "newton": TIGHT})[-1]
    assert (y - ref).abs().max().item() < 1e-10
    g = torch.autograd.grad(y.sum(), [y0, *f.parameters()])
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max().item() <= 1e-8 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("method", ["sdirk2", "kvaerno3", "kvaerno5"])
def test_dense_and_krylov_agree(method):
    torch.manual_seed(2)
    f = Field().double()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    out = []
    for solver in ("dense", "krylov"):
        y = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rampde_" + method,
                   options={"step_size": 0.05, "precision": "fp64", "linear_solver": solver, "newton": TIGHT})
        out.append((y, *torch.autograd.grad(y.square().sum(), [y0, *f.parameters()])))
    for a, b in zip(*out):
        # both converge the Newton iteration to 1e-13 and solve the transposed systems to 16 eps
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


class _PerSampleTime(nn.Module):
    """torchode's time is (batch,): the same field, time broadcast over the features."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, t, y):
        return self.f(t[:, None], y)


@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid", "trbdf2", "kvaerno5"])
def test_both_hosts_give_the_same_result_and_gradient(method):
    import torchode as to

    torch.manual_seed(3)
    f = Field().double()
    y0 = torch.randn(3, 3, dtype=F64)
    results = []
    for host in ("torchdiffeq", "torchode"):
        y0_ = y0.clone().requires_grad_(True)
        if host == "torchdiffeq":
            y = odeint(f, y0_, torch.linspace(0, 1, 5, dtype=F64), method="rampde_" + method,
                       options={"step_size": 0.05, "newton": TIGHT}).transpose(0, 1)
        else:
            t_eval = torch.linspace(0, 1, 5, dtype=F64).expand(3, 5)
            y = to.solve_ivp(_PerSampleTime(f), y0_, t_eval, method="rampde_" + method, dt0=0.05,
                             controller=to.FixedStepController(), newton=TIGHT).ys
        results.append((y, *torch.autograd.grad(y.square().sum(), [y0_, *f.parameters()])))
    for a, b in zip(*results):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("checkpoint", ["graphs", 2, rampde_plugins.SegmentsSchedule(3)])
def test_every_checkpoint_schedule_gives_the_same_gradient(checkpoint):
    torch.manual_seed(4)
    f = Field().double()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    grads = []
    for ck in ("steps", checkpoint):
        y = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rampde_sdirk2",
                   options={"step_size": 0.1, "newton": TIGHT, "checkpoint": ck})
        grads.append(torch.autograd.grad(y.square().sum(), [y0, *f.parameters()]))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("precision, bound", [("bf16", 2.0 ** -8), ("fp16", 2.0 ** -11)])
def test_mixed_precision_gradient_on_a_stiff_linear_problem(precision, bound):
    # y' = A y (eigenvalues -1, -200), loss sum(y(1)^2), gradient w.r.t. y0 and A.  Each velocity
    # A z is one matmul rounded to bf16 (u = 2^-8) or fp16 (u = 2^-11) while the state, Newton and
    # the transposed solves stay in fp32.  The fast mode is damped to nothing, so the gradient is set
    # by the slow mode, whose velocity carries a relative rounding error of order u per evaluation
    # that the steps average: the bound is one u; measured (sdirk2, implicit_euler, trbdf2) 0.06-0.7 u
    # for bf16 and 0.03-0.6 u for fp16.  (A's entries here, +-100.5 and +-99.5, are exact in bf16; at
    # eigenvalue -1000 they would be +-500.5, +-499.5, which bf16 rounds to +-500 -- the slow
    # eigenvalue itself is then lost before any solver runs.)
    a64 = _stiff_matrix(-200.0)
    y0_64 = torch.tensor([[1.0, 0.5], [0.3, -0.2]], dtype=F64)
    grads = {}
    for pol in ("fp64", precision):
        dt = F64 if pol == "fp64" else torch.float32
        a = a64.to(dt).requires_grad_(True)
        y0 = y0_64.to(dt).requires_grad_(True)
        with collect_stats() as stats:
            y = odeint(lambda t, y: y @ a.T, y0, torch.tensor([0.0, 1.0], dtype=dt), method="rampde_sdirk2",
                       options={"step_size": 0.05, "precision": pol, "adjoint_params": (a,)})
            grads[pol] = [g.double() for g in torch.autograd.grad(y.square().sum(), [y0, a])]
        assert stats.last.policy == pol
    for g, g_ref in zip(grads[precision], grads["fp64"]):
        rel = ((g - g_ref).norm() / g_ref.norm()).item()
        assert rel <= bound, rel


# -- adaptive steps, Newton failures ------------------------------------------------------------


def _robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2, 3e7 * y2 ** 2], dim=-1)


def test_adaptive_pairs_solve_robertson_against_scipy_radau():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    y0 = [1.0, 0.0, 0.0]
    ref = scipy_integrate.solve_ivp(lambda t, y: _robertson(t, torch.tensor(y)).numpy(), (0.0, 40.0), y0,
                                    method="Radau", rtol=1e-12, atol=1e-16).y[:, -1]
    ref = torch.tensor(ref, dtype=F64)
    # kvaerno3 is within 10x the tolerance (measured 0.3x); trbdf2 -- second order, error per step
    # controlled, so the global error grows like tol^(2/3) times the steps -- measured 22x at rtol 1e-6
    for method, allowed in (("trbdf2", 30), ("kvaerno3", 10), ("kvaerno5", 10)):
        with collect_stats() as stats:
            # an implicit pair's steps land on every output (t = 40 too, not only the last): its
            # dense output is only stage-order accurate (kvaerno5 was 213x the tolerance interpolated here)
            y = odeint(_robertson, torch.tensor(y0, dtype=F64), torch.tensor([0.0, 40.0, 47.0], dtype=F64),
                       method="rampde_" + method, rtol=1e-6, atol=1e-10)[1]
        excess = ((y - ref).abs() / (1e-6 * ref.abs() + 1e-10)).max().item()
        assert excess <= allowed, (method, excess)  # per component, in units of the tolerance
        assert stats.last.n_steps < 2000 and stats.last.newton_iterations > 0


@needs_torchdiffeq_callbacks
@pytest.mark.parametrize("t_values", [[0.0, 0.3, 1.7], [1.7, 0.3, 0.0]])
def test_an_implicit_pairs_steps_land_on_every_output(t_values):
    # Its dense output runs through stage states of stage order 2: outputs are stepped to, not
    # interpolated; an explicit pair steps past them (torchdiffeq's semantics) and interpolates.
    ends = {}
    sign = 1.0 if t_values[-1] > t_values[0] else -1.0
    for method in ("rampde_kvaerno5", "rampde_kvaerno3", "rampde_dopri5"):
        f = _LinearStiff()
        # the callback sees the user's time and the step's size (torchdiffeq negates a decreasing time)
        f.callback_accept_step = lambda t0, y, dt, m=method: ends.setdefault(m, []).append(float(t0 + sign * dt))
        odeint(f, torch.tensor([1.0, 0.5], dtype=F64), torch.tensor(t_values, dtype=F64), method=method,
               rtol=1e-6, atol=1e-8)
    for method in ("rampde_kvaerno5", "rampde_kvaerno3"):
        for out in t_values[1:]:
            assert min(abs(e - out) for e in ends[method]) < 1e-12, (method, out, ends[method])
    assert sign * ends["rampde_dopri5"][-1] > sign * t_values[-1]
    assert min(abs(e - t_values[1]) for e in ends["rampde_dopri5"]) > 1e-6


class _LinearStiff(nn.Module):
    def forward(self, t, y):
        return y @ _stiff_matrix(-50.0).T


def test_the_filtered_error_estimate_lets_steps_grow_on_a_smooth_stiff_solution():
    # van der Pol, mu = 1000, on its slow manifold up to t = 500: SciPy's Radau takes 33 steps.  The
    # raw embedded estimate of a stiff component does not decay with h |lambda| and took 1838 steps.
    mu = 1000.0

    def vdp(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    with collect_stats() as stats:
        odeint(vdp, torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 500.0], dtype=F64),
               method="rampde_kvaerno3", rtol=1e-6, atol=1e-8)
    assert stats.last.n_steps < 200, stats.last.n_steps


def test_a_failed_newton_iteration_rejects_the_adaptive_step():
    with collect_stats() as stats:
        y = odeint(_robertson, torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                   method="rampde_trbdf2", rtol=1e-6, atol=1e-10,
                   options={"newton": {"max_iter": 2, "rtol": 1e-10, "atol": 1e-14}})[-1]
    assert stats.last.newton_failures > 0
    assert abs(y.sum().item() - 1.0) < 1e-8  # mass conservation still holds


def test_a_failed_newton_iteration_on_a_fixed_grid_names_the_step():
    with pytest.raises(rampde_plugins.NewtonFailure, match=r"did not converge for a stage of 'sdirk2' at t = 0.146447 \(h = 0\.5\): scaled update .* \[step 0 of 2\]"):
        odeint(_robertson, torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="rampde_sdirk2", options={"step_size": 0.5, "newton": {"max_iter": 1}})


# -- fields and options that cannot work --------------------------------------------------------


def test_a_random_field_is_refused_and_the_rng_is_untouched():
    torch.manual_seed(5)
    f = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    f.train()
    y0 = torch.randn(2, 3)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"'sdirk2' is implicit: Newton's method .* Put the module in eval\(\)"):
        odeint(lambda t, y: f(y), y0, torch.tensor([0.0, 1.0]), method="rampde_sdirk2",
               options={"step_size": 0.5, "adjoint_params": tuple(f.parameters())})
    assert torch.equal(torch.get_rng_state(), state)
    f.eval()
    y = odeint(lambda t, y: f(y), y0, torch.tensor([0.0, 1.0]), method="rampde_sdirk2",
               options={"step_size": 0.5, "adjoint_params": tuple(f.parameters())})
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("options, exc, match", [
    ({"linear_solver": "lu"}, ValueError, r"linear_solver='lu'; choose one of auto, dense, krylov"),
    ({"newton": {"rtool": 1e-3}}, ValueError, r"unknown Newton option\(s\) \['rtool'\]; valid: linear_solver, rtol"),
    ({"newton": {"max_iter": 0}}, ValueError, r"max_iter=0 must be a positive integer"),
    ({"newton": 3}, TypeError, r"must be a dict or rampde_plugins.NewtonOptions, got int"),
])
def test_bad_newton_options(options, exc, match):
    with pytest.raises(exc, match=match):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_sdirk2",
               options={"step_size": 0.5, **options})


def test_newton_options_on_an_explicit_method_are_an_error():
    with pytest.raises(ValueError, match=r"options\['linear_solver'\] apply to implicit methods; 'rk4' is explicit"):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 0.5, "linear_solver": "dense"})
    assert NewtonOptions().linear_solver == "auto"


def test_torchode_adaptive_implicit_pair_per_sample_against_scipy():
    import torchode as to

    scipy_integrate = pytest.importorskip("scipy.integrate")
    # two samples with their own end times: per-sample steps, per-sample Newton blocks
    t_end = torch.tensor([10.0, 40.0], dtype=F64)
    y0 = torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=F64)
    term = to.ODETerm(_robertson)
    ctrl = to.IntegralController(atol=1e-10, rtol=1e-6, term=term)
    sol = to.solve_ivp(_robertson, y0, torch.stack([torch.zeros(2, dtype=F64), t_end], dim=1),
                       method="rampde_kvaerno3", controller=ctrl)
    assert sol.status.tolist() == [0, 0]
    for b, te in enumerate(t_end.tolist()):
        ref = torch.tensor(scipy_integrate.solve_ivp(lambda t, y: _robertson(t, torch.tensor(y)).numpy(), (0.0, te),
                                                     [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-16).y[:, -1])
        excess = ((sol.ys[b, -1] - ref).abs() / (1e-6 * ref.abs() + 1e-10)).max().item()
        assert excess <= 20, (b, excess)  # in units of the tolerance; measured 12 at t = 40 (torchode's norm)


def test_torchode_newton_failure_rejects_only_the_failing_sample():
    # torchode decides every step per sample: a sample whose Newton iteration fails rejects its own
    # step; the others go on as if they were solved alone (same steps, same values, same gradients).
    import torchode as to

    def solve(y0, scale):
        # sample b's field: Robertson's kinetics slowed down by scale[b] (1: stiff, Newton fails
        # with these settings at the controller's first step sizes; 1e-6: mild)
        def f(t, y):
            return scale[:, None] * _robertson(t, y)

        with collect_stats() as stats:
            sol = to.solve_ivp(f, y0, torch.tensor([[0.0, 0.05, 0.1]] * y0.shape[0], dtype=F64),
                               method="rampde_kvaerno3", controller=to.IntegralController(atol=1e-10, rtol=1e-6),
                               newton={"max_iter": 2, "rtol": 1e-10, "atol": 1e-14})
        w = torch.linspace(0.5, 1.5, 9, dtype=F64).reshape(3, 3)
        (grad,) = torch.autograd.grad((sol.ys * w).sum(), y0)
        return sol, stats.last, grad

    y0 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    scales = torch.tensor([1.0, 1e-6], dtype=F64)
    both, st, g_both = solve(y0, scales)
    # (before: the failure's infinite error estimate was torchode's INFINITE_NORM status, stopping
    # both samples at the first failure -- status [4, 4])
    assert st.newton_failures > 0 and both.status.tolist() == [0, 0]
    assert abs(both.ys[0, -1].sum().item() - 1.0) < 1e-8  # the failing sample is solved too (mass)
    for b in range(2):
        y0_b = y0.detach()[b : b + 1].clone().requires_grad_(True)
        alone, st_b, g_alone = solve(y0_b, scales[b : b + 1])
        assert (st_b.newton_failures > 0) == (b == 0)
        assert both.stats["n_steps"][b] == alone.stats["n_steps"][0]
        assert torch.equal(both.ys[b], alone.ys[0])
        assert torch.allclose(g_both[b], g_alone[0], rtol=1e-10, atol=1e-14), (b, g_both[b], g_alone[0])


def test_torchode_output_between_steps_uses_the_stage_polynomial():
    import torchode as to

    # y' = -y with sdirk2 (implicit first stage: its ks[0] is not f(t0, y0), so a Hermite output
    # built on it would be wrong at O(h)); outputs in the middle of steps
    t_eval = torch.tensor([[0.0, 0.005, 0.2525, 0.7775]], dtype=F64)
    sol = to.solve_ivp(lambda t, y: -y, torch.ones(1, 1, dtype=F64), t_eval, method="rampde_sdirk2", dt0=0.01,
                       controller=to.FixedStepController(), newton=TIGHT)
    err = (sol.ys[0, :, 0] - torch.exp(-t_eval[0])).abs().max().item()
    assert err < 1e-5, err  # the method's global error at h = 0.01 is ~4e-6 here


def test_graphs_schedule_on_adaptive_implicit_steps_gives_the_steps_gradient():
    torch.manual_seed(6)
    f = Field().double()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    grads = []
    for ck in ("steps", "graphs"):
        with collect_stats() as stats:
            y = odeint(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), method="rampde_kvaerno3", rtol=1e-6, atol=1e-8,
                       options={"checkpoint": ck, "newton": TIGHT})
            grads.append(torch.autograd.grad(y.square().sum(), [y0, *f.parameters()]))
        assert stats.last.schedule == ck
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())


_MAIN_SCRIPT = """
import json, torch
torch.set_default_dtype(torch.float64)
from torchdiffeq import odeint
f = lambda t, y: -50.0 * (y - torch.cos(t)) + 0.3 * y ** 2
out = {m: odeint(f, torch.tensor([0.2, 0.5]), torch.linspace(0, 1, 5), method=m, options={"step_size": 0.05}).tolist()
       for m in ("implicit_euler", "implicit_midpoint", "trapezoid", "sdirk2", "trbdf2")}
print(json.dumps(out))
"""


@pytest.mark.skipif("RAMPDE_TORCHDIFFEQ_MAIN" not in __import__("os").environ,
                    reason="set RAMPDE_TORCHDIFFEQ_MAIN to a checkout of torchdiffeq's main branch (its implicit methods)")
def test_same_methods_as_torchdiffeq_main():
    # torchdiffeq main (unreleased) has implicit_euler, implicit_midpoint, trapezoid, sdirk2 and
    # trbdf2 with the same coefficients: results agree to its Newton tolerance (measured 1.5e-10)
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.environ["RAMPDE_TORCHDIFFEQ_MAIN"], "RAMPDE_PLUGINS_DISABLE_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", _MAIN_SCRIPT], capture_output=True, text=True, env=env, check=True,
                         cwd="/")
    main = json.loads(out.stdout.strip().splitlines()[-1])
    f = lambda t, y: -50.0 * (y - torch.cos(t)) + 0.3 * y ** 2  # noqa: E731
    for method, ref in main.items():
        y = odeint(f, torch.tensor([0.2, 0.5], dtype=F64), torch.linspace(0, 1, 5, dtype=F64), method="rampde_" + method,
                   options={"step_size": 0.05, "newton": TIGHT})
        assert (y - torch.tensor(ref, dtype=F64)).abs().max().item() < 1e-9, method
