"""Adaptive steps through torchdiffeq: torchdiffeq's step sequence, exact adjoint, mixed precision."""

import warnings

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import collect_stats
from rampde_plugins import RampdeToleranceWarning

from .helpers import MLPField, linear_problem, rel
from .host_helpers import needs_torchdiffeq_callbacks

EMBEDDED = ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"]
T = torch.tensor([0.0, 0.35, 1.0, 1.7, 3.0], dtype=torch.float64)


class Recorder(MLPField):
    """A field that records torchdiffeq's accept/reject callbacks."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.accepted, self.rejected = [], []

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append((float(t0.detach()), float(dt.detach())))

    def callback_reject_step(self, t0, y0, dt):
        self.rejected.append((float(t0.detach()), float(dt.detach())))


# Step-size control amplifies rounding: dt_next ~ dt * ratio^(-1/order), and an error estimate of
# size e carries relative rounding noise ~1e-16 * |k| / e, so two correct implementations that sum
# in a different order agree on step sizes only to ~1e-16/e.  torchdiffeq's initial step makes the
# first estimate small (~1e-10 here), hence step sizes are compared to 1e-8 and solutions to the
# issue's 1e-10.  dopri8 (error ~ h^9) gets a first step whose estimate is not at round-off.
KW = {m: dict(rtol=1e-5, atol=1e-7) for m in EMBEDDED}
KW["dopri8"] = dict(rtol=1e-4, atol=1e-6, options={"first_step": 0.3})


@needs_torchdiffeq_callbacks
@pytest.mark.parametrize("method", EMBEDDED)
def test_fp64_same_steps_and_solution_as_torchdiffeq(method):
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    host_f, ours_f = Recorder(), Recorder()
    kw = dict(KW[method])
    opts = kw.pop("options", {})
    host = odeint(host_f, y0, T, method=method, options=opts, **kw)
    with collect_stats() as stats:
        ours = odeint(ours_f, y0, T, method="rampde_" + method, options=dict(opts, precision="fp64"), **kw)
    assert rel(ours, host) < 1e-10
    assert len(ours_f.accepted) == len(host_f.accepted) == stats.last.n_steps
    assert len(ours_f.rejected) == len(host_f.rejected) == stats.last.rejected_steps
    for (t_o, dt_o), (t_h, dt_h) in zip(ours_f.accepted, host_f.accepted):
        assert abs(t_o - t_h) <= 1e-8 * max(1.0, abs(t_h)) and abs(dt_o - dt_h) <= 1e-8 * abs(dt_h)


@pytest.mark.parametrize("method", EMBEDDED)
def test_gradients_equal_backprop_through_torchdiffeq_with_frozen_steps(method):
    """torchdiffeq's own backprop sees constant step sizes when first_step is given (its step-size
    update runs under no_grad), so it differentiates exactly the computation rampde's adjoint does."""
    func = MLPField()
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    t = T.clone().requires_grad_()
    kw = dict(rtol=1e-5, atol=1e-7)
    first = {"first_step": 0.3 if method == "dopri8" else 0.05}
    host = odeint(func, y0, t, method=method, options=first, **kw)
    ours = odeint(func, y0, t, method="rampde_" + method, options=dict(first, precision="fp64"), **kw)
    assert rel(ours, host) < 1e-10
    wrt = [y0, t, *func.parameters()]
    for g_o, g_h in zip(torch.autograd.grad((ours**2).sum(), wrt), torch.autograd.grad((host**2).sum(), wrt)):
        assert rel(g_o, g_h) < 1e-8


def test_gradcheck_where_the_step_sequence_is_stable():
    """With max_step binding on every step, the accepted steps do not move under perturbation."""
    func = MLPField(dim=2, hidden=4)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.37, 0.81], dtype=torch.float64, requires_grad=True)

    def fn(y0, t, *params):
        return odeint(func, y0, t, method="rampde_dopri5", rtol=1e-3, atol=1e-3,
                      options={"precision": "fp64", "max_step": 0.1, "first_step": 0.1})

    with collect_stats() as stats:
        fn(y0, t)
    assert stats.last.rejected_steps == 0
    assert torch.autograd.gradcheck(fn, (y0, t, *func.parameters()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_step_t_and_jump_t_like_torchdiffeq():
    def field(t, y):  # a jump at t = 1
        return torch.where(t < 1.0, -y, 0.5 * y) * (1 + 0.1 * torch.sin(3 * t))

    y0 = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opts = {"jump_t": torch.tensor([1.0], dtype=torch.float64), "step_t": torch.tensor([0.5, 1.5], dtype=torch.float64)}
    host = odeint(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-8, options=opts)
    ours = odeint(field, y0, t, method="rampde_dopri5", rtol=1e-6, atol=1e-8, options=dict(opts, precision="fp64"))
    assert rel(ours, host) < 1e-10


def test_fixed_grid_still_available_for_embedded_methods():
    y0 = torch.ones(2, dtype=torch.float64)
    with collect_stats() as stats:
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rampde_dopri5",
               options={"step_size": 0.25})
    assert stats.last.n_steps == 4 and stats.last.rejected_steps == 0


# --- mixed precision -------------------------------------------------------------------------

def _linear_adaptive(dtype, precision, method="rampde_dopri5", tol=1e-4):
    a64, y064 = linear_problem()
    a, y0 = a64.to(dtype).requires_grad_(), y064.to(dtype).requires_grad_()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    opts = {"adjoint_params": (a,)}
    if precision:
        opts["precision"] = precision
    with collect_stats() as stats:
        y = odeint(lambda t, y: y @ a, y0, t, method=method, rtol=tol, atol=tol, options=opts)[-1]
    return torch.autograd.grad((y.double() ** 2).sum(), [a, y0]), stats.last


def test_torchdiffeq_dopri5_with_fp16_state_fails_where_rampde_solves(capsys):
    a64, y064 = linear_problem()
    a = a64.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq's own warnings are not the point here
        with pytest.raises(AssertionError, match="underflow in dt"):
            odeint(lambda t, y: y @ a.half(), y064.half(), torch.tensor([0.0, 1.0]), method="dopri5", rtol=1e-4, atol=1e-4)
    steps = {}
    for policy in ("fp32", "bf16", "fp16"):
        (ga, _), stats = _linear_adaptive(torch.float32, policy)
        assert torch.isfinite(ga).all()
        steps[policy] = (stats.n_steps, stats.rejected_steps)
    with capsys.disabled():
        print(f"\n[dopri5 rtol=atol=1e-4] torchdiffeq fp16 state: AssertionError 'underflow in dt'; "
              f"rampde (accepted, rejected) steps: {steps}")


# The dopri5 bounds against fp64 for every host and schedule: tests/test_linear_precision.py.


def test_tolerance_below_the_velocity_noise_warns_and_still_terminates():
    a64, y064 = linear_problem()
    a = a64.float()
    with pytest.warns(RampdeToleranceWarning, match=r"rtol=1e-08 is below the noise of float16 velocities \(unit roundoff 0.000976562\)"):
        try:
            y = odeint(lambda t, y: y @ a, y064.float(), torch.tensor([0.0, 1.0]), method="rampde_dopri5", rtol=1e-8,
                       atol=1e-8, options={"precision": "fp16", "max_num_steps": 400, "adjoint_params": ()})
        except RuntimeError as exc:  # a clear error is an acceptable end too
            assert "max_num_steps=400 reached" in str(exc) or "underflow" in str(exc)
        else:
            assert torch.isfinite(y).all()


def test_adaptive_and_fixed_grid_options_are_not_mixed():
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"option\(s\) \['interp'\] apply to fixed grids; this method adapts"):
        odeint(lambda t, y: -y, y0, t, method="rampde_dopri5", options={"interp": "cubic"})
    with pytest.raises(ValueError, match=r"option\(s\) \['max_step'\] apply to adaptive steps; this method has no error estimate"):
        odeint(lambda t, y: -y, y0, t, method="rampde_rk4", options={"max_step": 0.1})


def test_rejected_steps_cost_no_memory():
    (ga, _), stats = _linear_adaptive(torch.float32, "fp32", tol=1e-7)
    assert stats.stored_bytes == stats.n_steps * 12 * 10 * 4  # one fp32 state per accepted step
    assert stats.backward_steps == stats.n_steps


def test_rampde_registry_lists_hosts_embedded_methods():
    tabs = rampde_plugins.get_registry().tableaus
    assert all(name in tabs and tabs[name].b_err is not None for name in EMBEDDED)


# --- adaptive steps through torchode ------------------------------------------------------------

import torchode as to  # noqa: E402

from rampde_torchode import RampdeAdjoint  # noqa: E402

TODE_T_EVAL = torch.tensor([[0.0, 0.3, 0.7, 1.0], [0.2, 0.5, 0.9, 1.6], [1.0, 0.8, 0.31, 0.0], [0.0, 0.05, 0.1, 0.15]],
                           dtype=torch.float64)
TODE_CONTROLLERS = {
    "integral": lambda: to.IntegralController(atol=1e-6, rtol=1e-5),
    "pid": lambda: to.PIDController(atol=1e-6, rtol=1e-5, pcoeff=0.2, icoeff=0.5, dcoeff=0.0),
}


def BatchField():  # noqa: N802 (used like a class)
    return MLPField(batched_time=True)


@pytest.mark.parametrize("controller", list(TODE_CONTROLLERS))
@pytest.mark.parametrize("method", [to.Heun, to.Dopri5, to.Tsit5], ids=lambda m: m.__name__)
def test_torchode_adaptive_same_steps_and_frozen_step_gradients(method, controller):
    field = BatchField()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    t_eval = TODE_T_EVAL.clone().requires_grad_()
    problem = to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval)
    # dt0 carries each sample's direction (torchode would clamp a wrong-signed dt0 to 0 and loop).
    dt0 = 0.01 * torch.sign(TODE_T_EVAL[:, -1] - TODE_T_EVAL[:, 0])
    term = to.ODETerm(field)
    # backprop_through_step_size_control=False: torchode's backprop then sees the same frozen steps.
    host = to.AutoDiffAdjoint(method(term), TODE_CONTROLLERS[controller](),
                              backprop_through_step_size_control=False).solve(problem, dt0=dt0)
    ours = RampdeAdjoint(method(term), TODE_CONTROLLERS[controller](), precision="fp64").solve(problem, dt0=dt0)
    assert rel(ours.ys, host.ys) < 1e-10
    for key in ("n_steps", "n_accepted"):
        assert torch.equal(ours.stats[key].cpu(), host.stats[key].cpu()), key
    assert torch.equal(ours.status.cpu(), host.status.cpu())
    if method is not to.Heun:  # first-same-as-last: the same number of evaluations as torchode
        assert torch.equal(ours.stats["n_f_evals"], host.stats["n_f_evals"])
    wrt = [y0, t_eval, *field.parameters()]
    for g_o, g_h in zip(torch.autograd.grad(ours.ys.square().sum(), wrt), torch.autograd.grad(host.ys.square().sum(), wrt)):
        assert rel(g_o, g_h) < 1e-8


def test_solve_ivp_rampde_dopri5_keeps_torchodes_default_adaptive_controller():
    field = BatchField()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ours = to.solve_ivp(field, y0, TODE_T_EVAL, method="rampde_dopri5")  # torchode's default PID controller
    host = to.solve_ivp(field, y0, TODE_T_EVAL, method="dopri5")
    assert rel(ours.ys, host.ys) < 1e-10 and torch.equal(ours.stats["n_steps"], host.stats["n_steps"])


@pytest.mark.parametrize("policy, bound", [("fp16", 1e-3), ("bf16", 5e-3)])
def test_torchode_adaptive_mixed_precision_vs_fp64(policy, bound):
    a64, y064 = linear_problem()
    t_eval = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(y064.shape[0], 2)

    def grads(dtype, precision):
        a, y0 = a64.to(dtype).requires_grad_(), y064.to(dtype).requires_grad_()
        te = t_eval.to(dtype)
        sol = RampdeAdjoint(to.Dopri5(None), to.IntegralController(atol=1e-4, rtol=1e-4), precision=precision,
                            params=(a,)).solve(to.InitialValueProblem(y0, te[:, 0], te[:, -1], te),
                                               term=to.ODETerm(lambda t, y: y @ a))
        return torch.autograd.grad((sol.ys[:, -1].double() ** 2).sum(), [a, y0]), sol

    ref, _ = grads(torch.float64, "fp64")
    got, sol = grads(torch.float32, policy)
    assert sol.stats["rampde"].policy == policy and (sol.status == 0).all()
    assert rel(got[0], ref[0]) <= bound and rel(got[1], ref[1]) <= bound


def _dt_min_case(tol, dt_min, t_eval):
    field = BatchField()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    problem = to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval)
    ctrl = lambda: to.IntegralController(atol=tol, rtol=tol, dt_min=dt_min)  # noqa: E731
    dt0 = 0.1 * torch.sign(t_eval[:, -1] - t_eval[:, 0])
    host = to.AutoDiffAdjoint(to.Dopri5(to.ODETerm(field)), ctrl()).solve(problem, dt0=dt0)
    ours = RampdeAdjoint(to.Dopri5(to.ODETerm(field)), ctrl(), precision="fp64").solve(problem, dt0=dt0)
    return host, ours


SAME_SPAN = torch.tensor([[0.0, 1.0, 2.0]] * 4, dtype=torch.float64)


def test_torchode_adaptive_status_reached_dt_min_like_torchode():
    # A running sample wants a step below dt_min: status 2 and the solve stops, here and in torchode.
    host, ours = _dt_min_case(1e-9, 0.05, SAME_SPAN)
    assert (host.status == 2).any() and torch.equal(ours.status, host.status)
    assert torch.equal(ours.stats["n_steps"], host.stats["n_steps"])


def test_finished_samples_do_not_abort_the_batch():
    """Deliberate difference: torchode keeps updating the controller of finished samples, whose step
    is clamped to 0, so a sample that finishes one step early reports REACHED_DT_MIN and torchode
    stops every other sample there.  Here a status is only taken while a sample runs."""
    host, ours = _dt_min_case(1e-12, 1e-3, SAME_SPAN)
    finished_early = int(host.stats["n_steps"].argmin())
    assert host.status[finished_early] == 2 and (host.stats["n_initialized"] < 3).any()
    assert (ours.status == 0).all() and (ours.stats["n_initialized"] == 3).all()


def test_torchode_tolerance_warning():
    a64, y064 = linear_problem()
    a, t_eval = a64.float(), torch.tensor([0.0, 0.1]).expand(y064.shape[0], 2)
    with pytest.warns(RampdeToleranceWarning, match=r"RampdeAdjoint\(IntegralController\) with precision='bf16': rtol=1e-07"):
        RampdeAdjoint(to.Dopri5(None), to.IntegralController(atol=1e-7, rtol=1e-7), precision="bf16", max_steps=50).solve(
            to.InitialValueProblem(y064.float(), t_eval[:, 0], t_eval[:, -1], t_eval), term=to.ODETerm(lambda t, y: y @ a))
