"""The torchode adapter: same engine behind torchode's API, torchode's semantics and errors."""

import importlib

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import ButcherTableau, collect_stats, hookimpl
from rampde_torchode import RampdeAdjoint, fixed_step_grid

from .helpers import MLPField, rel

interface = importlib.import_module("torchode.interface")
HOST_STEP_METHODS = [to.Euler, to.Heun, to.Dopri5, to.Tsit5]

# Per-sample spans, one sample integrating backwards in time, different step counts and dt0.
T_EVAL = torch.tensor([[0.0, 0.3, 0.7, 1.0], [0.2, 0.5, 0.9, 1.6], [1.0, 0.8, 0.31, 0.0], [0.0, 0.05, 0.1, 0.15]],
                      dtype=torch.float64)
DT0 = torch.tensor([0.1, 0.07, -0.09, 0.04], dtype=torch.float64)


def Field(dim=3, hidden=8, dtype=torch.float64):  # noqa: N802 (used like a class)
    return MLPField(dim=dim, hidden=hidden, dtype=dtype, batched_time=True)


def _problem(y0, t_eval):
    return to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval)


@pytest.mark.parametrize("method", HOST_STEP_METHODS, ids=lambda m: m.__name__)
def test_fp64_matches_torchode_autodiffadjoint(method):
    field = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t_eval = T_EVAL.clone().requires_grad_()
    term = to.ODETerm(field)
    host = to.AutoDiffAdjoint(method(term), to.FixedStepController()).solve(_problem(y0, t_eval), dt0=DT0)
    ours = RampdeAdjoint(method(term), to.FixedStepController(), precision="fp64").solve(_problem(y0, t_eval), dt0=DT0)
    # 1e-12 (the bound); observed ~1e-16 (Dopri5 ~4e-15: its 7-stage sums in another order).
    assert ours.ys.dtype == torch.float64 and rel(ours.ys, host.ys) < 1e-12
    assert torch.equal(ours.ts, host.ts) and torch.equal(ours.status, host.status)
    for key in ("n_steps", "n_accepted", "n_f_evals", "n_initialized"):
        assert torch.equal(ours.stats[key].cpu(), host.stats[key].cpu()), key
    # The discrete adjoint equals torchode's direct backprop through its own loop.
    wrt = [y0, t_eval, *field.parameters()]
    for g_o, g_h in zip(torch.autograd.grad(ours.ys.square().sum(), wrt), torch.autograd.grad(host.ys.square().sum(), wrt)):
        assert rel(g_o, g_h) < 1e-10


def test_solve_ivp_with_rampde_method_name():
    field = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64)
    with collect_stats() as stats:
        sol = to.solve_ivp(field, y0, T_EVAL, method="rampde_rk4", dt0=DT0)
    assert sol.ys.shape == (4, 4, 3) and stats.last.method == "rampde_rk4"
    # torchode's own arithmetic: sample 0 accumulates 10 x 0.1 to 0.9999999999999999 and takes an
    # 11th, 1e-16 long step (torchode's AutoDiffAdjoint counts the same, see the test above).
    assert sol.stats["rampde"] is stats.last and sol.stats["n_steps"].tolist() == [11, 20, 12, 4]
    grids, _, n_steps, _ = fixed_step_grid(T_EVAL[:, 0], T_EVAL[:, -1], DT0, None)
    # Against the same method through torchdiffeq on that grid, sample by sample (RK4 3/8 steps).
    for b in (0, 3):
        grid = grids[: int(n_steps[b]) + 1, b]
        ref = odeint(lambda t, y: field(t.expand(1), y[None])[0], y0[b], T_EVAL[b], method="rk4",
                     options={"grid_constructor": lambda f, y, t: grid, "interp": "cubic"})
        # Outputs between grid points: torchdiffeq's cubic Hermite and ours use the same end slopes.
        assert rel(sol.ys[b], ref) < 1e-12


@pytest.mark.parametrize("method", ["rampde_rk4", "rampde_dopri5"])
def test_gradcheck_y0_t_eval_params(method):
    field = Field(dim=2, hidden=4)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t_eval = torch.tensor([[0.0, 0.33, 0.61], [0.1, 0.4, 0.83], [0.7, 0.45, 0.12]], dtype=torch.float64, requires_grad=True)
    dt0 = torch.tensor([0.1, 0.15, -0.1], dtype=torch.float64)
    step = interface.METHODS[method](term=None)

    def fn(y0, t_eval, *params):
        adj = RampdeAdjoint(step, to.FixedStepController(), precision="fp64")
        return adj.solve(_problem(y0, t_eval), term=to.ODETerm(field), dt0=dt0).ys

    assert torch.autograd.gradcheck(fn, (y0, t_eval, *field.parameters()), eps=1e-6, atol=1e-6, rtol=1e-5)


# The mixed-precision bounds of the linear problem through torchode: tests/test_linear_precision.py.


@pytest.mark.parametrize("time_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("policy", ["fp64", "fp32", "bf16", "fp16"])
def test_dtype_discipline(time_dtype, policy):
    """f gets time in the problem's time dtype and the state in the policy's state dtype, always."""
    state_dtype = rampde_plugins.get_registry().policy(policy).state_dtype
    seen = set()

    def f(t, y):
        assert t.dtype == time_dtype and t.shape == (2,), (t.dtype, t.shape)
        assert y.dtype == state_dtype, y.dtype
        seen.add((t.dtype, y.dtype))
        return -y

    y0 = torch.ones(2, 3, requires_grad=True)
    t_eval = torch.tensor([[0.0, 0.5], [0.0, 0.25]], dtype=time_dtype)
    sol = RampdeAdjoint(to.Heun(), to.FixedStepController(), precision=policy).solve(
        _problem(y0, t_eval), term=to.ODETerm(f), dt0=torch.tensor(0.125, dtype=time_dtype))
    sol.ys.sum().backward()  # the backward's recomputation sees the same dtypes
    assert seen == {(time_dtype, state_dtype)} and sol.ts.dtype == time_dtype


class RalstonPlugin:
    TAB = ButcherTableau("ralston_test", c=[0, 2 / 3], a=[[], [2 / 3]], b=[1 / 4, 3 / 4], order=2)

    @hookimpl
    def rampde_register_tableaus(self, registry):
        registry.add_tableau(self.TAB)


def test_plugin_tableau_appears_in_both_hosts_with_the_same_solution():
    plugin = RalstonPlugin()
    rampde_plugins.register_plugin(plugin)
    try:
        assert "rampde_ralston_test" in interface.METHODS
        assert "rampde_ralston_test" in importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
        field = Field()
        y0 = torch.randn(4, 3, dtype=torch.float64)
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        via_torchode = to.solve_ivp(field, y0, t, method="rampde_ralston_test", dt0=0.125).ys[:, -1]
        via_torchdiffeq = odeint(lambda t, y: field(t.expand(y.shape[0]), y), y0, t, method="rampde_ralston_test",
                                 options={"step_size": 0.125, "adjoint_params": tuple(field.parameters())})[-1]
        assert rel(via_torchode, via_torchdiffeq) < 1e-12
    finally:
        rampde_plugins.unregister_plugin(plugin)
    assert "rampde_ralston_test" not in interface.METHODS


def test_shared_tableau_is_one_method_and_conflicts_are_refused():
    reg = rampde_plugins.get_registry()
    # Both hosts define Dormand-Prince; it is one method, registered by both plugins.
    assert set(reg.provider("tableau", "dopri5").split(", ")) == {"torchode", "torchdiffeq"}
    assert reg.tableau("dopri5").fsal

    class SameDopri:
        @hookimpl
        def rampde_register_tableaus(self, registry):
            registry.add_tableau(reg.tableau("dopri5"), shared=True)

    class OtherDopri:
        @hookimpl
        def rampde_register_tableaus(self, registry):
            registry.add_tableau(ButcherTableau("dopri5", c=[0, 1], a=[[], [1]], b=[0.5, 0.5], order=2), shared=True)

    rampde_plugins.register_plugin(SameDopri(), name="same-dopri")
    try:
        assert set(rampde_plugins.get_registry().provider("tableau", "dopri5").split(", ")) == {"torchode", "torchdiffeq", "same-dopri"}
    finally:
        rampde_plugins.unregister_plugin(name="same-dopri")
    with pytest.raises(ValueError, match=r"method 'dopri5' is registered by plugin '.*' and by plugin '.*' with different coefficients"):
        rampde_plugins.register_plugin(OtherDopri(), name="other-dopri")


def _torchode_own_runs():
    torch.manual_seed(0)
    field = Field(dtype=torch.float32)
    y0 = torch.randn(4, 3)
    t_eval = T_EVAL.float()
    out = []
    for name in ("heun", "dopri5", "tsit5"):
        out.append(to.solve_ivp(field, y0, t_eval, method=name).ys)  # adaptive PID, torchode's default
        out.append(to.solve_ivp(field, y0, t_eval, method=name, dt0=DT0.float(), controller=to.FixedStepController()).ys)
    return out


def test_uninstall_restores_torchode_exactly():
    originals = (interface.AutoDiffAdjoint, interface.solve_ivp, to.solve_ivp)
    with_adapter = _torchode_own_runs()
    rampde_plugins.uninstall("torchode")
    try:
        rampde_plugins.uninstall("torchode")  # idempotent
        assert sorted(interface.METHODS) == ["dopri5", "heun", "tsit5"]
        from torchode.adjoints import AutoDiffAdjoint

        assert interface.AutoDiffAdjoint is AutoDiffAdjoint and to.solve_ivp is interface.solve_ivp
        assert interface.solve_ivp.__module__ == "torchode.interface" and not hasattr(interface.solve_ivp, "__wrapped__")
        without = _torchode_own_runs()
        for a, b in zip(with_adapter, without):
            assert torch.equal(a, b)  # torchode's own methods: bit-for-bit the same with and without
    finally:
        rampde_plugins.install("torchode")
    # Re-installed: a dispatcher again (not torchode's class), sending rampde methods to
    # RampdeAdjoint and torchode's own methods to torchode's AutoDiffAdjoint.
    from torchode.adjoints import AutoDiffAdjoint as TorchodeAutoDiffAdjoint

    dispatch = interface.AutoDiffAdjoint
    assert dispatch is not TorchodeAutoDiffAdjoint and dispatch.__doc__.startswith("Dispatch:")
    term = to.ODETerm(Field(dtype=torch.float32))
    assert isinstance(dispatch(interface.METHODS["rampde_rk4"](term), to.FixedStepController()), RampdeAdjoint)
    assert type(dispatch(to.Heun(term), to.FixedStepController())) is TorchodeAutoDiffAdjoint
    assert originals[0] is not dispatch  # a fresh dispatcher: nothing of the old install lingers
    rampde_plugins.install("torchode")  # idempotent
    assert sum(k.startswith("rampde_") for k in interface.METHODS) == len(rampde_plugins.get_registry().tableaus)


# --- errors torchode would hang on or mishandle ---------------------------------------------------

def _solve(y0=None, t_eval=None, **kw):
    y0 = torch.ones(2, 3) if y0 is None else y0
    t_eval = torch.tensor([[0.0, 1.0], [0.0, 0.5]]) if t_eval is None else t_eval
    return to.solve_ivp(lambda t, y: -y, y0, t_eval, method=kw.pop("method", "rampde_rk4"), **kw)


def test_fixed_step_method_without_dt0():
    with pytest.raises(ValueError, match=r"needs dt0 \(torchode would pick a ~1e-9 step"):
        _solve()


@pytest.mark.parametrize("dt0", [0.0, -0.1, float("nan")])
def test_bad_dt0(dt0):
    with pytest.raises(ValueError, match=r"dt0 must be finite, non-zero and point from t_start to t_end; sample 0"):
        _solve(dt0=dt0)


def test_t_eval_outside_span():
    t_eval = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.2, 0.5]])  # 1.0 is outside [0, 0.5] of sample 0
    with pytest.raises(ValueError, match=r"t_eval\[0, 1\]=1.0 lies outside sample 0's span \[0.0, 0.5\]"):
        _solve(t_eval=t_eval, dt0=0.1, t_span=(torch.zeros(2), torch.full((2,), 0.5)))


def test_state_not_2d():
    problem = to.InitialValueProblem(torch.ones(2, 3), torch.zeros(2), torch.ones(2))
    problem.y0 = torch.ones(2, 3, 1)  # torchode's constructor only asserts; RampdeAdjoint checks itself
    with pytest.raises(ValueError, match=r"y0 must be \(batch, features\) as in torchode, got shape \(2, 3, 1\)"):
        RampdeAdjoint(to.Heun(), to.FixedStepController()).solve(problem, term=to.ODETerm(lambda t, y: -y), dt0=0.1)


def test_hidden_parameters_point_to_params_argument():
    a = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"RampdeAdjoint\(step_method, controller, params=\(A, b\)\)"):
        to.solve_ivp(lambda t, y: y @ a, torch.ones(2, 3), torch.tensor([0.0, 1.0]), method="rampde_euler", dt0=0.1)
    sol = RampdeAdjoint(to.Euler(to.ODETerm(lambda t, y: y @ a)), to.FixedStepController(), params=(a,)).solve(
        _problem(torch.ones(2, 3), torch.tensor([[0.0, 1.0], [0.0, 1.0]])), dt0=0.25)
    sol.ys.sum().backward()
    assert a.grad is not None


def test_adaptive_controller_without_error_estimate_keeps_dt0_like_torchode():
    # torchode's controllers accept every step of a method without an error estimate and keep its
    # size: Euler + PIDController with dt0 is fixed steps of dt0 -- the same solution as torchode's.
    pid = lambda: to.PIDController(atol=1e-6, rtol=1e-6, pcoeff=0.2, icoeff=0.5, dcoeff=0.0)  # noqa: E731
    problem = _problem(torch.ones(2, 3), torch.tensor([[0.0, 0.35, 1.0], [0.0, 0.5, 1.0]]))
    term = to.ODETerm(lambda t, y: -y * (1 + t[:, None]))
    ours = RampdeAdjoint(to.Euler(None), pid()).solve(problem, term=term, dt0=0.1)
    theirs = to.AutoDiffAdjoint(to.Euler(None), pid()).solve(problem, term=term, dt0=torch.full((2,), 0.1))
    assert torch.allclose(ours.ys, theirs.ys, rtol=1e-6, atol=1e-7)
    assert ours.stats["n_steps"].tolist() == theirs.stats["n_steps"].tolist()
    with pytest.raises(ValueError, match=r"has no error estimate, so PIDController keeps the initial step size.*dt0=h"):
        RampdeAdjoint(to.Euler(None), pid()).solve(problem, term=term)


def test_unsupported_step_method_type():
    class Custom(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match=r"RampdeAdjoint cannot run step method Custom: supported are torchode's Euler"):
        RampdeAdjoint(Custom(), to.FixedStepController())


def test_max_steps_sets_status_like_torchode():
    sol = _solve(dt0=0.1, max_steps=4)
    assert sol.status.tolist() == [3, 3]  # REACHED_MAX_STEPS: both samples need more than 4 steps
    assert sol.stats["n_initialized"].tolist() == [1, 1] and torch.isnan(sol.ys[:, 1]).all()


# -- args: torchode passes them to f at every evaluation -----------------------------------------

def _decay(t, y, args):
    """torchode's docs/extra-args.md example: a decay rate per sample, passed as ``args``."""
    return -args["rate"][:, None] * y * args["scale"][0]


def _args_grads(solver_kind, rate_grad=True, adaptive=False, adjoint="discrete"):
    y0 = torch.tensor([[1.2, 0.3], [5.0, -1.0]], dtype=torch.float64, requires_grad=True)
    rate = torch.tensor([0.1, 5.0], dtype=torch.float64, requires_grad=rate_grad)
    scale = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    args = {"rate": rate, "scale": (scale, "a non-tensor leaf")}
    t_eval = torch.stack((torch.linspace(0, 5, 6), torch.linspace(3, 4, 6))).double()
    term = to.ODETerm(_decay, with_args=True)
    if adaptive:
        ctrl, dt0 = to.IntegralController(atol=1e-12, rtol=1e-12, term=term), None
    else:
        ctrl, dt0 = to.FixedStepController(), torch.tensor([0.05, 0.01], dtype=torch.float64)
    if solver_kind == "autodiff":
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), ctrl)
    elif adjoint == "quadrature":
        solver = _quadrature_solver(term, ctrl)
    else:
        solver = RampdeAdjoint(to.Dopri5(term=term), ctrl)
    sol = solver.solve(to.InitialValueProblem(y0=y0, t_start=t_eval[:, 0], t_end=t_eval[:, -1], t_eval=t_eval),
                       dt0=dt0, args=args)
    inputs = [y0, scale] + ([rate] if rate_grad else [])
    cot = torch.linspace(-1.0, 2.0, sol.ys.numel(), dtype=torch.float64).reshape(sol.ys.shape)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(sol.ys, inputs, cot)])


def _quadrature_solver(term, ctrl):
    from rampde_torchode import QuadratureAdjoint

    return QuadratureAdjoint(term, to.Dopri5(term=term), ctrl)


@pytest.mark.parametrize("rate_grad", [True, False], ids=["args-need-grad", "some-args-need-grad"])
def test_args_that_need_grad_are_differentiated_like_autodiffadjoint(rate_grad):
    # Before: a hidden-tensor ValueError asking for params=(...).  AutoDiffAdjoint differentiates
    # whatever args hold; so does RampdeAdjoint now (tensors in tuples, lists and dicts).  Fixed
    # steps: the same steps, fp64, equal to 1e-12; adaptive: each controller's own steps at 1e-12.
    ref = _args_grads("autodiff", rate_grad)
    assert rel(_args_grads("rampde", rate_grad), ref) <= 1e-12
    ref_adaptive = _args_grads("autodiff", rate_grad, adaptive=True)
    assert rel(_args_grads("rampde", rate_grad, adaptive=True), ref_adaptive) <= 1e-9
    # the quadrature adjoint: the continuous adjoint, to its tolerance
    assert rel(_args_grads("rampde", rate_grad, adaptive=True, adjoint="quadrature"), ref_adaptive) <= 1e-7


def test_args_through_solve_ivp():
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    rate = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    t_eval = torch.linspace(0, 1, 5, dtype=torch.float64)
    sol = to.solve_ivp(lambda t, y, r: -r[:, None] * y, y0, t_eval, method="rampde_rk4", dt0=0.01, args=rate)
    g_y0, g_rate = torch.autograd.grad(sol.ys[:, -1].sum(), (y0, rate))
    # y(1) = y0 exp(-r); rk4's relative error at h = 0.01 is about (r h)^4 r / 120 = 2.7e-9 for r = 2
    exact = torch.exp(-rate.detach())
    assert rel(g_y0[:, 0], exact) <= 1e-8
    assert rel(g_rate, -y0.detach()[:, 0] * exact) <= 1e-8
