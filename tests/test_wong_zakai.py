"""The Wong--Zakai core (rampde_plugins._wong_zakai) on its own: no host library is imported here.

References are closed forms: the Karhunen--Loeve series' variance, the derivative of the path by
finite differences, and the ODE solutions of linear SDEs driven by a known path.
"""

import math

import pytest
import torch

from rampde_plugins import (
    KarhunenLoeveNoise,
    WongZakaiField,
    get_registry,
    noise_channels,
    resolve_policy,
    solve_grid,
    wong_zakai_variance_deficit,
)


def test_path_is_the_integral_of_its_derivative_and_starts_at_zero():
    noise = KarhunenLoeveNoise(0.5, 2.5, 20, (3, 2), generator=7)
    assert torch.equal(noise.path(0.5), torch.zeros(3, 2, dtype=torch.float64))
    # central difference of W_K against xi_K (fp64): O(h^2 w_K^3) ~ 1e-7 at h = 1e-4
    for t in (0.7, 1.3, 2.49):
        h = 1e-4
        fd = (noise.path(t + h) - noise.path(t - h)) / (2 * h)
        torch.testing.assert_close(noise.derivative(t), fd, rtol=0, atol=1e-5)


def test_variance_of_the_truncated_path_matches_the_series_and_its_deficit():
    # Var(W_K(t1)) = c (1 - tail): the same number three ways -- the exact series, the deficit's
    # closed form and the sample variance of 200 000 independent paths (4 standard errors).
    c, k = 2.0, 10
    noise = KarhunenLoeveNoise(0.0, c, k, (200_000, 1), generator=3)
    exact = noise.variance(c)
    assert exact == pytest.approx(c - wong_zakai_variance_deficit(k, c), rel=1e-12)
    assert wong_zakai_variance_deficit(k, c) == pytest.approx(2 * c / (math.pi ** 2 * k), rel=0.05)  # ~1/K
    sample = noise.path(c).var().item()
    assert abs(sample - exact) < 4 * exact * math.sqrt(2 / 200_000)


def test_generators_never_touch_the_global_rng_and_seeds_reproduce():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = KarhunenLoeveNoise(0, 1, 8, (4, 2), generator=123)
    b = KarhunenLoeveNoise(0, 1, 8, (4, 2), generator=123)
    own = KarhunenLoeveNoise(0, 1, 8, (4, 2))
    g = torch.Generator().manual_seed(5)
    user = KarhunenLoeveNoise(0, 1, 8, (4, 2), generator=g)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.coefficients, b.coefficients) and a.seed == 123
    assert own.seed is not None and torch.equal(KarhunenLoeveNoise(0, 1, 8, (4, 2), generator=own.seed).coefficients,
                                                own.coefficients)
    assert user.seed is None and not torch.equal(user.coefficients, KarhunenLoeveNoise(0, 1, 8, (4, 2), generator=g).coefficients)


def test_per_sample_times_and_time_dtype():
    noise = KarhunenLoeveNoise(0, 1, 16, (3, 2), generator=1)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    per_sample = noise.derivative(t)
    for b in range(3):
        torch.testing.assert_close(per_sample[b], noise.derivative(t[b])[b], rtol=1e-12, atol=1e-12)
    assert noise.derivative(torch.tensor(0.3, dtype=torch.float32)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # never evaluated in the autocast dtype
        assert noise.derivative(torch.tensor(0.3)).dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_terms=0), "n_terms=0"), (dict(n_terms=2.5), "n_terms=2.5"), (dict(t1=0.0), r"t1 > t0"),
    (dict(shape=(3, 0)), "shape"), (dict(generator="seed"), "generator must be"),
])
def test_bad_noise_arguments_are_named(kwargs, match):
    args = dict(t0=0.0, t1=1.0, n_terms=4, shape=(3, 2))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        KarhunenLoeveNoise(args.pop("t0"), args.pop("t1"), args.pop("n_terms"), args.pop("shape"), **args)


class _Linear(torch.nn.Module):
    """dX = mu X dt + X G dW: Stratonovich or Ito, every noise type; X_T is known for a known path."""

    def __init__(self, noise_type, sde_type, mu=0.3, sig=(0.5, 0.2, -0.4)):
        super().__init__()
        self.noise_type, self.sde_type = noise_type, sde_type
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.sig = torch.nn.Parameter(torch.tensor(sig, dtype=torch.float64))

    def f(self, t, y):
        return self.mu * y

    def g(self, t, y):
        if self.noise_type == "diagonal":
            return self.sig[0] * y
        if self.noise_type == "scalar":
            return (self.sig[0] * y)[:, :, None]
        return y[:, :, None] * self.sig[None, None, :]  # general: 3 commuting channels

    def exact(self, y0, w, t):
        # Stratonovich: X = x0 exp(mu t + sum_j s_j W_j); Ito subtracts 1/2 sum_j s_j^2 t.
        s = self.sig[:1] if self.noise_type in ("diagonal", "scalar") else self.sig
        ito = 0.5 * (s ** 2).sum() * t if self.sde_type == "ito" else 0.0
        return y0 * torch.exp(self.mu * t - ito + (w * s).sum(-1, keepdim=True))


@pytest.mark.parametrize("noise_type", ["diagonal", "scalar", "general"])
@pytest.mark.parametrize("sde_type", ["stratonovich", "ito"])
def test_field_solves_linear_sdes_pathwise(noise_type, sde_type):
    # The ODE driven by W_K has the closed-form solution of the SDE with W replaced by W_K -- the Ito
    # drift correction (a JVP of g) included.  rk4, h = 1/400 on [0, 1], fp64: error ~1e-9.
    torch.manual_seed(0)
    sde = _Linear(noise_type, sde_type)
    y0 = torch.rand(5, 1, dtype=torch.float64) + 0.5
    m = noise_channels(sde, torch.tensor(0.0), y0)
    assert m == {"diagonal": 1, "scalar": 1, "general": 3}[noise_type]
    noise = KarhunenLoeveNoise(0.0, 1.0, 12, (5, m), generator=11)
    field = WongZakaiField(sde, noise)
    grid = torch.linspace(0, 1, 401, dtype=torch.float64)
    t_out = grid[::100]
    ys = solve_grid(field, y0, grid, t_out, tableau=get_registry().tableau("rk4"),
                    policy=resolve_policy("fp64"), params=tuple(field.parameters()))
    with torch.no_grad():
        for i, t in enumerate(t_out):
            exact = sde.exact(y0, noise.path(t), float(t))
            torch.testing.assert_close(ys[i], exact, rtol=1e-8, atol=1e-10)


def test_additive_general_noise_is_the_path_itself():
    class Additive(torch.nn.Module):
        noise_type, sde_type = "additive", "ito"  # additive: Ito and Stratonovich coincide

        def __init__(self):
            super().__init__()
            self.G = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))

        def f(self, t, y):
            return torch.zeros_like(y) + torch.cos(t)

        def g(self, t, y):
            return self.G.expand(y.shape[0], 3, 2)

    torch.manual_seed(1)
    sde = Additive()
    y0 = torch.randn(4, 3, dtype=torch.float64)
    noise = KarhunenLoeveNoise(0.0, 2.0, 10, (4, 2), generator=2)
    grid = torch.linspace(0, 2, 801, dtype=torch.float64)
    ys = solve_grid(WongZakaiField(sde, noise), y0, grid, grid[-1:].new_tensor([0.0, 2.0]),
                    tableau=get_registry().tableau("rk4"), policy=resolve_policy("fp64"),
                    params=(sde.G,))
    with torch.no_grad():
        exact = y0 + math.sin(2.0) + noise.path(2.0) @ sde.G.T
    torch.testing.assert_close(ys[-1], exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("noise_type, g_shape, match", [
    ("diagonal", (5, 2, 1), r"diagonal noise: g\(t, y\) must return shape \(batch, d\)"),
    ("scalar", (5, 2, 3), r"scalar noise: g\(t, y\) must return shape \(batch, d, 1\)"),
    ("general", (5, 2), r"general noise: g\(t, y\) must return shape \(batch, d, m\)"),
])
def test_shape_errors_name_the_noise_type(noise_type, g_shape, match):
    class Bad:
        sde_type = "stratonovich"

        def f(self, t, y):
            return y

        def g(self, t, y):
            return torch.zeros(g_shape)

    bad = Bad()
    bad.noise_type = noise_type
    with pytest.raises(ValueError, match=match):
        noise_channels(bad, 0.0, torch.zeros(5, 2))


def test_bad_sde_types_and_missing_methods():
    class S:
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t, y):
            return y

    noise = KarhunenLoeveNoise(0, 1, 3, (2, 2), generator=0)
    with pytest.raises(TypeError, match="no callable 'g'"):
        WongZakaiField(S(), noise)
    s = S()
    s.noise_type = "colored"
    with pytest.raises(ValueError, match="noise_type='colored'; valid noise types: diagonal, scalar, additive, general"):
        WongZakaiField(s, noise)
    s.noise_type, s.sde_type = "diagonal", "levy"
    with pytest.raises(ValueError, match="sde_type='levy'; valid SDE types: stratonovich, ito"):
        WongZakaiField(s, noise)
