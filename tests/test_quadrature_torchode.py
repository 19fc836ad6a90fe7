"""The Gauss--Legendre quadrature adjoint with torchode's interface: ``QuadratureAdjoint`` (where
torchode's ``BacksolveAdjoint`` is used) and ``solve_ivp(..., adjoint="quadrature")``.

References that are not rampde: torchode's own ``AutoDiffAdjoint`` backprop (fp64, tight tolerance),
torchode's ``BacksolveAdjoint`` and analytic gradients of dz/dt = a z.  Tolerances are stated per test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchode as to

from rampde_plugins import AdjointScaler, collect_stats
from rampde_plugins._stats import SavedTensorMeter
from rampde_torchode import QuadratureAdjoint

F64 = torch.float64


class Field(torch.nn.Module):
    """A time-dependent MLP field (t of shape (batch,), as torchode passes it)."""

    def __init__(self, dtype=F64, width=16, features=3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.l1 = torch.nn.Linear(features, width)
        self.l2 = torch.nn.Linear(width, features)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / max(p.shape[-1], 1) ** 0.5)
        self.to(dtype)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.3 * torch.sin(t))[:, None]


def _per_sample_problem(dtype=F64):
    """Four samples: different starts, lengths and numbers of outputs' spacing; sample 2 runs backward."""
    g = torch.Generator().manual_seed(5)
    y0 = torch.randn(4, 3, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    t_start = torch.tensor([0.0, 0.1, -0.2, 0.5], dtype=F64)
    t_eval = torch.stack([t_start + 0.3, t_start + 0.7, t_start + 1.0 + 0.5 * torch.arange(4)], 1)
    t_eval[2] = torch.tensor([-0.5, -0.9, -1.4])
    return y0, t_start.requires_grad_(True), t_eval.requires_grad_(True)


def _loss(ys):
    w = torch.arange(1, ys.shape[-1] + 1, dtype=ys.dtype)
    return (ys ** 2).sum() + (ys[:, 1] * w).sum()


def _grads(adjoint, f, y0, t_start, t_eval, **solve_kw):
    problem = to.InitialValueProblem(y0, t_start, t_eval[:, -1].detach(), t_eval)
    sol = adjoint.solve(problem, **solve_kw)
    inputs = [y0, t_start, t_eval, *f.parameters()]
    return sol, torch.autograd.grad(_loss(sol.ys), inputs)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    """torchode's own AutoDiffAdjoint (backprop through Dopri5) in fp64 at rtol = atol = 1e-11."""
    f = Field()
    term = to.ODETerm(f)
    y0, ts, te = _per_sample_problem()
    ctrl = to.IntegralController(atol=1e-11, rtol=1e-11, term=term)
    sol, grads = _grads(to.AutoDiffAdjoint(to.Dopri5(term=term), ctrl), f, y0, ts, te)
    return sol.ys.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("rtol, bound", [(1e-6, 1e-4), (1e-9, 1e-7)])
def test_per_sample_spans_match_torchodes_backprop(reference, rtol, bound):
    # Different starts, lengths, one sample backward in time: y0, t_start, t_eval and parameter
    # gradients each within `bound` relative of torchode's fp64 backprop (measured: 1e-5 and 2e-8 at
    # most, t_start's; bound = 100x the tolerance: the backward solve's own error, the quadrature being
    # converged).
    ys_ref, g_ref = reference
    f = Field()
    term = to.ODETerm(f)
    y0, ts, te = _per_sample_problem()
    adj = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(atol=rtol, rtol=rtol, term=term))
    sol, grads = _grads(adj, f, y0, ts, te)
    assert float((sol.ys.detach() - ys_ref).abs().max()) < 100 * rtol
    for name, got, want in zip(["y0", "t_start", "t_eval", "W1", "b1", "W2", "b2"], grads, g_ref):
        assert _rel(got, want) < bound, name
    stats = sol.stats["rampde"]
    assert stats.adjoint == "quadrature" and stats.backward_done
    assert stats.quadrature_nodes > 0 and stats.backward_steps > 0 and stats.backward_nfe > stats.quadrature_nodes
    assert torch.equal(sol.status, torch.zeros(4, dtype=torch.long))


def test_adaptive_backward_starts_from_the_forwards_steps(reference):
    # Under the forward's controller the backward starts each interval (per sample, backward spans
    # included) with the forward's step across that output; an explicitly given backward controller
    # keeps torchode's initial-step selection.  Both within the bound above; the seeded one cheaper.
    ys_ref, g_ref = reference
    f = Field()
    term = to.ODETerm(f)
    y0, ts, te = _per_sample_problem()
    nfe = {}
    for seeded in (True, False):
        ctrl = to.IntegralController(atol=1e-6, rtol=1e-6, term=term)
        back = None if seeded else to.IntegralController(atol=1e-6, rtol=1e-6, term=term)
        adj = QuadratureAdjoint(term, to.Dopri5(term=term), ctrl, backward_controller=back)
        sol, grads = _grads(adj, f, y0.detach().clone().requires_grad_(True), ts.detach().clone().requires_grad_(True),
                            te.detach().clone().requires_grad_(True))
        for got, want in zip(grads, g_ref):
            assert _rel(got, want) < 1e-4
        nfe[seeded] = sol.stats["rampde"].backward_nfe
    assert nfe[True] < nfe[False] - 2 * 3, nfe  # at least the heuristic's two evaluations per interval


# torchode < 0.2 builds its BacksolveAdjoint on functorch.make_functional_with_buffers, which torch
# deprecates with a FutureWarning (the oldest compat cell, torchode 0.1.9): the reference's own warning,
# not ours, so it is ignored here rather than turned into an error by the suite's filterwarnings.
@pytest.mark.filterwarnings("ignore:We've integrated functorch into PyTorch:FutureWarning")
def test_agrees_with_torchodes_backsolve_adjoint():
    # torchode's continuous adjoint (BacksolveAdjoint: vmap'ed VJPs, the parameter adjoint carried in
    # the state) on a time-independent field with a shared span (what it supports): the same continuous
    # gradient, within 1e-6 relative at rtol 1e-9 (each is its backward solve's error from the truth).
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(F64)
    term = to.ODETerm(_Wrap(net))
    y0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t_eval = torch.linspace(0, 1.5, 4, dtype=F64).expand(5, -1)
    out = []
    for cls in (to.BacksolveAdjoint, QuadratureAdjoint):
        adj = cls(term, to.Dopri5(term=term), to.IntegralController(atol=1e-9, rtol=1e-9, term=term))
        y = y0.clone().requires_grad_(True)
        sol = adj.solve(to.InitialValueProblem(y, t_eval[:, 0], t_eval[:, -1], t_eval))
        out.append(torch.autograd.grad(_loss(sol.ys), [y, *net.parameters()]))
    for got, want in zip(out[1], out[0]):
        assert _rel(got, want) < 1e-6


class _Wrap(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


class Exp(torch.nn.Module):
    def __init__(self, a=-0.7):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, t, y):
        return self.a * y


@pytest.mark.parametrize("span", [2.0, -2.0])
def test_exponential_problem_matches_the_analytic_gradient_at_rtol_1e8(span):
    # L = z(T)^2, z(T) = z0 exp(a (T - t0)): dL/da = 2 z(T)^2 (T - t0), dL/dz0 = 2 z(T) exp(a (T - t0)),
    # dL/dT = 2 a z(T)^2 = -dL/dt0.  Within 1e-6 (relative where the gradient exceeds 1) at rtol 1e-8.
    f = Exp()
    a, z0v = -0.7, 1.3
    z0 = torch.tensor([[z0v]], dtype=F64, requires_grad=True)
    t0 = torch.tensor([0.0], dtype=F64, requires_grad=True)
    t1 = torch.tensor([span], dtype=F64, requires_grad=True)
    term = to.ODETerm(f)
    adj = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(atol=1e-10, rtol=1e-8, term=term))
    sol = adj.solve(to.InitialValueProblem(z0, t0, t1, None))  # t_eval None: the output at t_end
    (sol.ys[:, -1] ** 2).sum().backward()
    zT = z0v * math.exp(a * span)

    def close(got, want):
        return abs(float(got) - want) < 1e-6 * max(1.0, abs(want))

    assert close(f.a.grad, 2 * zT * zT * span)
    assert close(z0.grad, 2 * zT * math.exp(a * span))
    assert close(t1.grad, 2 * a * zT * zT)
    assert close(t0.grad, -2 * a * zT * zT)


def test_fixed_steps_converge_at_the_methods_order():
    # rk4 with fixed steps dt0, backward with -dt0 (torchode's BacksolveAdjoint convention): the
    # gradient is the continuous one up to O(h^4) -- halving h cuts the error ~16x (asserted > 10x).
    f = Exp()
    errors = []
    for h in (0.2, 0.1):
        f.a.grad = None
        z0 = torch.tensor([[1.3]], dtype=F64, requires_grad=True)
        sol = to.solve_ivp(f, z0, torch.tensor([0.0, 2.0], dtype=F64), method="rampde_rk4", dt0=h,
                           adjoint="quadrature")
        (sol.ys[:, -1] ** 2).sum().backward()
        zT = 1.3 * math.exp(-1.4)
        errors.append(abs(f.a.grad.item() - 2 * zT * zT * 2.0))
        assert sol.stats["rampde"].adjoint == "quadrature"
    assert errors[0] / errors[1] > 10, errors


@pytest.mark.parametrize("policy, bound", [("bf16", 2e-2), ("fp16", 5e-3)])
def test_mixed_precision_gradients_against_fp64(reference, policy, bound):
    # VJPs in bf16/fp16 (unit roundoff 3.9e-3/4.9e-4 per evaluation), [x, a] and the quadrature sums in
    # fp32, at rtol 1e-4 (bf16 velocities need >= 8e-5).  Measured relative errors against fp64 of the
    # parameter, y0, t_start and t_eval gradients: bf16 2e-3, 1e-3, 4e-3, 6e-3; fp16 4e-4, 3e-4, 3e-4,
    # 8e-4.  Bounds: ~4x / ~6x the largest, i.e. a few unit roundoffs of the compute dtype.
    _, g_ref = reference
    f = Field(torch.float32)
    term = to.ODETerm(f)
    y0, ts, te = _per_sample_problem(torch.float32)
    adj = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(atol=1e-4, rtol=1e-4, term=term),
                            precision=policy, scaler=AdjointScaler() if policy == "fp16" else None)
    sol, grads = _grads(adj, f, y0, ts.float().detach().requires_grad_(True), te.float().detach().requires_grad_(True))
    assert sol.stats["rampde"].policy == policy
    params = torch.cat([g.reshape(-1).double() for g in grads[3:]])
    want = torch.cat([g.reshape(-1) for g in g_ref[3:]])
    assert _rel(params, want) < bound
    for got, ref in zip(grads[:3], g_ref[:3]):
        assert _rel(got.double(), ref) < bound


def test_solve_ivp_switch_and_node_options():
    f = Field()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t_eval = torch.linspace(0, 1, 5, dtype=F64)
    ctrl = to.IntegralController(atol=1e-8, rtol=1e-8)
    results = {}
    for adjoint, opts in (("discrete", None), ("quadrature", {"quadrature_nodes": 6})):
        kw = {"adjoint_options": opts} if opts else {}
        sol = to.solve_ivp(f, y0, t_eval, method="rampde_dopri5", controller=ctrl, adjoint=adjoint, **kw)
        results[adjoint] = torch.autograd.grad(_loss(sol.ys), [y0, *f.parameters()])
        stats = sol.stats["rampde"]
        assert stats.adjoint == adjoint
        if adjoint == "quadrature":
            assert stats.quadrature_nodes == 6 * 4  # 4 output intervals (the first, t_start..t_eval[0], is empty)
    for q, d in zip(results["quadrature"], results["discrete"]):
        assert _rel(q, d) < 1e-5  # the exact discrete gradient vs the continuous one at rtol 1e-8


@pytest.mark.parametrize("kw, exc, match", [
    ({"adjoint": "backsolve"}, ValueError, r"adjoint='backsolve'.*'discrete', 'quadrature'"),
    ({"adjoint": "quadrature", "checkpoint": 4}, ValueError, r"checkpoint.*stores only the outputs"),
    ({"adjoint_options": {"gtol": 0.5}}, ValueError, r"adjoint_options apply to adjoint='quadrature'"),
    ({"adjoint": "quadrature", "adjoint_options": {"nodes": 5}}, ValueError, r"unknown quadrature option.*nodes"),
    ({"adjoint": "quadrature", "adjoint_options": {"min_nodes": 9, "max_nodes": 4}}, ValueError, r"min_nodes=9"),
    ({"adjoint": "quadrature", "adjoint_options": [("gtol", 1)]}, TypeError, r"adjoint_options.*dict"),
])
def test_bad_solve_ivp_options_raise_before_anything_runs(kw, exc, match):
    f = Field()
    calls = []
    before = [p.detach().clone() for p in f.parameters()]

    def field(t, y):
        calls.append(1)
        return f(t, y)

    with pytest.raises(exc, match=match):
        to.solve_ivp(field, torch.randn(2, 3, dtype=F64), torch.linspace(0, 1, 3, dtype=F64),
                     method="rampde_dopri5", **kw)
    assert not calls and all(torch.equal(a, b) for a, b in zip(before, f.parameters()))


def test_adjoint_keyword_is_for_rampde_methods_only():
    with pytest.raises(TypeError, match="rampde_\\* methods only"):
        to.solve_ivp(lambda t, y: -y, torch.ones(1, 2), torch.linspace(0, 1, 3), method="dopri5", adjoint="quadrature")


def test_bad_constructor_arguments():
    term = to.ODETerm(Field())
    with pytest.raises(TypeError, match="ODETerm or None"):
        QuadratureAdjoint(lambda t, y: y, to.Dopri5(term=term), to.IntegralController(1e-6, 1e-6))
    with pytest.raises(ValueError, match="gtol=-1"):
        QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(1e-6, 1e-6), gtol=-1)
    with pytest.raises(ValueError, match="backward controller must be fixed-step"):
        QuadratureAdjoint(term, to.Dopri5(term=term), to.FixedStepController(),
                          backward_controller=to.IntegralController(1e-6, 1e-6))
    with pytest.raises(ValueError, match="no ODE term"):
        QuadratureAdjoint(None, to.Dopri5(term=term), to.IntegralController(1e-6, 1e-6)).solve(
            to.InitialValueProblem(torch.ones(1, 3, dtype=F64), torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)))


def test_backward_controller_is_used():
    f = Field()
    term = to.ODETerm(f)
    y0, ts, te = _per_sample_problem()
    steps = {}
    for name, back in (("loose", to.IntegralController(atol=1e-4, rtol=1e-4)),
                       ("tight", to.IntegralController(atol=1e-10, rtol=1e-10))):
        adj = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(atol=1e-6, rtol=1e-6),
                                backward_controller=back)
        sol, _ = _grads(adj, f, y0, ts, te)
        steps[name] = sol.stats["rampde"].backward_steps
    assert steps["tight"] > 2 * steps["loose"], steps


def test_dropout_field_is_refused_and_the_rng_is_untouched():
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)).to(F64)
    term = to.ODETerm(_Wrap(net))
    adj = QuadratureAdjoint(term, to.Euler(term=term), to.FixedStepController())
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"another value at the same \(t, y\).*random numbers.*RampdeAdjoint"):
        adj.solve(to.InitialValueProblem(torch.ones(2, 3, dtype=F64), torch.zeros(2, dtype=F64),
                                         torch.ones(2, dtype=F64)), dt0=0.1)
    assert torch.equal(torch.get_rng_state(), rng)


def test_hidden_tensor_is_an_error_not_a_missing_gradient():
    A = torch.randn(3, 3, dtype=F64, requires_grad=True)
    term = to.ODETerm(lambda t, y: y @ A)
    adj = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(1e-6, 1e-6))
    y0 = torch.ones(2, 3, dtype=F64, requires_grad=True)
    sol = adj.solve(to.InitialValueProblem(y0, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)))
    with pytest.raises(ValueError, match=r"params=\(A, b\)"):
        sol.ys.sum().backward()
    # declared: the gradient of A arrives
    adj = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(1e-8, 1e-8), params=(A,))
    sol = adj.solve(to.InitialValueProblem(y0, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)))
    sol.ys.sum().backward()
    assert A.grad is not None and float(A.grad.abs().sum()) > 0


def test_memory_is_flat_in_the_number_of_steps():
    # Bytes autograd keeps saved over forward + backward (unique storages, parameters excluded): the
    # quadrature adjoint keeps the outputs only (and one batch of nodes' graph: 'auto' takes 64 nodes
    # of this batch of 4 per vmap'ed VJP, reached from 100 steps on), the discrete adjoint one state per step.
    f = Field(width=8)
    peaks = {}
    for n in (100, 1000):
        for adjoint in ("quadrature", "discrete"):
            y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
            with SavedTensorMeter(unique=True, exclude=tuple(f.parameters())) as meter:
                sol = to.solve_ivp(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4", dt0=1.0 / n,
                                   adjoint=adjoint)
                _loss(sol.ys).backward()
            peaks[adjoint, n] = meter.peak
    assert peaks["quadrature", 1000] == peaks["quadrature", 100]
    # the discrete adjoint's 900 more stored states (4 x 3 float64 each)
    assert peaks["discrete", 1000] - peaks["discrete", 100] >= 900 * 4 * 3 * 8


def test_implicit_method_backward_solve():
    # A stiff linear field with kvaerno3 (Newton on [x, a] differentiates the augmented field):
    # y' = -50 (y - cos t) per feature, gradients against torchode's fp64 Dopri5 backprop at 1e-10:
    # within 2e-2 relative at rtol 1e-6 (measured: dL/dk 7e-3, dL/dy0 6e-11; dL/dk falls to 4.5e-5 at
    # rtol 1e-8 and 4e-7 at 1e-10 -- the backward solve's error; 1e-6 keeps the test to ~1 s).
    class Stiff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(50.0, dtype=F64))

        def forward(self, t, y):
            return -self.k * (y - torch.cos(t)[:, None])

    out = []
    for kind in ("reference", "quadrature"):
        f = Stiff()
        y0 = torch.tensor([[1.5, -0.5]], dtype=F64, requires_grad=True)
        t_eval = torch.linspace(0, 1, 3, dtype=F64)
        if kind == "reference":
            sol = to.solve_ivp(f, y0, t_eval, method="dopri5", controller=to.IntegralController(1e-10, 1e-10))
        else:
            sol = to.solve_ivp(f, y0, t_eval, method="rampde_kvaerno3", adjoint="quadrature",
                               controller=to.IntegralController(1e-6, 1e-6))
        out.append(torch.autograd.grad(_loss(sol.ys), [y0, f.k]))
    for got, want in zip(out[1], out[0]):
        assert _rel(got, want) < 2e-2


def test_discrete_adjoint_is_still_the_default():
    f = Field()
    with collect_stats() as stats:
        to.solve_ivp(f, torch.randn(2, 3, dtype=F64, requires_grad=True), torch.linspace(0, 1, 3, dtype=F64),
                     method="rampde_dopri5")
    assert stats.last.adjoint == "discrete" and stats.last.quadrature_nodes == 0
