"""Vector fields as users write them: dropout, BatchNorm, closures, encoders (issue 9, items 1-3, 11).

The reference is always torchdiffeq's own ``rk4`` (the 3/8 rule, as ``rampde_rk4``) differentiated by
plain autograd in float64 -- the gradient of exactly the computation that ran.  Both hosts draw the
field's random numbers in the same order as torchdiffeq (one call per stage, stage by stage), so with
the same seed the forward is the same computation and the gradients must agree to rounding.
"""

import pytest
import torch
import torchode as to
from torch import nn
from torchdiffeq import odeint

from rampde_plugins import AdjointScaler, collect_stats
from rampde_torchode import RampdeAdjoint, RampdeStepMethod

from .helpers import rel

F64 = torch.float64
T = torch.tensor([0.0, 1.0], dtype=F64)
STEP = {"step_size": 0.125}  # 8 steps, exact in binary (torchode accumulates t + dt); outputs at grid points


class DropoutField(nn.Module):
    def __init__(self, dim=3, hidden=16, p=0.3, late=False):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden, dtype=F64), nn.Linear(hidden, dim, dtype=F64)
        self.drop = nn.Dropout(p)
        self.late = late  # draw random numbers only for t > 0.5 (detected at the end of the forward)

    def forward(self, t, y):
        h = torch.tanh(self.l1(y))
        if not self.late or bool((t > 0.5).all()):
            h = self.drop(h)
        return self.l2(h)


class BatchNormField(nn.Module):
    def __init__(self, dim=3, hidden=16):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden, dtype=F64), nn.Linear(hidden, dim, dtype=F64)
        self.bn = nn.BatchNorm1d(hidden, dtype=F64)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.bn(self.l1(y))))


class DropoutBatchNormField(BatchNormField):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, t, y):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(y)))))


FIELDS = {"dropout": DropoutField, "batchnorm": BatchNormField, "dropout+batchnorm": DropoutBatchNormField,
          "late dropout": lambda: DropoutField(late=True)}


def _make(kind, seed=0):
    torch.manual_seed(seed)
    field = FIELDS[kind]().to(F64)
    y0 = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    return field, y0


def _buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items() if not k.endswith(("weight", "bias"))}


def _reference(kind, seed=0, interp="linear"):
    """torchdiffeq rk4 with autograd: gradients, buffers and the RNG state after backward."""
    field, y0 = _make(kind, seed)
    torch.manual_seed(123)
    y = odeint(field, y0, T, method="rk4", options=dict(STEP, interp=interp))
    loss = (y[-1] ** 2).sum()
    grads = torch.autograd.grad(loss, [y0, *field.parameters()])
    return y.detach(), grads, _buffers(field), torch.get_rng_state()


def _close(grads, ref, tol):
    """Each gradient within tol of the reference, relative to the whole gradient's norm: under
    BatchNorm the first layer's bias has an analytic gradient of zero (the normalisation removes
    it), and both sides hold only rounding noise there."""
    scale = torch.cat([r.double().reshape(-1) for r in ref]).norm()
    for g, r in zip(grads, ref):
        assert (g.double() - r.double()).norm() <= tol * scale


def check_like_reference(field, y0, y, reference):
    """The solution ``y`` at t_end, its gradient (taken here), the buffers and the random stream after
    it equal :func:`_reference`'s to rounding (fp64)."""
    ref_y, ref_grads, ref_buffers, ref_rng = reference
    assert rel(y, ref_y[-1]) < 1e-12
    grads = torch.autograd.grad((y ** 2).sum(), [y0, *field.parameters()])
    _close(grads, ref_grads, 1e-12)
    for k, v in _buffers(field).items():
        assert torch.allclose(v.double(), ref_buffers[k].double(), rtol=1e-12, atol=0), k
    # the random stream continues where the forward left it, as after torchdiffeq's backward
    assert torch.equal(torch.get_rng_state(), ref_rng)


def _torchdiffeq(field, y0, precision="fp64", scaler=None):
    opts = dict(STEP, precision=precision)
    if scaler is not None:
        opts["scaler"] = scaler
    return odeint(field, y0, T, method="rampde_rk4", options=opts)[-1]


def _torchode(field, y0, precision="fp64", scaler=None):
    t_eval = T.expand(y0.shape[0], 2)
    term = to.ODETerm(field)
    adj = RampdeAdjoint(RampdeStepMethod("rk4", term), to.FixedStepController(), precision=precision, scaler=scaler)
    sol = adj.solve(to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval), dt0=torch.full((y0.shape[0],), 0.125, dtype=F64))
    return sol.ys[:, -1]


HOSTS = {"torchdiffeq": _torchdiffeq, "torchode": _torchode}


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("kind", FIELDS)
def test_gradients_buffers_and_rng_equal_torchdiffeq_backprop(kind, host):
    # torchode's rampde_rk4 output at t_end is its cubic Hermite interpolant, which evaluates
    # f(t1, y1) once more (drawing random numbers, updating BatchNorm): torchdiffeq's cubic
    # interpolation does the same evaluation, so that is the reference there.
    reference = _reference(kind, interp="cubic" if host == "torchode" else "linear")
    field, y0 = _make(kind)
    torch.manual_seed(123)
    with collect_stats() as stats:
        y = HOSTS[host](field, y0)
    check_like_reference(field, y0, y, reference)
    rec = stats.last
    assert rec.replayed is True
    assert rec.forward_runs == (2 if kind == "late dropout" else 1)


def test_a_deterministic_field_keeps_no_generator_states():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    with collect_stats() as stats:
        y = odeint(lambda t, y: field(y), y0, T, method="rampde_rk4",
                   options=dict(STEP, precision="fp64", adjoint_params=tuple(field.parameters())))
    y.sum().backward()
    rec = stats.last
    assert rec.replayed is False and rec.forward_runs == 1
    assert rec.stored_bytes == 8 * y0.numel() * 8  # the states alone


@pytest.mark.parametrize("host", HOSTS)
def test_fp16_retried_steps_replay_the_same_randomness(host):
    """fp16 with a scaler that overflows at first (target 2**24): steps are redone, the redone VJP
    reuses the step's graph, and buffers/RNG end as torchdiffeq's.  Tolerance 3e-2: fp16 velocities
    (unit roundoff 4.9e-4) through BatchNorm's normalisation of a 16-wide hidden layer, 10 steps."""
    kind = "dropout+batchnorm"
    _, ref_grads, ref_buffers, ref_rng = _reference(kind, interp="cubic" if host == "torchode" else "linear")
    field, y0 = _make(kind)
    field = field.float()
    y0f = y0.detach().float().requires_grad_()
    torch.manual_seed(123)
    with collect_stats() as stats:
        y = HOSTS[host](field, y0f, precision="fp16", scaler=AdjointScaler(target=2.0**24))
    after_forward = _buffers(field)
    grads = torch.autograd.grad((y ** 2).sum(), [y0f, *field.parameters()])
    rec = stats.last
    assert rec.redone_steps > 0 and rec.replayed
    _close(grads, ref_grads, 3e-2)
    for k, v in _buffers(field).items():
        assert torch.equal(v, after_forward[k]), k  # the backward wrote nothing
        assert torch.allclose(v.double(), ref_buffers[k].double(), rtol=1e-2, atol=1e-3), k
    assert torch.equal(torch.get_rng_state(), ref_rng)


def test_adaptive_dropout_equals_torchdiffeq_dopri5_backprop():
    """dopri5 reuses its last stage (FSAL): a replayed field's reused stage is carried, not redrawn."""
    field, y0 = _make("dropout", seed=3)
    torch.manual_seed(7)
    opts = {"first_step": 0.05}  # torchdiffeq's backprop then sees constant steps, like the adjoint
    host = odeint(field, y0, T, method="dopri5", rtol=1e-4, atol=1e-6, options=opts)
    ref = torch.autograd.grad((host[-1] ** 2).sum(), [y0, *field.parameters()])
    ref_rng = torch.get_rng_state()
    torch.manual_seed(7)
    with collect_stats() as stats:
        ours = odeint(field, y0, T, method="rampde_dopri5", rtol=1e-4, atol=1e-6, options=dict(opts, precision="fp64"))
    assert stats.last.n_steps > 3
    assert rel(ours, host) < 1e-10
    grads = torch.autograd.grad((ours[-1] ** 2).sum(), [y0, *field.parameters()])
    for g, r in zip(grads, ref):
        assert rel(g, r) < 1e-8
    assert torch.equal(torch.get_rng_state(), ref_rng)


def test_torchode_adaptive_dropout_is_exact_for_what_ran():
    """Per-sample adaptive steps with a random field: every iteration's first stage is evaluated afresh
    (after its generator state is kept), so the adjoint is that of the forward that ran.  Checked
    against central differences of the same seeded solve in float64; generous tolerances and
    dt_max = 0.125 make every step 0.125 whatever the perturbation, so the differences see the steps
    the adjoint treats as constants (relative agreement 1e-7: O(eps^2) truncation, eps = 1e-5)."""
    field, y0 = _make("dropout", seed=4)
    t_eval = torch.tensor([[0.0, 0.5, 1.0]] * 8, dtype=F64)

    def solve(y0_):
        torch.manual_seed(11)
        term = to.ODETerm(field)
        adj = RampdeAdjoint(to.Dopri5(term), to.IntegralController(1e3, 1e3, term=term, dt_max=0.125), precision="fp64")
        with collect_stats() as stats:
            sol = adj.solve(to.InitialValueProblem(y0_, t_eval[:, 0], t_eval[:, -1], t_eval), dt0=torch.full((8,), 0.125, dtype=F64))
        assert stats.last.replayed  # the parameters require grad: every solve here builds the adjoint graph
        return sol.ys

    ys = solve(y0)
    g, = torch.autograd.grad(ys[:, -1].square().sum(), y0)
    assert torch.get_rng_state().sum() > 0
    assert torch.equal(solve(y0.detach()), ys.detach())  # the seeded forward is reproducible
    eps = 1e-5
    d = torch.randn(y0.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    # (not under no_grad: a solve without adjoint graph reuses FSAL stages and so draws other numbers)
    fd = ((solve(y0.detach() + eps * d)[:, -1].square().sum() - solve(y0.detach() - eps * d)[:, -1].square().sum())
          / (2 * eps)).item()
    assert abs((g * d).sum().item() - fd) < 1e-7 * abs(fd)


# -- tensors rampde does not differentiate -------------------------------------------------------
class LateClosure(nn.Module):
    """Uses a tensor outside its parameters only for t > 0.5 (the probe at t = 0 cannot see it)."""

    def __init__(self, extra):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)
        self.extra = [extra]  # a list: not a registered parameter

    def forward(self, t, y):
        out = self.lin(y)
        if bool((t > 0.5).all()):
            out = out + y @ self.extra[0]
        return out


@pytest.mark.parametrize("host", HOSTS)
def test_tensor_used_only_later_is_reported_at_backward(host):
    v = torch.randn(3, 3, dtype=F64, requires_grad=True)
    field = LateClosure(v)
    y0 = torch.randn(4, 3, dtype=F64)
    y = HOSTS[host](field, y0)
    with pytest.raises(ValueError, match=r"the vector field \(at step \d+ of 8, t = 0\.[5-9]\d*\) uses 1 tensor\(s\) "
                                         r"that require grad but are not among the parameters"):
        y.sum().backward()
    assert v.grad is None


class EarlyClosure(LateClosure):
    def forward(self, t, y):
        out = self.lin(y)
        if bool(((t > 0.2) & (t < 0.5)).all()):
            out = out + y @ self.extra[0]
        return out


@pytest.mark.parametrize("host", HOSTS)
def test_tensor_used_only_early_is_reported_with_the_steps_of_its_vjp(host):
    """Small steps are reversed several per VJP by "steps": the error names that group's steps and
    times (here the last step alone, then steps 0 to 6 in one VJP)."""
    v = torch.randn(3, 3, dtype=F64, requires_grad=True)
    y = HOSTS[host](EarlyClosure(v), torch.randn(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"the vector field \(in steps 0 to 6 of 8, reversed by one VJP, t = 0 to "
                                         r"0\.875\) uses 1 tensor\(s\) that require grad"):
        y.sum().backward()
    assert v.grad is None


def test_tensor_used_only_later_differentiated_when_passed():
    v = torch.randn(3, 3, dtype=F64, requires_grad=True)
    field = LateClosure(v)
    y0 = torch.randn(4, 3, dtype=F64)
    ref = torch.autograd.grad(odeint(field, y0, T, method="rk4", options=STEP)[-1].sum(), [v, *field.parameters()])
    y = odeint(field, y0, T, method="rampde_rk4",
               options=dict(STEP, precision="fp64", adjoint_params=(v, *field.parameters())))
    for g, r in zip(torch.autograd.grad(y[-1].sum(), [v, *field.parameters()]), ref):
        assert rel(g, r) < 1e-12


@pytest.mark.parametrize("host", HOSTS)
def test_pure_closure_without_known_parameters_is_reported_at_forward(host):
    """Nothing rampde knows requires grad, but the field's output does from step 6 on: no silent
    fall-back to plain autograd."""
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)

    def field(t, y):
        return -y + (y @ w if bool((t > 0.5).all()) else 0.0)

    y0 = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"the vector field \(at (step \d+, t|iteration \d+)[^)]*\) uses 1 tensor\(s\) that require grad"):
        HOSTS[host](field, y0)


def test_no_grad_forward_of_a_closure_is_fine():
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        y = odeint(lambda t, y: y @ w, torch.randn(2, 3, dtype=F64), T, method="rampde_rk4", options=STEP)
    assert not y.requires_grad


class Encoded(nn.Module):
    """A field conditioned on c = encoder(x), computed once outside the solve."""

    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)
        self.c = [c]

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * self.c[0]


def _encoder_case():
    torch.manual_seed(5)
    encoder = nn.Linear(2, 3, dtype=F64)
    x = torch.randn(4, 2, dtype=F64)
    return encoder, x, torch.randn(4, 3, dtype=F64)


def test_encoder_output_error_names_the_tensor_to_pass():
    encoder, x, y0 = _encoder_case()
    field = Encoded(encoder(x))
    with pytest.raises(ValueError, match=r"computed outside it \(AddmmBackward0 -> \(4, 3\)\).*pass the tensor \(c\), "
                                         r"not the parameters of the module that computed it"):
        odeint(field, y0, T, method="rampde_rk4", options=dict(STEP, precision="fp64"))
    # what the old message suggested -- the encoder's parameters -- now gets the same clear error
    with pytest.raises(ValueError, match=r"computed outside it"):
        odeint(field, y0, T, method="rampde_rk4",
               options=dict(STEP, precision="fp64", adjoint_params=(*field.parameters(), *encoder.parameters())))


@pytest.mark.parametrize("host", ["torchdiffeq", "torchode"])
def test_encoder_output_as_parameter_flows_into_the_encoder(host):
    encoder, x, y0 = _encoder_case()
    c = encoder(x)
    field = Encoded(c)
    ref = torch.autograd.grad(odeint(field, y0, T, method="rk4", options=STEP)[-1].square().sum(),
                              [*encoder.parameters(), *field.parameters()])
    c = encoder(x)
    field.c = [c]
    if host == "torchdiffeq":
        y = odeint(field, y0, T, method="rampde_rk4",
                   options=dict(STEP, precision="fp64", adjoint_params=(c, *field.parameters())))[-1]
    else:
        t_eval = T.expand(4, 2)
        term = to.ODETerm(field)
        adj = RampdeAdjoint(RampdeStepMethod("rk4", term), to.FixedStepController(),
                            precision="fp64", params=(c, *field.parameters()))
        y = adj.solve(to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval),
                      dt0=torch.full((4,), 0.125, dtype=F64)).ys[:, -1]
    got = torch.autograd.grad(y.square().sum(), [*encoder.parameters(), *field.parameters()])
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-12


class _FunctionalBatchNorm(torch.nn.Module):
    """Running statistics written by F.batch_norm on the module's own buffers: the kernel does not
    bump their version counters (and there is no num_batches_tracked that would)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, t, y):
        h = torch.nn.functional.batch_norm(self.lin(y), self.rm, self.rv, training=True, momentum=0.1)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("checkpoint", ["steps", 3, "graphs"])
def test_buffers_written_without_version_bump_end_as_torchdiffeq_leaves_them(checkpoint):
    def run(method, options):
        torch.manual_seed(0)
        f = _FunctionalBatchNorm().double()
        y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        y = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method,
                   options={"step_size": 0.1, **options})
        y.sum().backward()
        return f.rm.clone(), f.rv.clone(), f.lin.weight.grad.clone()

    ref = run("rk4", {})
    got = run("rampde_rk4", {"checkpoint": checkpoint})
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
