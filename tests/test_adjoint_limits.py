"""What the discrete adjoint honours and what it refuses (issue 9, items 4, 5, 7, 8, 9, 12, 13).

References are not rampde: torchdiffeq's own methods with autograd, torchode's own solver, analytic
values.  Each test reproduces a defect of the previous main (silent zeros, zero instead of None,
NaN gradients, a dtype crash, a callback never called, an interpolation error 20x the step-end
error).
"""

import pytest
import torch
import torchode as to
from torch import nn
from torchdiffeq import odeint

from rampde_plugins import collect_stats
from rampde_torchode import RampdeAdjoint

from .helpers import MLPField, rel
from .host_helpers import needs_torchdiffeq_callbacks

F64 = torch.float64
T = torch.tensor([0.0, 1.0], dtype=F64)
STEP = {"step_size": 0.125}


def _solve(lin, y0, **opts):
    return odeint(lambda t, y: torch.tanh(lin(y)), y0, T, method="rampde_rk4",
                  options=dict(STEP, precision="fp64", adjoint_params=tuple(lin.parameters()), **opts))


# -- item 4: higher-order derivatives ---------------------------------------------------------------
def test_create_graph_raises_instead_of_silent_zeros():
    lin = nn.Linear(2, 2, dtype=F64)
    y = _solve(lin, torch.randn(3, 2, dtype=F64))
    with pytest.raises(RuntimeError, match=r"first-order gradients .* create_graph=True \(a second derivative\) "
                                           r"through a rampde solve is not available.*method='rk4'"):
        torch.autograd.grad(y[-1].square().sum(), lin.weight, create_graph=True)


# torch's own forward-AD/functorch set-up scripts a decomposition with torch.jit.script and warns.
_TORCH_JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

@_TORCH_JIT_WARNING
def test_torch_func_transforms_raise_with_the_alternative():
    y0 = torch.randn(3, 2, dtype=F64)

    def loss(w):
        return odeint(lambda t, y: y @ w, y0, T, method="rampde_rk4",
                      options=dict(STEP, precision="fp64", adjoint_params=(w,)))[-1].square().sum()

    for transform in (torch.func.hessian, torch.func.grad, torch.func.jacrev):
        with pytest.raises(RuntimeError, match=r"a torch.func transform .* is not available.*torch.autograd.grad"):
            transform(loss)(torch.eye(2, dtype=F64))


@_TORCH_JIT_WARNING
def test_forward_mode_ad_raises():
    import torch.autograd.forward_ad as fwAD

    y0 = torch.randn(3, 2, dtype=F64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(y0, torch.ones_like(y0))
        with pytest.raises(RuntimeError, match=r"forward-mode differentiation .* is not available"):
            odeint(lambda t, y: -y, dual, T, method="rampde_rk4", options=dict(STEP, precision="fp64"))


def test_first_order_gradient_still_matches_torchdiffeq():
    lin = nn.Linear(2, 2, dtype=F64)
    y0 = torch.randn(3, 2, dtype=F64)
    ref = torch.autograd.grad(odeint(lambda t, y: torch.tanh(lin(y)), y0, T, method="rk4", options=STEP)[-1].sum(),
                              tuple(lin.parameters()))
    got = torch.autograd.grad(_solve(lin, y0)[-1].sum(), tuple(lin.parameters()))
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-12


# -- item 5: unused parameters get None, like autograd -------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(2, 2, dtype=F64)
        self.unused = nn.Linear(2, 2, dtype=F64)

    def forward(self, t, y):
        return torch.tanh(self.used(y))


@pytest.mark.parametrize("method", ["rampde_rk4", "rampde_dopri5"])
def test_unused_parameters_get_none_as_with_torchdiffeq(method):
    field = WithUnused()
    y0 = torch.randn(3, 2, dtype=F64)
    host = odeint(field, y0, T, method=method.removeprefix("rampde_"), options=STEP if method == "rampde_rk4" else None)
    host.sum().backward()
    expected = {n: p.grad is None for n, p in field.named_parameters()}
    field.zero_grad(set_to_none=True)
    opts = dict(STEP if method == "rampde_rk4" else {}, precision="fp64")
    odeint(field, y0, T, method=method, options=opts).sum().backward()
    got = {n: p.grad is None for n, p in field.named_parameters()}
    assert got == expected == {"used.weight": False, "used.bias": False, "unused.weight": True, "unused.bias": True}


# -- item 7: fp16 storage overflow vs NaN from the forward/loss ------------------------------------------
def test_fp16_storage_overflow_raises_at_the_step():
    a = torch.tensor(3.0, requires_grad=True)
    y0 = torch.full((2, 2), 1000.0)  # y = 1000 e^{3t} passes 65504 at t ~ 1.39
    t = torch.tensor([0.0, 2.0])
    for precision in ("fp16", "fp16_gradscaler"):
        with pytest.raises(FloatingPointError, match=rf"precision policy '{precision}' stores one state per step in "
                                                     r"float16 \(largest value 65504\), and the state at step (1[0-9]) "
                                                     r"of 16 \(t = 1\.[3-5]\d*\) exceeds it.*precision='bf16'"):
            odeint(lambda t, y: a * y, y0, t, method="rampde_rk4",
                   options={"step_size": 0.125, "precision": precision, "adjoint_params": (a,)})


def test_bf16_has_the_range_fp16_lacks():
    a = torch.tensor(3.0, requires_grad=True)
    y = odeint(lambda t, y: a * y, torch.full((2, 2), 1000.0), torch.tensor([0.0, 2.0]), method="rampde_rk4",
               options={"step_size": 0.125, "precision": "bf16", "adjoint_params": (a,)})
    y[-1].sum().backward()
    assert torch.isfinite(a.grad)


def test_nan_from_the_loss_propagates_without_retries():
    a = torch.tensor(-1.0, requires_grad=True)
    with collect_stats() as stats:
        y = odeint(lambda t, y: a * y, torch.ones(2, 2), T.float(), method="rampde_rk4",
                   options={"step_size": 0.125, "precision": "fp16", "adjoint_params": (a,)})
    (y[-1].sum() * torch.tensor(float("nan"))).backward()
    assert torch.isnan(a.grad)
    assert stats.last.scale_backoffs == 0 and stats.last.redone_steps == 0


def test_nan_from_the_forward_propagates_like_fp32():
    a = torch.tensor(-1.0, requires_grad=True)

    def field(t, y):
        return a * y + (torch.nan if float(t) > 0.5 else 0.0)

    grads = {}
    for precision in ("fp32", "fp16"):
        a.grad = None
        with collect_stats() as stats:
            y = odeint(field, torch.ones(2, 2), T.float(), method="rampde_rk4",
                       options={"step_size": 0.125, "precision": precision, "adjoint_params": (a,)})
        y[-1].sum().backward()
        grads[precision] = a.grad
        assert stats.last.redone_steps == 0
    assert torch.isnan(grads["fp32"]) and torch.isnan(grads["fp16"])


# -- item 8: time dtype seen by the field on adaptive steps ------------------------------------------------
class TimeInput(nn.Module):
    """Concatenates t to the state and multiplies with float32 weights (fails on a float64 t)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.seen = set()

    def forward(self, t, y):
        self.seen.add(t.dtype)
        return torch.tanh(self.lin(torch.cat([y, t.expand(y.shape[0], 1)], dim=1)))


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_field_gets_the_time_dtype_torchdiffeq_gives_it(method):
    y0 = torch.randn(4, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    host_f, ours_f = TimeInput(), TimeInput()
    ours_f.load_state_dict(host_f.state_dict())
    host = odeint(host_f, y0, t, method=method, rtol=1e-5, atol=1e-6)
    ours = odeint(ours_f, y0, t, method="rampde_" + method, rtol=1e-5, atol=1e-6, options={"precision": "fp32"})
    ours.sum().backward()  # the backward's recomputation too
    assert host_f.seen == ours_f.seen == {torch.float32}
    assert rel(ours, host) < 1e-5


# -- item 9: torchode dense output under low precision -----------------------------------------------------
def test_torchode_interpolation_is_as_accurate_as_step_ends_in_bf16():
    """Tsit5 with fixed steps of 0.125, outputs at step ends and midpoints, bf16 against fp32.

    torchode forms every output (step ends included) with the method's dense output, a matmul of the
    stages with interpolation weights; under bf16 autocast that matmul rounded the result to bf16:
    4e-2 relative error on the previous main.  In the state dtype only the velocities' bf16 rounding
    (2**-8 = 3.9e-3 per evaluation, measured 5e-3 after 8 steps) remains: bound 1e-2, and outputs
    between steps no worse than twice those at step ends."""
    field = MLPField(dim=3, hidden=16, dtype=torch.float32, batched_time=True)
    y0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    ends = torch.arange(0, 9) * 0.125
    mids = torch.arange(0, 8) * 0.125 + 0.0625
    t_eval = torch.sort(torch.cat([ends, mids])).values.expand(6, -1)
    out = {}
    for precision in ("fp32", "bf16"):
        term = to.ODETerm(field)
        adj = RampdeAdjoint(to.Tsit5(term), to.FixedStepController(), precision=precision)
        sol = adj.solve(to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval), dt0=torch.full((6,), 0.125))
        out[precision] = sol.ys.detach()
    err = (out["bf16"] - out["fp32"]).abs().amax(dim=(0, 2)) / out["fp32"].abs().amax()
    at_ends, between = err[0::2].max(), err[1::2].max()
    assert at_ends < 1e-2 and between < 1e-2, (float(at_ends), float(between))
    assert between <= 2 * at_ends, (float(between), float(at_ends))


# -- item 12: a float64 model under a low-precision policy -------------------------------------------------
def test_float64_model_with_bf16_policy_names_the_fix():
    net = nn.Linear(2, 2, dtype=F64)
    y0 = torch.randn(3, 2, dtype=F64)
    msg = r"precision policy 'bf16' runs the state in float32 with bfloat16 velocities, but the vector field's " \
          r"parameters are float64. Convert the model to float32 \(model.float\(\)\).*precision='fp64'"
    term = to.ODETerm(lambda t, y: net(y))
    adj = RampdeAdjoint(to.Euler(term), to.FixedStepController(), precision="bf16", params=tuple(net.parameters()))
    t_eval = T.expand(3, 2)
    with pytest.raises(ValueError, match=msg):
        adj.solve(to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval), dt0=torch.full((3,), 0.125, dtype=F64))
    with pytest.raises(ValueError, match=msg):
        odeint(lambda t, y: net(y), y0, T, method="rampde_rk4",
               options=dict(STEP, precision="bf16", adjoint_params=tuple(net.parameters())))


# -- item 13: torchdiffeq's adjoint callbacks ---------------------------------------------------------------
class AdjointCallbacks(MLPField):
    def __init__(self):
        super().__init__()
        self.accepted, self.accepted_adj, self.rejected_adj, self.steps_adj = [], [], [], []

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append(float(t0))

    def callback_step_adjoint(self, t0, y0, dt):
        self.steps_adj.append(float(t0))

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self.accepted_adj.append((float(t0), float(dt)))

    def callback_reject_step_adjoint(self, t0, y0, dt):
        self.rejected_adj.append(float(t0))


@needs_torchdiffeq_callbacks
def test_adjoint_callbacks_replay_each_accepted_step_once():
    field = AdjointCallbacks()
    y0 = torch.randn(4, 3, dtype=F64)
    with collect_stats() as stats:
        y = odeint(field, y0, torch.tensor([0.0, 0.7, 1.5], dtype=F64), method="rampde_dopri5",
                   rtol=1e-6, atol=1e-8, options={"precision": "fp64"})
    assert stats.last.rejected_steps > 0 or stats.last.n_steps > 3
    assert field.accepted_adj == []  # nothing before the backward
    y.sum().backward()
    n = stats.last.n_steps
    assert len(field.accepted_adj) == n == len(field.accepted) == len(field.steps_adj)
    assert [t for t, _ in field.accepted_adj] == pytest.approx(field.accepted[::-1], abs=1e-12)
    assert field.rejected_adj == []
