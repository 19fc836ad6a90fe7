"""The torchsde plugin: SDEs trained through their Wong--Zakai ODEs.

References: the analytic laws of geometric Brownian motion (Stratonovich) and the Ornstein--Uhlenbeck
process, the exact law of the K-term ODE (closed forms below), torchsde's own Stratonovich solver, and
fp64 central finite differences with the same noise.  Monte-Carlo checks allow 4 standard errors.
"""

import math

import pytest
import torch

torchsde = pytest.importorskip("torchsde")

import rampde_plugins  # noqa: E402
from rampde_plugins import KarhunenLoeveNoise, collect_stats, wong_zakai_variance_deficit  # noqa: E402
from rampde_torchsde import sdeint  # noqa: E402


class GBM(torch.nn.Module):
    """dX = mu X dt + sig X o dW (Stratonovich): log X_T ~ N(log x0 + mu T, sig^2 T)."""

    noise_type, sde_type = "diagonal", "stratonovich"

    def __init__(self, mu=0.2, sig=1.0, dtype=torch.float32):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=dtype))
        self.sig = torch.nn.Parameter(torch.tensor(sig, dtype=dtype))

    def f(self, t, y):
        return self.mu * y

    def g(self, t, y):
        return self.sig * y


class OU(torch.nn.Module):
    """dX = -theta X dt + sig dW (additive: Ito = Stratonovich)."""

    noise_type, sde_type = "additive", "stratonovich"

    def __init__(self, theta=1.0, sig=0.8):
        super().__init__()
        self.theta, self.sig = theta, sig

    def f(self, t, y):
        return -self.theta * y

    def g(self, t, y):
        return torch.full((y.shape[0], 1, 1), self.sig, dtype=y.dtype)

    def ode_variance(self, t_end, k):
        # X_T - E X_T = sig sum_n Z_n sqrt(2/T) I_n, I_n = int_0^T e^{-theta (T - s)} cos(w_n s) ds
        # = (w_n (-1)^(n+1) - theta e^{-theta T}) / (theta^2 + w_n^2)  (cos(w_n T) = 0, sin(w_n T) = (-1)^(n+1)).
        n = torch.arange(1, k + 1, dtype=torch.float64)
        w = (n - 0.5) * math.pi / t_end
        i_n = (w * (-1.0) ** (n + 1) - self.theta * math.exp(-self.theta * t_end)) / (self.theta ** 2 + w ** 2)
        return float(self.sig ** 2 * (2 / t_end) * (i_n ** 2).sum())

    def sde_variance(self, t_end):
        return self.sig ** 2 * (1 - math.exp(-2 * self.theta * t_end)) / (2 * self.theta)


def _var_se(x):
    """Sample variance and its standard error ((m4 - v^2) / N)^(1/2)."""
    x = x.double().flatten()
    c = x - x.mean()
    v = c.pow(2).mean()
    return float(v), float(((c.pow(4).mean() - v ** 2) / x.numel()).sqrt())


# -- convergence to the SDE as K grows ----------------------------------------------------------------

N_PATHS = 1_000_000  # the GBM bias at K = 20 (1.0e-2) is then 7 standard errors (1.4e-3)


@pytest.mark.parametrize("k", [5, 10, 20])
def test_gbm_ensemble_follows_the_k_term_law_and_its_bias_falls_like_one_over_k(k):
    # log X_T = mu T + sig W_K(T) exactly, so Var(log X_T) = sig^2 Var(W_K(T)) = sig^2 (T - deficit_K),
    # with deficit_K ~ 2T / (pi^2 K).  The ensemble must show (i) that variance (the solve and the path
    # are right) and (ii) an error against the SDE's sig^2 T equal to the deficit -- resolved, since
    # the deficit is >= 3 standard errors for K <= 20 with 1e6 paths.
    sde, t_end = GBM(), 1.0
    y0 = torch.ones(N_PATHS, 1)
    with torch.no_grad():
        ys = sdeint(sde, y0, [0.0, t_end], n_terms=k, generator=1000 + k)
    v, se = _var_se(torch.log(ys[-1]))
    deficit = wong_zakai_variance_deficit(k, t_end)
    assert abs(v - (t_end - deficit)) < 4 * se
    sde_error = t_end - v
    assert abs(sde_error - deficit) < 4 * se and deficit > 3 * se
    assert deficit * k == pytest.approx(2 * t_end / math.pi ** 2, rel=0.03)  # the ~1/K law of the bias
    mean_x = float(ys[-1].double().mean())
    mean_se = float(ys[-1].double().std() / math.sqrt(N_PATHS))
    assert abs(mean_x - math.exp(0.2 + 0.5 * (t_end - deficit))) < 4 * mean_se


@pytest.mark.parametrize("k", [5, 20])
def test_ou_ensemble_follows_the_k_term_law(k):
    sde, t_end, n = OU(), 2.0, 200_000
    y0 = torch.full((n, 1), 0.5)
    with torch.no_grad():
        ys = sdeint(sde, y0, torch.tensor([0.0, 1.0, t_end]), n_terms=k, generator=k)
    v, se = _var_se(ys[-1])
    assert abs(v - sde.ode_variance(t_end, k)) < 4 * se
    bias = sde.sde_variance(t_end) - sde.ode_variance(t_end, k)
    assert bias > 0 and abs((sde.sde_variance(t_end) - v) - bias) < 4 * se
    mean_se = float(ys[-1].double().std()) / math.sqrt(n)
    assert abs(float(ys[-1].double().mean()) - 0.5 * math.exp(-t_end)) < 4 * mean_se


def test_agrees_with_torchsdes_stratonovich_solver_at_large_k():
    # K = 80 (variance bias 2.5e-3 of T) against torchsde's midpoint method at dt = 0.01 (weak order 1):
    # mean and variance of X_T agree within 4 combined standard errors plus those two biases.
    sde, t_end, n = GBM(sig=0.6), 1.0, 50_000
    y0 = torch.ones(n, 1)
    with torch.no_grad():
        ours = sdeint(sde, y0, [0.0, t_end], n_terms=80, generator=3)[-1]
        bm = torchsde.BrownianInterval(t0=0.0, t1=t_end, size=(n, 1), entropy=4)
        theirs = torchsde.sdeint(sde, y0, torch.tensor([0.0, t_end]), bm=bm, method="midpoint", dt=0.01)[-1]
    m1, m2 = float(ours.double().mean()), float(theirs.double().mean())
    se_m = math.hypot(float(ours.double().std()), float(theirs.double().std())) / math.sqrt(n)
    exact_mean = math.exp(0.2 + 0.5 * 0.36 * t_end)
    assert abs(m1 - exact_mean) < 4 * se_m + exact_mean * 0.5 * 0.36 * wong_zakai_variance_deficit(80, t_end)
    assert abs(m1 - m2) < 4 * se_m + 0.01 * exact_mean
    (v1, s1), (v2, s2) = _var_se(ours), _var_se(theirs)
    assert abs(v1 - v2) < 4 * math.hypot(s1, s2) + 0.02 * v2


# -- gradients: the same noise in forward and backward ------------------------------------------------

class NeuralSDE(torch.nn.Module):
    def __init__(self, noise_type="diagonal", sde_type="stratonovich", d=2):
        super().__init__()
        self.noise_type, self.sde_type = noise_type, sde_type
        self.drift = torch.nn.Sequential(torch.nn.Linear(d + 1, 8), torch.nn.Tanh(), torch.nn.Linear(8, d))
        m = {"diagonal": d, "scalar": 1, "general": 3, "additive": 3}[noise_type]
        self.diff = torch.nn.Linear(d, d * (1 if noise_type == "diagonal" else m))
        self.shape = (d,) if noise_type == "diagonal" else (d, m)
        self.double()

    def f(self, t, y):
        return self.drift(torch.cat([y, t.expand(y.shape[0], 1).to(y.dtype)], dim=1))

    def g(self, t, y):
        z = y if self.noise_type != "additive" else torch.ones_like(y)
        return torch.sigmoid(self.diff(z)).reshape(y.shape[0], *self.shape)


def _loss(sde, y0, ts, **kw):
    ys = sdeint(sde, y0, ts, **kw)
    return (ys ** 2).mean() + ys[-1, :, 0].sum()


def _fd_check(sde, y0, ts, tol, **kw):
    sde.zero_grad()
    _loss(sde, y0, ts, **kw).backward()
    params = [p for p in sde.parameters()]
    for p in params[:1] + params[-1:]:
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in (0, flat.numel() - 1):
            h, keep = 1e-6, flat[i].item()
            with torch.no_grad():
                flat[i] = keep + h
                up = _loss(sde, y0, ts, **kw).item()
                flat[i] = keep - h
                down = _loss(sde, y0, ts, **kw).item()
                flat[i] = keep
            fd = (up - down) / (2 * h)
            assert grad[i].item() == pytest.approx(fd, rel=tol, abs=tol * 1e-2), (p.shape, i)


@pytest.mark.parametrize("checkpoint", ["steps", "graphs", 1, 3, rampde_plugins.SegmentsSchedule(4), "budget"])
def test_discrete_adjoint_equals_finite_differences_for_every_schedule(checkpoint):
    torch.manual_seed(0)
    sde = NeuralSDE()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 4, dtype=torch.float64)
    options = {"memory_budget": "64KB"} if checkpoint == "budget" else {"checkpoint": checkpoint}
    _fd_check(sde, y0, ts, 1e-6, n_terms=6, generator=5, options=options)


@pytest.mark.parametrize("noise_type, sde_type", [("general", "ito"), ("scalar", "stratonovich"),
                                                  ("additive", "ito"), ("diagonal", "ito")])
def test_discrete_adjoint_for_every_noise_type(noise_type, sde_type):
    # Ito: the adjoint differentiates the JVP of the drift correction (second derivatives of g).
    torch.manual_seed(1)
    sde = NeuralSDE(noise_type, sde_type)
    y0 = torch.randn(3, 2, dtype=torch.float64)
    _fd_check(sde, y0, torch.linspace(0, 1, 3, dtype=torch.float64), 1e-6, n_terms=5, generator=2)


@pytest.mark.parametrize("method, kw", [("rampde_rk4", {}), ("rampde_dopri5", {"rtol": 1e-10, "atol": 1e-10})])
def test_quadrature_adjoint_equals_finite_differences(method, kw):
    # The quadrature adjoint re-integrates [x, a] backward (a continuous adjoint): equal to the
    # gradient of the forward up to the solver's error -- h^4 on the fixed grid, rtol when adaptive.
    torch.manual_seed(0)
    sde = NeuralSDE()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 4, dtype=torch.float64)
    with collect_stats() as stats:
        _fd_check(sde, y0, ts, 1e-4, method=method, n_terms=6, generator=5, adjoint="quadrature", **kw)
    assert stats.records[0].adjoint == "quadrature" and stats.records[0].backward_done


def test_bf16_gradient_within_bound_of_fp64():
    # bf16 velocities, fp32 state and gradients: relative error of the parameter gradient <= 3e-2
    # (a few bf16 ulps, 2^-8 = 3.9e-3, over 44 steps; measured 1.0e-3).
    torch.manual_seed(0)
    ref = NeuralSDE()
    low = NeuralSDE().float()
    low.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    y0 = torch.randn(16, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    _loss(ref, y0, ts, n_terms=6, generator=9).backward()
    _loss(low, y0.float(), ts.float(), n_terms=6, generator=9, options={"precision": "bf16"}).backward()
    g64 = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g16 = torch.cat([p.grad.flatten() for p in low.parameters()]).double()
    assert float((g16 - g64).norm() / g64.norm()) < 3e-2


# -- torchsde's own entry points -----------------------------------------------------------------------

def test_torchsde_sdeint_dispatches_rampde_methods_only():
    sde = GBM(sig=0.5)
    y0 = torch.ones(4, 1)
    ts = torch.tensor([0.0, 0.5, 1.0])
    ours = sdeint(sde, y0, ts, n_terms=10, generator=1)
    via_torchsde = torchsde.sdeint(sde, y0, ts, method="rampde_rk4", n_terms=10, generator=1)
    assert torch.equal(ours, via_torchsde)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(4, 1), entropy=0)
    own = torchsde.sdeint(sde, y0, ts, bm=bm, method="midpoint", dt=0.1)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(4, 1), entropy=0)
    original = torchsde.sdeint._rampde_original(sde, y0, ts, bm=bm, method="midpoint", dt=0.1)
    assert torch.equal(own, original)
    with collect_stats() as stats:
        out = torchsde.sdeint_adjoint(sde, y0, ts, method="rampde_rk4", n_terms=10, generator=1)
        out.sum().backward()
    assert stats.last.adjoint == "quadrature" and stats.last.noise_terms == 10 and stats.last.noise_seed == 1
    torch.testing.assert_close(out, ours, rtol=0, atol=0)


def test_uninstall_restores_torchsde():
    original = torchsde.sdeint._rampde_original
    rampde_plugins.uninstall()
    try:
        assert torchsde.sdeint is original
    finally:
        rampde_plugins.install()
    assert torchsde.sdeint._rampde_original is original


def test_stats_and_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with collect_stats() as stats:
        sdeint(GBM(), torch.ones(2, 1), [0.0, 1.0], n_terms=7)
        sdeint(GBM(), torch.ones(2, 1), [0.0, 1.0], n_terms=7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
    a, b = stats.records
    assert a.noise_terms == 7 and isinstance(a.noise_seed, int) and b.noise_seed is None
    assert a.n_steps == math.ceil(8 * 6.5)  # the default step: 8 per half period of the fastest mode


def test_same_noise_object_gives_the_same_path():
    noise = KarhunenLoeveNoise(0.0, 1.0, 12, (3, 1), generator=4)
    a = sdeint(GBM(), torch.ones(3, 1), [0.0, 1.0], noise=noise)
    b = sdeint(GBM(), torch.ones(3, 1), [0.0, 0.5, 1.0], noise=noise, method="rampde_dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="midpoint"), ValueError, "method='midpoint' is not a rampde method; valid methods: .*rampde_rk4"),
    (dict(bm=object()), TypeError, "bm=object cannot drive a Wong--Zakai ODE"),
    (dict(logqp=True), ValueError, "logqp=True is not supported"),
    (dict(adjoint="backsolve"), ValueError, "adjoint='backsolve'; choose one of discrete, quadrature"),
    (dict(adjoint_method="rampde_rk4"), ValueError, "adjoint_method apply to adjoint='quadrature'"),
    (dict(adjoint="quadrature", adjoint_method="adjoint_reversible_heun"), ValueError,
     "adjoint_method='adjoint_reversible_heun' is not a rampde method; .* leave adjoint_method out"),
    (dict(options={"step_size": 0.1}), ValueError, r"options \['step_size'\] are set by dt"),
    (dict(dt=-1.0), ValueError, "dt=-1.0 must be a positive finite number"),
    (dict(adaptive=True), ValueError, "adaptive=True needs a method with an error estimate"),
    (dict(n_terms=0), ValueError, "n_terms=0"),
    (dict(noise=KarhunenLoeveNoise(0, 1, 3, (5, 1), generator=0)), ValueError, r"noise has shape \(5, 1\)"),
    (dict(noise=KarhunenLoeveNoise(0.5, 1, 3, (2, 1), generator=0)), ValueError, "does not contain ts"),
    (dict(ts=[1.0, 0.0]), ValueError, "strictly increasing"),
])
def test_bad_input_is_named_and_changes_nothing(kwargs, error, match):
    sde = GBM()
    state = {k: v.clone() for k, v in sde.state_dict().items()}
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    args = dict(sde=sde, y0=torch.ones(2, 1), ts=[0.0, 1.0])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sdeint(**args)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, sde.state_dict()[k]) for k, v in state.items())


def test_torchsde_only_keywords_at_non_defaults_are_refused():
    with pytest.raises(ValueError, match="dt_min=0.1 does not apply to the Wong--Zakai ODE"):
        torchsde.sdeint(GBM(), torch.ones(2, 1), torch.tensor([0.0, 1.0]), method="rampde_rk4", dt_min=0.1)


def test_f_and_g_and_renamed_methods_give_the_same_solve():
    # torchsde lets an SDE define f_and_g alone, or name its methods otherwise (names=...).
    torch.manual_seed(3)
    sde = NeuralSDE("general", "ito")

    class Both(torch.nn.Module):
        noise_type, sde_type = "general", "ito"

        def __init__(self):
            super().__init__()
            self.inner = sde

        def f_and_g(self, t, y):
            return self.inner.f(t, y), self.inner.g(t, y)

    class Renamed(torch.nn.Module):
        noise_type, sde_type = "general", "ito"

        def __init__(self):
            super().__init__()
            self.inner = sde

        def drift(self, t, y):
            return self.inner.f(t, y)

        def diffusion(self, t, y):
            return self.inner.g(t, y)

    y0 = torch.randn(3, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)
    ref = sdeint(sde, y0, ts, n_terms=5, generator=1)
    torch.testing.assert_close(sdeint(Both(), y0, ts, n_terms=5, generator=1), ref, rtol=0, atol=0)
    renamed = sdeint(Renamed(), y0, ts, n_terms=5, generator=1, names={"drift": "drift", "diffusion": "diffusion"})
    torch.testing.assert_close(renamed, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="no callable 'f'"):
        sdeint(Renamed(), y0, ts, n_terms=5, generator=1)
