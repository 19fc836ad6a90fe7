"""The field-evaluation contract where two features meet (issue 27's defects 1-3 and 6).

Every schedule evaluates the user's field exactly where the host's own method does -- no extra
evaluation, whatever the grad mode -- so buffers, random numbers and forward values equal the
host's, and the gradient is that of the computation that ran.  References are not rampde:
torchdiffeq's and torchode's own methods (fp64), and central finite differences.
"""

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import BinomialSchedule, SegmentsSchedule, StepsSchedule
from rampde_torchode import RampdeAdjoint


def _same_values(a, b, checkpoint):
    if checkpoint == "graphs":
        assert torch.allclose(a, b, rtol=0, atol=1e-13)
    else:
        assert torch.equal(a, b)


class _BNField(torch.nn.Module):
    """MLP with BatchNorm (train mode: writes its running statistics) and optional dropout."""

    def __init__(self, p_drop=0.0, dim=3, hidden=8):
        super().__init__()
        self.l1 = torch.nn.Linear(dim, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.drop = torch.nn.Dropout(p_drop)
        self.l2 = torch.nn.Linear(hidden, dim)

    def forward(self, t, y):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(y)))))


def _torchdiffeq_run(method, options, *, p_drop, tol, grad=True):
    torch.manual_seed(1)
    f = _BNField(p_drop).double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    torch.manual_seed(2)
    with torch.set_grad_enabled(grad):
        y = odeint(f, y0, t, method=method, rtol=tol, atol=tol, options=dict(options))
    if grad:
        y.sum().backward()
    grads = [y0.grad] + [p.grad for p in f.parameters()] if grad else []
    return y.detach(), f.bn.num_batches_tracked.item(), f.bn.running_mean.clone(), torch.get_rng_state(), grads


@pytest.mark.parametrize("p_drop,tol", [(0.0, 1e-6), (0.3, 1e-1)], ids=["batchnorm", "batchnorm+dropout"])
@pytest.mark.parametrize("checkpoint", ["steps", "graphs", 2, SegmentsSchedule(2)], ids=str)
def test_adaptive_schedules_make_torchdiffeqs_evaluations(checkpoint, p_drop, tol):
    """Defect 1: "graphs" on adaptive steps evaluated f(t0, y0) once more than torchdiffeq (in the
    first trial's graph): one BatchNorm update too many and, with dropout, other forward values."""
    ref = _torchdiffeq_run("dopri5", {}, p_drop=p_drop, tol=tol)
    got = _torchdiffeq_run("rampde_dopri5", {"checkpoint": checkpoint}, p_drop=p_drop, tol=tol)
    no_grad = _torchdiffeq_run("rampde_dopri5", {"checkpoint": checkpoint}, p_drop=p_drop, tol=tol, grad=False)
    assert got[1] == ref[1]  # num_batches_tracked: one update per evaluation
    assert torch.allclose(got[2], ref[2], rtol=0, atol=1e-12)
    assert torch.equal(got[3], ref[3])  # the random stream continues where torchdiffeq's does
    assert torch.allclose(got[0], ref[0], rtol=0, atol=1e-12)
    # forward values do not depend on grad mode: bitwise, but for "graphs", whose taped trials form
    # the step and its outputs in another operation order (ulps: measured <= 1e-15 here)
    _same_values(got[0], no_grad[0], checkpoint)


@pytest.mark.parametrize("checkpoint", [StepsSchedule(stages=True), BinomialSchedule(3, stages=True),
                                        SegmentsSchedule(4, stages=True)], ids=str)
def test_stagewise_vjps_with_batchnorm_on_adaptive_steps(checkpoint):
    """Defect 2: BatchNorm (train) + adaptive dopri5 + stages=True failed in backward ("modified by an
    inplace operation"): the first stage recomputed before an adaptive step kept a whole graph."""
    whole = _torchdiffeq_run("rampde_dopri5", {}, p_drop=0.0, tol=1e-6)
    ref = _torchdiffeq_run("dopri5", {}, p_drop=0.0, tol=1e-6)
    got = _torchdiffeq_run("rampde_dopri5", {"checkpoint": checkpoint}, p_drop=0.0, tol=1e-6)
    for g, w in zip(got[4], whole[4]):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-12)
    assert got[1] == ref[1] and torch.allclose(got[2], ref[2], rtol=0, atol=1e-12)


class _TorchodeField(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.l1 = torch.nn.Linear(3, 16)
        self.mid = torch.nn.Dropout(0.3) if kind == "dropout" else torch.nn.BatchNorm1d(16)
        self.l2 = torch.nn.Linear(16, 3)

    def forward(self, t, y):
        return self.l2(self.mid(torch.tanh(self.l1(y))))


def _torchode_run(adjoint, controller, kind, checkpoint="steps", grad=True):
    torch.manual_seed(0)
    f = _TorchodeField(kind).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t_eval = torch.linspace(0, 1, 5, dtype=torch.float64).repeat(4, 1)
    t_eval[1] *= 0.7  # another span: sample 1 ends early (zero-length steps after)
    term = to.ODETerm(f)
    ctrl = to.FixedStepController() if controller == "fixed" else to.IntegralController(1e-3, 1e-3, term=term)
    solver = (to.AutoDiffAdjoint(to.Dopri5(term), ctrl) if adjoint == "torchode"
              else RampdeAdjoint(to.Dopri5(term), ctrl, precision="fp64", checkpoint=checkpoint))
    torch.manual_seed(5)
    with torch.set_grad_enabled(grad):
        sol = solver.solve(to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval),
                           dt0=torch.full((4,), 0.1, dtype=torch.float64))
    grads = []
    if grad:
        sol.ys.square().sum().backward()
        grads = [y0.grad] + [p.grad for p in f.parameters()]
    return sol.ys.detach(), sol.stats["n_f_evals"], torch.get_rng_state(), [b.clone() for b in f.buffers()], grads


@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
@pytest.mark.parametrize("controller", ["fixed", "adaptive"])
@pytest.mark.parametrize("checkpoint", ["steps", "graphs", 2, StepsSchedule(stages=True)], ids=str)
def test_torchode_fsal_field_values_do_not_depend_on_grad_mode(checkpoint, controller, kind):
    """Defect 3: with grad, a replayed field's first stage was evaluated afresh every iteration
    (torchode reuses Dopri5's last stage): dropout values 0.1 away from the same solve without
    grad and from torchode's AutoDiffAdjoint, BatchNorm updated too often."""
    host = _torchode_run("torchode", controller, kind)
    got = _torchode_run("rampde", controller, kind, checkpoint)
    no_grad = _torchode_run("rampde", controller, kind, checkpoint, grad=False)
    _same_values(got[0], no_grad[0], checkpoint)
    assert torch.allclose(got[0], host[0], rtol=0, atol=1e-13)
    assert torch.equal(got[1], host[1])  # n_f_evals: torchode's count
    assert torch.equal(got[2], host[2])
    for b, hb in zip(got[3], host[3]):
        assert torch.allclose(b.double(), hb.double(), rtol=0, atol=1e-13)
    steps = _torchode_run("rampde", controller, kind, "steps")
    for g, s in zip(got[4], steps[4]):  # every schedule: the same gradient
        assert torch.allclose(g, s, rtol=1e-11, atol=1e-11)
    if controller == "fixed":
        # fixed steps: torchode's own backprop through its loop is the reference (with adaptive
        # steps it also differentiates its step-size controller, which the discrete adjoint holds fixed)
        for g, h in zip(got[4], host[4]):
            assert torch.allclose(g, h, rtol=1e-10, atol=1e-10)


class _InnerLeafField(torch.nn.Module):
    """Makes an internal leaf requiring grad from its time (FFJORD's pattern); with ``inner=False``
    the same function without it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.l1 = torch.nn.Linear(4, 8)
        self.l2 = torch.nn.Linear(8, 3)

    def forward(self, t, y):
        if self.inner:
            t = t.detach().clone()
            t.requires_grad_(True)
        tt = t * torch.ones(y.shape[0], 1, dtype=y.dtype)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], 1))))


def _inner_grads(method, inner, bias=0.0):
    torch.manual_seed(1)
    f = _InnerLeafField(inner).double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        f.l2.bias[0] += bias
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    y = odeint(f, y0, t, method=method, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    return y.detach(), [y0.grad] + [p.grad for p in f.parameters()]


def test_inner_leaf_with_adaptive_steps_is_the_gradient_of_what_ran():
    """Defect 6 (first half): with an internal leaf, rampde_dopri5's gradient was 2.7e-4 away from
    torchdiffeq's dopri5.  Measured: rampde's gradient is bitwise that of the same function without
    the inner leaf and matches central finite differences of its own solve; it is torchdiffeq's direct
    backprop through its adaptive loop whose parameter gradient changes (by ~2e-4) when the field
    makes such a leaf, and that one disagrees with the finite differences."""
    _, g_inner = _inner_grads("rampde_dopri5", True)
    _, g_plain = _inner_grads("rampde_dopri5", False)
    for a, b in zip(g_inner, g_plain):
        assert torch.equal(a, b)
    e = 1e-5
    yp, _ = _inner_grads("rampde_dopri5", True, bias=e)
    ym, _ = _inner_grads("rampde_dopri5", True, bias=-e)
    fd = ((yp.sum() - ym.sum()) / (2 * e)).item()
    assert abs(g_inner[-1][0].item() - fd) < 1e-6 * abs(fd)
    # torchdiffeq's own gradient of the plain field agrees to the tolerance of its step-size terms
    _, g_host = _inner_grads("dopri5", False)
    assert abs(g_host[-1][0].item() - fd) < 1e-6 * abs(fd)


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", {})], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("checkpoint", ["steps", 2, StepsSchedule(stages=True)], ids=str)
def test_batchnorm_in_a_plain_closure_updates_like_torchdiffeq(checkpoint, method, options):
    """Defect 4: a BatchNorm inside a plain closure (not an nn.Module, so no module buffers to walk)
    updated its running statistics once more per recomputation (32 batches tracked against 16).  Its
    in-place writes are now seen below autograd at the first evaluation and replayed."""

    def run(name, opts):
        torch.manual_seed(1)
        f = _BNField().double()
        y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        t = torch.linspace(0, 1, 3, dtype=torch.float64)
        if name.startswith("rampde_"):
            opts = dict(opts, adjoint_params=tuple(f.parameters()))
        y = odeint(lambda t, y: f(t, y), y0, t, method=name, rtol=1e-6, atol=1e-8, options=opts)
        y.sum().backward()
        return f.bn.num_batches_tracked.item(), f.bn.running_mean.clone(), f.bn.running_var.clone()

    ref = run(method, dict(options))
    got = run("rampde_" + method, dict(options, checkpoint=checkpoint))
    assert got[0] == ref[0]
    # (adaptive: torchdiffeq's and rampde's step sizes agree to rounding, which the statistics sum;
    # measured up to 1.4e-11 under pytest-xdist's single-threaded workers, 5e-14 with 2 threads)
    tol = 1e-12 if method == "rk4" else 1e-10
    assert torch.allclose(got[1], ref[1], rtol=0, atol=tol) and torch.allclose(got[2], ref[2], rtol=0, atol=tol)


def test_closure_counter_written_in_place_is_put_back_after_recomputation():
    """A counter tensor a closure increments in place (no module anywhere): after backward it holds
    the forward's count, as torchdiffeq leaves it (its direct backprop evaluates nothing more)."""
    counts = {}
    for method in ("rk4", "rampde_rk4"):
        calls = torch.zeros(())
        a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

        def f(t, y):
            calls.add_(1)
            return -a * y

        y0 = torch.ones(3, dtype=torch.float64)
        opts = {"step_size": 0.1} if method == "rk4" else {"step_size": 0.1, "adjoint_params": (a,)}
        odeint(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method, options=opts).sum().backward()
        counts[method] = calls.item()
    assert counts["rampde_rk4"] == counts["rk4"] == 40


@pytest.mark.parametrize("options", [{"checkpoint": "graphs"}, {"memory_budget": "1GB"}], ids=str)
@pytest.mark.parametrize("method,step", [("rk4", {"step_size": 0.1}), ("dopri5", {})], ids=["fixed", "adaptive"])
def test_graphs_accepts_a_field_that_makes_its_own_leaf(options, method, step):
    """Defect 6 (second half): "graphs" (and a budget that picks it) refused a field that makes an
    internal leaf requiring grad ("uses 4 tensor(s) that require grad ..."): a kept graph holds
    that leaf alive.  Leaves the field creates are seen being created (FieldWatch) and are not
    hidden tensors.  The gradient equals the default schedule's and, fixed, torchdiffeq's."""

    def run(name, opts):
        torch.manual_seed(1)
        f = _InnerLeafField(True).double()
        y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        y = odeint(f, y0, torch.linspace(0, 1, 3, dtype=torch.float64), method=name, rtol=1e-8, atol=1e-8,
                   options=dict(opts))
        y.sum().backward()
        return [y0.grad] + [p.grad for p in f.parameters()]

    got = run("rampde_" + method, dict(step, **options))
    for g, s in zip(got, run("rampde_" + method, dict(step))):
        assert torch.allclose(g, s, rtol=1e-12, atol=1e-12)
    if method == "rk4":
        for g, h in zip(got, run("rk4", dict(step))):
            assert torch.allclose(g, h, rtol=1e-12, atol=1e-12)


def test_a_closure_tensor_that_requires_grad_is_still_reported_with_graphs():
    """The watch does not hide real hidden tensors: an undeclared closure leaf is still refused."""
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="not among the parameters"):
        odeint(lambda t, y: -a * y, torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
               method="rampde_rk4", options={"step_size": 0.1, "checkpoint": "graphs"})


def test_memory_budget_measurement_puts_back_what_a_closure_writes():
    """A budget measures one step before the forward; a BatchNorm inside a plain closure was updated
    by that measurement (4 batches more than torchdiffeq tracks after an rk4 step)."""

    def run(name, opts):
        torch.manual_seed(1)
        f = _BNField().double()
        y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        if name.startswith("rampde_"):
            opts = dict(opts, adjoint_params=tuple(f.parameters()))
        odeint(lambda t, y: f(t, y), y0, torch.linspace(0, 1, 3, dtype=torch.float64), method=name,
               options=opts).sum().backward()
        return f.bn.num_batches_tracked.item(), f.bn.running_mean.clone()

    ref = run("rk4", {"step_size": 0.125})
    got = run("rampde_rk4", {"step_size": 0.125, "memory_budget": "1GB"})
    assert got[0] == ref[0] and torch.allclose(got[1], ref[1], rtol=0, atol=1e-12)


def test_implicit_first_stage_values_do_not_depend_on_grad_mode():
    """sdirk2's first stage is implicit: the probe (a backward to come) was handed to the first step
    as its Newton guess, which the solve without grad does not have -- values 1e-14 apart."""
    a = torch.tensor([[-2.0, 1.0], [0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    opts = {"step_size": 0.125, "adjoint_params": (a,)}
    with_grad = odeint(lambda t, y: y @ a, y0, t, method="rampde_sdirk2", options=opts)
    with torch.no_grad():
        without = odeint(lambda t, y: y @ a, y0, t, method="rampde_sdirk2", options=opts)
    assert torch.equal(with_grad.detach(), without)


@pytest.mark.parametrize("key,value", [("checkpoint", "graphs"), ("checkpoint", 2), ("memory_budget", "1GB")])
def test_odeint_adjoint_refuses_schedule_options_it_cannot_follow(key, value):
    """odeint_adjoint runs the quadrature adjoint, which keeps no states: a checkpoint schedule or a
    memory budget was silently ignored there."""
    from torchdiffeq import odeint_adjoint

    f = torch.nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match=rf"options\['{key}'\].*quadrature adjoint.*Drop it.*torchdiffeq.odeint\("):
        odeint_adjoint(lambda t, y: f(y), torch.ones(3, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                       method="rampde_rk4", options={"step_size": 0.1, key: value}, adjoint_params=tuple(f.parameters()))


@pytest.mark.parametrize("route", ["odeint_adjoint-sdirk2", "sdirk2-steps", "sdirk2-graphs", "kvaerno3-adaptive"])
def test_batchnorm_in_a_closure_is_refused_where_a_module_is_and_left_untouched(route):
    """Implicit methods refuse a field that writes buffers (its module's), under both adjoints; a
    BatchNorm inside a plain closure was accepted silently by "graphs" with an implicit method, and
    where refused its running statistics were left written."""
    from torchdiffeq import odeint_adjoint

    torch.manual_seed(1)
    f = _BNField().double()
    before = [b.clone() for b in f.buffers()]
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    params = tuple(f.parameters())
    with pytest.raises(ValueError, match=r"random numbers or writes buffers.*eval\(\)"):
        if route == "odeint_adjoint-sdirk2":
            odeint_adjoint(lambda t, y: f(t, y), y0, t, method="rampde_sdirk2", options={"step_size": 0.125},
                           adjoint_params=params)
        else:
            method, schedule = route.split("-")
            opts = {"adjoint_params": params}
            if schedule != "adaptive":
                opts.update(step_size=0.125, checkpoint=schedule)
            odeint(lambda t, y: f(t, y), y0, t, method="rampde_" + method, rtol=1e-5, atol=1e-7, options=opts)
    for b, b0 in zip(f.buffers(), before):
        assert torch.equal(b, b0)
