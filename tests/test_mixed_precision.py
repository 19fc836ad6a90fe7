"""Mixed precision: gradient accuracy against fp64 references, adjoint scaling, storage and memory."""

import contextlib
import math

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import AdjointScaler, PrecisionPolicy, collect_stats
from rampde_plugins._stats import SavedTensorMeter

from .helpers import linear_problem, rel

N_STEPS = 4096
T_END = 1.0


def _linear_grads(method, dtype, precision=None, autocast=None):
    """dL/dA and dL/dy0 of L = |y(T)|^2 for y' = y A (A a leaf used directly, like nn.Linear's weight)."""
    a64, y064 = linear_problem()
    a = a64.to(dtype).requires_grad_()
    y0 = y064.to(dtype).requires_grad_()
    opts = {"step_size": T_END / N_STEPS}
    if method.startswith("rampde_"):
        opts["adjoint_params"] = (a,)
        if precision is not None:
            opts["precision"] = precision
    t = torch.tensor([0.0, T_END], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx, collect_stats() as stats:
        y_t = odeint(lambda t, y: y @ a, y0, t, method=method, options=opts)[-1]
    loss = (y_t.double() ** 2).sum()
    ga, gy = torch.autograd.grad(loss, [a, y0])
    return ga, gy, (stats.last if len(stats) else None)


@pytest.fixture(scope="module")
def fp64_reference():
    ga, gy, _ = _linear_grads("rampde_rk4", torch.float64, "fp64")
    # The reference itself agrees with torchdiffeq's rk4 in fp64 (same discrete problem).
    ga_host, gy_host, _ = _linear_grads("rk4", torch.float64)
    assert rel(ga, ga_host) < 1e-10 and rel(gy, gy_host) < 1e-10
    return ga, gy


# The bounds of the linear problem (fp16 <= 1e-3, bf16 <= 5e-3 at 4096 steps), for every host,
# method and schedule, are in tests/test_linear_precision.py.  Here: what autocast alone gets.
def test_autocast_selects_the_policy_and_bf16_beats_naive_autocast(fp64_reference, capsys):
    ga_ref, _ = fp64_reference
    ga, _, stats = _linear_grads("rampde_rk4", torch.float32, precision=None, autocast=torch.bfloat16)
    assert stats.policy == "bf16"
    ga_host, _, _ = _linear_grads("rk4", torch.float32, autocast=torch.bfloat16)
    with capsys.disabled():
        print(f"\n[bf16 autocast, {N_STEPS} RK4 steps] rel. error dL/dA -- rampde_rk4: {rel(ga, ga_ref):.2e} | "
              f"torchdiffeq rk4 under autocast: {rel(ga_host, ga_ref):.2e}")
    # Naive autocast sums 16384 fp16/bf16 VJP contributions to A in low precision.
    assert rel(ga, ga_ref) <= 5e-3 < 0.1 < rel(ga_host, ga_ref)


class PolynomialDecay(torch.nn.Module):
    """y' = -(a t^2 + b t + c) y, computed in the autocast dtype when autocast is on.

    With y0 = 65504/180, a=8, b=-10, c=2^-16 on [0, 2.65] the state first grows ~13x (to ~4900) and
    then decays by e^-17, so the terminal cotangent dL/dy(T) = y(T) ~ 2e-4 and the adjoint, which
    shrinks by another e^-17 going backward, underflow fp16 products unless the adjoint is scaled.
    """

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(8.0))
        self.b = torch.nn.Parameter(torch.tensor(-10.0))
        self.c = torch.nn.Parameter(torch.tensor(2.0**-16))

    def forward(self, t, y):
        a, b, c = self.a, self.b, self.c
        if torch.is_autocast_enabled("cpu"):
            dt = torch.get_autocast_dtype("cpu")
            t, y, a, b, c = t.to(dt), y.to(dt), a.to(dt), b.to(dt), c.to(dt)
        return -(a * t * t + b * t + c) * y


STRESS_T = 2.65
STRESS_Y0 = 65504.0 / 180


def _stress_analytic():
    y0 = torch.tensor([STRESS_Y0], dtype=torch.float64, requires_grad=True)
    a, b, c = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (8.0, -10.0, 2.0**-16))
    T = STRESS_T
    y_t = y0 * torch.exp(-a * T**3 / 3 - b * T**2 / 2 - c * T)
    return torch.autograd.grad(0.5 * (y_t**2).sum(), [y0, a, b, c])


def _stress_grads(precision, scaler=None):
    model = PolynomialDecay()
    y0 = torch.tensor([STRESS_Y0], requires_grad=True)
    t = torch.linspace(0, STRESS_T, 400)
    opts = {"precision": precision}
    if scaler is not None:
        opts["scaler"] = scaler
    with collect_stats() as stats:
        y_t = odeint(model, y0, t, method="rampde_rk4", options=opts)[-1]
        grads = torch.autograd.grad(0.5 * (y_t**2).sum(), [y0, model.a, model.b, model.c])
    return grads, stats.last


def _rel_each(grads, ref):
    return [abs(g.double().item() - r.item()) / abs(r.item()) for g, r in zip(grads, ref)]


def test_fp16_range_stress_dynamic_scaling_vs_analytic():
    ref = _stress_analytic()
    grads, stats = _stress_grads("fp16")
    # 1e-2: the bound of the rampde paper's test for this problem; fp32 itself is at 1.3e-4 (RK4 with
    # 399 steps) and fp16 velocities add ~u(fp16) per evaluation. Measured: ~1.7e-3.
    errs = _rel_each(grads, ref)
    assert max(errs) <= 1e-2, errs
    assert stats.initial_scale > 1 and stats.final_scale > stats.initial_scale  # scaled up, kept growing
    # The same fp16 solve without adjoint scaling loses the gradient (underflow to ~0).
    noscale = PrecisionPolicy("fp16_noscale", torch.float16, torch.float32, storage_dtype=torch.float16)
    bad, _ = _stress_grads(noscale)
    assert max(_rel_each(bad, ref)) > 0.5


def test_overflow_backs_off_and_redoes_the_step():
    ref = _stress_analytic()
    # A start scale is never above the ideal 2**round(log2(target / amax)) (an init_scale of 2**40
    # is clamped to it), so force the overflow with a target far beyond fp16's max: the scaled
    # terminal cotangent, ~2**24, overflows the first VJPs.
    scaler = AdjointScaler(target=2.0**24)
    finishes = []
    finish = scaler._finish
    scaler._finish = lambda *args: (finishes.append(args), finish(*args))[1]
    grads, stats = _stress_grads("fp16", scaler=scaler)
    assert stats.scale_backoffs > 0 and stats.redone_steps > 0
    assert max(_rel_each(grads, ref)) <= 1e-2
    # The scaler carries to the next iteration the scale that ran the terminal step cleanly.
    first_step_scale, _, first_step_backoffs = finishes[-1]
    assert first_step_backoffs > 0
    assert scaler.get_scale() == first_step_scale == stats.initial_scale * scaler.backoff_factor ** first_step_backoffs
    state = scaler.state_dict()
    other = AdjointScaler()
    other.load_state_dict(state)
    assert other.get_scale() == scaler.get_scale() and other.growth_interval == scaler.growth_interval
    assert other.state_dict() == state
    scaler_start = scaler.get_scale()
    grads2, stats2 = _stress_grads("fp16", scaler=scaler)
    assert max(_rel_each(grads2, ref)) <= 1e-2
    assert stats2.initial_scale == scaler_start and stats2.scale_backoffs < stats.scale_backoffs
    # Its first step ran cleanly at the carried scale, so the scaler probes one growth_factor higher.
    assert finishes[-1][2] == 0 and scaler.get_scale() == scaler_start * scaler.growth_factor


def test_inf_signal_policy_feeds_torch_gradscaler():
    """fp16_gradscaler: no own scaling; an overflow surfaces as inf grads and GradScaler skips the step."""
    model = PolynomialDecay()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    # A loss scale of 2^40 makes h * b_i * dL/dy(T) ~ 1e5 > 65504 in the first fp16 VJP.
    gscaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = [p.detach().clone() for p in model.parameters()]
    y0 = torch.tensor([STRESS_Y0])
    y_t = odeint(model, y0, torch.linspace(0, STRESS_T, 400), method="rampde_rk4", options={"precision": "fp16_gradscaler"})[-1]
    gscaler.scale(0.5 * (y_t**2).sum()).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    gscaler.step(opt)
    gscaler.update()
    assert gscaler.get_scale() < 2.0**40
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_stored_state_bytes_low_precision_about_half_of_fp32():
    a64, y064 = linear_problem()
    a, y0 = a64.float().requires_grad_(), y064.float()
    sizes = {}
    for policy in ["fp32", "bf16", "fp16"]:
        with collect_stats() as stats:
            odeint(lambda t, y: y @ a, y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                   options={"step_size": 1 / 64, "precision": policy, "adjoint_params": (a,)})
        sizes[policy] = stats.last.stored_bytes
    assert sizes["fp32"] == 64 * y0.numel() * 4  # one state per step, nothing else
    assert sizes["fp16"] <= 0.55 * sizes["fp32"] and sizes["bf16"] <= 0.55 * sizes["fp32"]


def _saved_peaks(policy, group, width=256, batch=8, dim=4):
    """{N: (saved bytes the forward leaves, peak saved bytes in the backward)} for N = 16, 64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))
    y0 = torch.randn(batch, dim)
    results = {}
    for n in (16, 64):
        with SavedTensorMeter() as counter:
            y = odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                       options={"step_size": 1 / n, "precision": policy, "adjoint_params": tuple(net.parameters()),
                                "checkpoint": rampde_plugins.StepsSchedule(group=group)})
        forward_saved = counter.live  # what the forward leaves for the backward
        # the backward's graphs: unique memory, the parameters (which every step saves) excluded
        with SavedTensorMeter(unique=True, exclude=list(net.parameters())) as counter2:
            y[-1].square().sum().backward()
        results[n] = (forward_saved, counter2.peak)
    return results, sum(p.numel() * p.element_size() for p in net.parameters())


@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_no_graph_survives_between_steps(policy):
    """Forward saves only the stored states; backward holds one step's graph at a time (one step per
    VJP), or one group's when "steps" groups small steps (the default): a bounded number of steps."""
    width, batch, dim = 256, 8, 4
    results, param_bytes = _saved_peaks(policy, 1, width, batch, dim)
    storage = torch.tensor([], dtype=rampde_plugins.get_registry().policy(policy).storage).element_size()
    for n, (fwd, _) in results.items():
        # stored states + the saved inputs (grid, times, parameters); no hidden activations
        # (each step's activations alone would be 4 stages x batch x width x 4 bytes = 32 KiB).
        assert fwd <= n * batch * dim * storage + param_bytes + 4096
    # The backward's peak of live saved tensors is one step's graph, independent of N.
    one = results[16][1]
    assert results[64][1] == one
    assert one < 4 * 4 * batch * width * 4
    # Grouped (the default): the forward is the same; the backward holds one group of at most 16
    # steps' graphs and at most 1 MiB of them, independent of N once N exceeds the group.
    grouped, _ = _saved_peaks(policy, None, width, batch, dim)
    assert grouped[64][0] == results[64][0]
    assert 2 * one < grouped[64][1] <= min(16 * one, 2**20) + 4096


def test_parameters_untouched_when_backward_raises():
    class Explode(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * math.inf  # a VJP that overflows whatever the scale

    net = torch.nn.Linear(3, 3)
    before = {k: (v.detach().clone(), v.dtype) for k, v in net.state_dict().items()}
    y0 = torch.randn(2, 3)
    y = odeint(lambda t, y: Explode.apply(net(y)), y0, torch.linspace(0, 1, 9), method="rampde_rk4",
               options={"precision": "fp16", "adjoint_params": tuple(net.parameters()), "scaler": AdjointScaler(max_retries=3)})
    with pytest.raises(FloatingPointError, match="fp16 adjoint overflow at step .* use precision='bf16'"):
        y.sum().backward()
    for k, v in net.state_dict().items():
        assert v.dtype == before[k][1] and torch.equal(v, before[k][0])
    assert all(p.grad is None for p in net.parameters())


