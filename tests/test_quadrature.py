"""The Gauss--Legendre quadrature adjoint behind ``torchdiffeq.odeint_adjoint(method="rampde_*")``.

References that are not rampde: analytic gradients of dz/dt = a z, torchdiffeq's own ``dopri5``
backprop at tight tolerance, and torchdiffeq's continuous adjoint.  Tolerances are stated per test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torchdiffeq import odeint, odeint_adjoint

import rampde_plugins
from rampde_plugins import QuadratureOptions, collect_stats, quadrature_options

from .host_helpers import needs_torchdiffeq_callbacks

F64 = torch.float64


class Exp(torch.nn.Module):
    def __init__(self, a=-0.7):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, t, z):
        return self.a * z


def _exp_grads(method, t_values, **kw):
    f = Exp()
    z0 = torch.tensor([1.3], dtype=F64, requires_grad=True)
    t = torch.tensor(t_values, dtype=F64, requires_grad=True)
    z = odeint_adjoint(f, z0, t, method=method, **kw)
    (z[-1] ** 2).sum().backward()
    return f.a.grad.item(), z0.grad.item(), t.grad.tolist()


@pytest.mark.parametrize("t_values", [[0.0, 2.0], [2.0, 0.0], [0.0, 0.5, 1.2, 2.0]])
def test_exponential_problem_matches_the_analytic_gradient_at_rtol_1e8(t_values):
    # L = z(T)^2, z(T) = z0 exp(a (T - t0)): dL/da = 2 z(T)^2 (T - t0), dL/dz0 = 2 z(T) exp(a (T - t0)),
    # dL/dT = 2 a z(T)^2 = -dL/dt0.  The bound: within 1e-6 at rtol = 1e-8 -- relative to the
    # gradient where it exceeds 1 (decreasing time: z grows 4x, dL/da = -111, error 1.8e-6 = 1.6e-8 rel.).
    ga, gz0, gt = _exp_grads("rampde_dopri5", t_values, rtol=1e-8, atol=1e-10)
    a, z0, span = -0.7, 1.3, t_values[-1] - t_values[0]
    zT = z0 * math.exp(a * span)

    def close(got, want):
        return abs(got - want) < 1e-6 * max(1.0, abs(want))

    assert close(ga, 2 * zT * zT * span)
    assert close(gz0, 2 * zT * math.exp(a * span))
    assert close(gt[-1], 2 * a * zT * zT)
    assert close(gt[0], -2 * a * zT * zT)
    assert all(abs(g) < 1e-6 for g in gt[1:-1])  # intermediate outputs carry no cotangent


def test_fixed_grid_uses_the_forward_grid_reversed_and_is_accurate():
    # rk4 with h = 0.01: the gradient of the ODE to O(h^4) ~ 1e-8 (measured 2e-11).
    with collect_stats() as st:
        ga, gz0, _ = _exp_grads("rampde_rk4", [0.0, 2.0], options={"step_size": 0.01})
    zT = 1.3 * math.exp(-1.4)
    assert abs(ga - 2 * zT * zT * 2.0) < 1e-8
    assert abs(gz0 - 2 * zT * math.exp(-1.4)) < 1e-8
    rec = st.last
    assert rec.adjoint == "quadrature" and rec.backward_done
    assert rec.backward_steps == rec.n_steps == 200  # the forward's 200 steps, reversed
    assert rec.stored_bytes == 0  # nothing but the outputs is kept
    assert rec.quadrature_nodes == min(512, math.ceil(0.25 * rec.forward_nfe))


class MLP(torch.nn.Module):
    def __init__(self, width=16, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(3, width, dtype=dtype)
        self.l2 = torch.nn.Linear(width, 3, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)  # the same network in every dtype

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t)


def _mlp_grads(fn, dtype=F64, **kw):
    f = MLP(dtype=dtype)
    y0 = torch.tensor([[0.5, -0.3, 0.8], [0.1, 0.2, -0.4]], dtype=dtype, requires_grad=True)
    t = torch.linspace(0, 3, 5, dtype=dtype, requires_grad=True)
    ys = fn(f, y0, t, **kw)
    w = torch.linspace(-1, 1, ys.numel(), dtype=dtype).reshape(ys.shape)
    (ys * w).sum().backward()
    return [y0.grad, t.grad, *[p.grad for p in f.parameters()]]


@pytest.fixture(scope="module")
def reference():
    # torchdiffeq's own dopri5, direct backprop, fp64 at rtol 1e-12: the ODE's gradient to ~1e-10.
    return _mlp_grads(odeint, method="dopri5", rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rtol, bound", [(1e-5, 1e-3), (1e-7, 1e-5), (1e-9, 1e-7)])
def test_gradient_error_is_at_the_level_of_the_solver_tolerance(reference, rtol, bound):
    # Default node rule (gtol 0.25, >= 8 nodes): measured errors 1.1e-5, 1.4e-7, 2.1e-9 --
    # the bound is 100x the tolerance.
    ours = _mlp_grads(odeint_adjoint, method="rampde_dopri5", rtol=rtol, atol=rtol * 1e-2)
    err = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert err < bound, err


def test_too_few_nodes_is_visible_in_the_error(reference):
    # 2 nodes per interval (the paper's rule on short solves) cannot integrate a^T df/dtheta: the
    # parameter error is ~1e-3, far above the 1e-9 tolerance -- what the node floor is for.
    ours = _mlp_grads(odeint_adjoint, method="rampde_dopri5", rtol=1e-9, atol=1e-11,
                      adjoint_options={"quadrature_nodes": 2})
    err = max((a - b).abs().max().item() for a, b in zip(ours[2:], reference[2:]))
    assert err > 1e-6


def test_adjoint_method_and_tolerances_are_honoured(reference):
    with collect_stats() as st:
        ours = _mlp_grads(odeint_adjoint, method="rampde_dopri5", rtol=1e-9, atol=1e-11, adjoint_method="rampde_bosh3",
                          adjoint_rtol=1e-8, adjoint_atol=1e-10)
    err = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert err < 2e-4  # bosh3's 3rd-order backward at 1e-8 (measured 6.7e-5)
    loose = _mlp_grads(odeint_adjoint, method="rampde_dopri5", rtol=1e-9, atol=1e-11, adjoint_rtol=1e-3, adjoint_atol=1e-5)
    err_loose = max((a - b).abs().max().item() for a, b in zip(loose, reference))
    assert err_loose > 10 * err  # the backward tolerance is the one that was asked for
    assert st.last.backward_nfe > 0


@pytest.mark.parametrize("policy, bound", [("bf16", 3e-2), ("fp16", 3e-2)])
def test_mixed_precision_gradients_against_fp64(reference, policy, bound):
    # bf16/fp16 velocities (8/11 mantissa bits) in every evaluation and VJP, fp32 state and sums:
    # relative gradient error ~ a few units of the compute dtype's rounding (measured bf16 7e-3,
    # fp16 1e-3, relative to the gradient's max).  fp16 on a small problem (slow on this CPU).
    ours = _mlp_grads(odeint_adjoint, dtype=torch.float32, method="rampde_rk4",
                      options={"step_size": 0.05, "precision": policy})
    scale = max(r.abs().max().item() for r in reference)
    err = max((a.double() - b).abs().max().item() for a, b in zip(ours, reference)) / scale
    assert err < bound, err


def test_fp16_scales_small_adjoints_instead_of_flushing_them():
    # A loss of 1e-6 * y: unscaled fp16 cotangents ~1e-6 lose most bits (subnormal below 6e-5); the
    # per-evaluation power-of-two scale keeps the relative error at fp16's level (bound 3e-2).
    grads = {}
    for prec in ("fp16", "fp32"):
        f = MLP(dtype=torch.float32)
        y0 = torch.tensor([[0.5, -0.3, 0.8]], requires_grad=True)
        ys = odeint_adjoint(f, y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                            options={"step_size": 0.1, "precision": prec})
        (1e-6 * ys[-1]).sum().backward()
        grads[prec] = f.l1.weight.grad
    rel = ((grads["fp16"] - grads["fp32"]).abs().max() / grads["fp32"].abs().max()).item()
    assert rel < 3e-2, rel


def test_tuple_state_and_closure_free_module():
    f = MLP()
    a0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64, requires_grad=True)
    b0 = torch.tensor([1.0], dtype=F64, requires_grad=True)

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = f

        def forward(self, t, state):
            a, b = state
            return self.inner(t, a[None])[0] * b, -b

    pair = Pair()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ours = odeint_adjoint(pair, (a0, b0), t, method="rampde_dopri5", rtol=1e-10, atol=1e-12)
    (ours[0][-1].sum() + ours[1][-1].sum()).backward()
    got = [a0.grad.clone(), b0.grad.clone(), f.l1.weight.grad.clone()]
    for x in (a0, b0, *f.parameters()):
        x.grad = None
    ref = odeint(pair, (a0, b0), t, method="dopri5", rtol=1e-12, atol=1e-14)
    (ref[0][-1].sum() + ref[1][-1].sum()).backward()
    for g, r in zip(got, [a0.grad, b0.grad, f.l1.weight.grad]):
        assert (g - r).abs().max().item() < 1e-7


def test_unused_parameters_get_zeros_like_torchdiffeq():
    f = Exp()
    f.unused = torch.nn.Linear(2, 2, dtype=F64)
    z = odeint_adjoint(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
                       options={"step_size": 0.1})
    z.sum().backward()
    assert torch.equal(f.unused.weight.grad, torch.zeros(2, 2, dtype=F64))


@needs_torchdiffeq_callbacks
def test_adjoint_callbacks_see_each_backward_step():
    f = Exp()
    seen = []
    f.callback_step_adjoint = lambda t0, state, dt: seen.append((float(t0), len(state)))
    z = odeint_adjoint(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
                       options={"step_size": 0.25})
    z.sum().backward()
    assert [s for s, _ in seen] == [1.0, 0.75, 0.5, 0.25] and all(n == 2 for _, n in seen)


@needs_torchdiffeq_callbacks
@pytest.mark.parametrize("method", ["rampde_dopri5", "rampde_bosh3"])
def test_adaptive_backward_starts_from_the_forwards_step(method):
    # Each interval's backward solve starts with the step the forward accepted across that output (not
    # torchdiffeq's initial-step heuristic); adjoint_options["first_step"] overrides it.
    f = MLP()
    accepted, proposals = [], []
    f.callback_accept_step = lambda t0, y, dt: accepted.append((float(t0), float(dt)))
    f.callback_step_adjoint = lambda t0, z, dt: proposals.append((abs(float(t0)), float(dt)))
    t = torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    y0 = torch.tensor([[0.5, -0.3, 0.8]], dtype=F64, requires_grad=True)
    odeint_adjoint(f, y0, t, method=method, rtol=1e-6, atol=1e-8).sum().backward()

    def step_across(time):
        return next(dt for t0, dt in accepted if t0 < time <= t0 + dt)

    def first_from(time):  # the first proposal of the backward solve that starts at the output `time`
        return next(dt for t0, dt in proposals if t0 == time)

    assert first_from(2.0) == pytest.approx(step_across(2.0), rel=1e-12)
    assert first_from(0.7) == pytest.approx(step_across(0.7), rel=1e-12)
    proposals.clear()
    odeint_adjoint(f, y0, t, method=method, rtol=1e-6, atol=1e-8,
                   adjoint_options={"first_step": 0.0123}).sum().backward()
    assert first_from(2.0) == pytest.approx(0.0123, rel=1e-12)


def test_node_batches_give_the_per_node_sum(reference):
    # 'auto' evaluates an interval's nodes through torch.func.vmap in one VJP; node_batch=1 one call per
    # node.  The same sum in fp64 (1e-12: only the order of additions differs), and both within the
    # tolerance bound of the fp64 reference.
    out = {}
    for nb in ("auto", 1, 3):
        with collect_stats() as st:
            out[nb] = _mlp_grads(odeint_adjoint, method="rampde_dopri5", rtol=1e-7, atol=1e-9,
                                 adjoint_options={"node_batch": nb})
        out[nb, "stats"] = st.last
    for nb in (1, 3):
        for a, b in zip(out["auto"], out[nb]):
            assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())
    nodes = out["auto", "stats"].quadrature_nodes
    assert out[1, "stats"].quadrature_calls == nodes == out[1, "stats"].quadrature_nodes
    # 4 intervals of at most 128 nodes (auto: 256 rows / 2 samples): the solve's first node alone (the
    # hidden-tensor check), then one batch per interval
    assert out["auto", "stats"].quadrature_calls == 1 + 4
    assert out[3, "stats"].quadrature_calls < nodes
    err = max((a - b).abs().max().item() for a, b in zip(out["auto"], reference))
    assert err < 1e-5


class _Gated(torch.nn.Module):
    """A field torch.func.vmap cannot map: Python control flow on the value of t."""

    def __init__(self):
        super().__init__()
        self.net = MLP()

    def forward(self, t, y):
        scale = 2.0 if float(t) > 1.5 else 1.0
        return self.net(t, y) * scale


def test_a_field_vmap_cannot_map_is_evaluated_node_by_node():
    grads, calls = {}, {}
    for nb in ("auto", 1):
        f = _Gated()
        y0 = torch.tensor([[0.5, -0.3, 0.8]], dtype=F64, requires_grad=True)
        with collect_stats() as st:
            ys = odeint_adjoint(f, y0, torch.tensor([0.0, 3.0], dtype=F64), method="rampde_dopri5", rtol=1e-7,
                                atol=1e-9, adjoint_options={"node_batch": nb})
            ys.sum().backward()
        grads[nb] = [y0.grad, *[p.grad for p in f.parameters()]]
        calls[nb] = (st.last.quadrature_calls, st.last.quadrature_nodes)
    assert calls["auto"] == calls[1] and calls[1][0] == calls[1][1]
    for a, b in zip(grads["auto"], grads[1]):
        assert torch.equal(a, b)


def test_non_rampde_adjoint_method_is_a_clear_error():
    with pytest.raises(ValueError, match=r"adjoint_method='dopri5'.*quadrature adjoint.*adjoint_method='rampde_rk4'"):
        odeint_adjoint(Exp(), torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       method="rampde_rk4", adjoint_method="dopri5", options={"step_size": 0.1},
                       adjoint_options={"step_size": 0.1})


@pytest.mark.parametrize("bad, match", [
    ({"quadrature_nodes": 0}, r"quadrature_nodes=0 must be an integer in \[1, 1024\]"),
    ({"gtol": -1.0}, r"gtol=-1.0 must be a positive finite number"),
    ({"node_batch": 0}, r"node_batch=0 must be an integer in \[1, 1024\] or 'auto'"),
    ({"min_nodes": 9, "max_nodes": 4}, r"min_nodes=9 exceeds max_nodes=4"),
    ({"nodez": 3}, r"unknown option\(s\) 'nodez'"),
])
def test_bad_quadrature_options_raise_before_anything_runs(bad, match):
    f = Exp()
    before = f.a.detach().clone()
    with pytest.raises(ValueError, match=match):
        odeint_adjoint(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
                       options={"step_size": 0.1}, adjoint_options={"step_size": 0.1, **bad})
    assert torch.equal(f.a.detach(), before) and f.a.grad is None


def test_quadrature_options_object():
    assert quadrature_options(QuadratureOptions(nodes=5), "x").count(1000, 1.0) == 5
    opts = quadrature_options({"gtol": 0.1, "min_nodes": 2, "max_nodes": 64}, "x")
    assert opts.count(10, 1.0) == 2 and opts.count(10_000, 0.5) == 64 and opts.count(300, 0.5) == 15


def test_random_field_is_refused_and_the_rng_is_untouched():
    drop = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)).train()
    f = lambda t, y: drop(y)  # noqa: E731
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"another value at the same \(t, y\).*random numbers.*eval\(\).*torchdiffeq.odeint"):
        odeint_adjoint(f, torch.ones(1, 2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
                       options={"step_size": 0.1}, adjoint_params=tuple(drop.parameters()))
    assert torch.equal(torch.get_rng_state(), state)


def test_batchnorm_in_training_mode_runs_and_counts_as_torchdiffeqs_adjoint_does():
    """BatchNorm in training mode writes its running statistics, which does not change what it returns:
    the quadrature adjoint runs it (its value is a function of the batch's state), with the gradient
    of torchdiffeq's own adjoint, and its statistics keep what the evaluations wrote -- every one but
    the checks that are put back (``SolveStats.field_checks``)."""
    from torchdiffeq import odeint_adjoint as host_adjoint

    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.bn = torch.nn.BatchNorm1d(2)
            self.calls = 0

        def forward(self, t, y):
            self.calls += 1
            return self.bn(torch.tanh(self.lin(y)))

    grads = {}
    for method in ("rk4", "rampde_rk4", "backprop"):
        torch.manual_seed(3)
        f = BN().double().train()
        y0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
        t = torch.tensor([0.0, 1.0], dtype=F64)
        opts = {"step_size": 0.01}
        with collect_stats() as stats:
            if method == "backprop":  # the ODE's gradient (torchdiffeq rk4 backprop, h = 1/1024)
                ys = odeint(f, y0, t, method="rk4", options={"step_size": 1 / 1024})
            else:
                ys = (odeint_adjoint if method.startswith("rampde") else host_adjoint)(
                    f, y0, t, method=method, options=opts, adjoint_options=opts)
            grads[method] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ys[-1].square().sum(),
                                                                                    (y0, *f.parameters()))])
        if method.startswith("rampde"):
            checks = stats.records[0].field_checks
            assert checks >= 2 and int(f.bn.num_batches_tracked) == f.calls - checks
    ref = grads["backprop"]
    # (both adjoints are 1.3e-4 from it on this batch-coupled field; they agree with each other to 3e-6)
    err = {m: float((grads[m] - ref).norm() / ref.norm()) for m in ("rk4", "rampde_rk4")}
    assert err["rampde_rk4"] <= 1.05 * err["rk4"], err
    assert float((grads["rampde_rk4"] - grads["rk4"]).norm() / ref.norm()) < 1e-5


def test_hidden_tensor_is_an_error_not_a_missing_gradient():
    c = torch.tensor(0.3, dtype=F64, requires_grad=True)
    f = Exp()
    g = lambda t, z: f(t, z) * c  # noqa: E731  (c is not among adjoint_params)
    z = odeint_adjoint(g, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
                       options={"step_size": 0.1}, adjoint_params=tuple(f.parameters()))
    with pytest.raises(ValueError, match=r"not among the parameters.*adjoint_params=\(A, b\)"):
        z.sum().backward()


def test_hidden_tensor_without_any_declared_parameter_is_an_error():
    # adjoint_params=() differentiates no parameter, so no quadrature node runs: the backward solve's
    # first evaluation checks the graph instead.
    c = torch.tensor(0.3, dtype=F64, requires_grad=True)
    z = odeint_adjoint(lambda t, z: -c * z, torch.tensor([1.0], dtype=F64, requires_grad=True),
                       torch.tensor([0.0, 1.0], dtype=F64), method="rampde_dopri5", adjoint_params=())
    with pytest.raises(ValueError, match=r"not among the parameters.*adjoint_params=\(A, b\)"):
        z.sum().backward()


@pytest.mark.parametrize("params", [(), None])
def test_perturbed_grid_backward_never_evaluates_at_the_grid_points(params):
    # torchdiffeq's perturb: f is never called exactly at a grid point (a discontinuity there), in the
    # backward either -- the check of an undeclared tensor included (torchdiffeq's test_odeint_perturb).
    seen = []

    class Recorded(Exp):
        def forward(self, t, z):
            seen.append(float(t))
            return super().forward(t, z)

    g = Recorded()
    if params == ():  # nothing to differentiate but y0
        g.a.requires_grad_(False)
    kw = {} if params is None else {"adjoint_params": params}
    z = odeint_adjoint(g, torch.tensor([1.0], dtype=F64, requires_grad=True), torch.tensor([0.0, 1.0], dtype=F64),
                       method="rampde_rk4", options={"step_size": 0.5, "perturb": True}, **kw)
    seen.clear()
    z.sum().backward()
    assert seen and not {0.0, 0.5, 1.0} & set(seen)


def test_second_derivatives_are_refused():
    f = Exp()
    z = odeint_adjoint(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
                       options={"step_size": 0.1})
    with pytest.raises(RuntimeError, match="first-order gradients"):
        torch.autograd.grad(z.sum(), f.a, create_graph=True)


def test_implicit_method_backward_solve():
    # sdirk2 on a stiff linear problem: the backward Newton differentiates the augmented field
    # (a double backward of f).  Reference: analytic, dz/dt = a z, a = -20; h = 0.01, order 2.
    f = Exp(-20.0)
    z0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    z = odeint_adjoint(f, z0, torch.tensor([0.0, 0.5], dtype=F64), method="rampde_sdirk2", options={"step_size": 0.01})
    (z[-1] ** 2).sum().backward()
    zT = math.exp(-10.0)
    assert abs(z0.grad.item() - 2 * zT * zT) / (2 * zT * zT) < 5e-2
    assert abs(f.a.grad.item() - 2 * zT * zT * 0.5) / (zT * zT) < 5e-2


def test_odeint_keeps_the_discrete_adjoint_and_other_methods_go_to_torchdiffeq():
    f = Exp()
    with collect_stats() as st:
        odeint(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
               options={"step_size": 0.1}).sum().backward()
    assert st.last.adjoint == "discrete"
    y = odeint_adjoint(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                       options={"step_size": 0.1})
    assert type(y.grad_fn).__name__ == "OdeintAdjointMethodBackward"


def test_uninstall_restores_torchdiffeqs_function():
    import torchdiffeq._impl.adjoint as adj

    ours = adj.OdeintAdjointMethod
    rampde_plugins.uninstall("torchdiffeq")
    try:
        assert adj.OdeintAdjointMethod is ours.original
    finally:
        rampde_plugins.install("torchdiffeq")
    assert isinstance(adj.OdeintAdjointMethod, type(ours))
    assert torchdiffeq.odeint_adjoint is adj.odeint_adjoint  # the entry point itself is never replaced


def test_saved_tensor_hooks_do_not_hide_the_parameters():
    # save_on_cpu (any saved-tensor hook) unpacks copies of saved tensors: the parameters must not go
    # through save_for_backward, or every one of them looked like a hidden tensor (a spurious error).
    f = MLP(dtype=torch.float32)
    with torch.autograd.graph.save_on_cpu():
        y = odeint_adjoint(f, torch.ones(2, 3), torch.tensor([0.0, 1.0]), method="rampde_rk4", options={"step_size": 0.1})
        y.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in f.parameters())
