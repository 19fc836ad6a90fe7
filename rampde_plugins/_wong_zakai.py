"""Wong--Zakai ODEs: train an SDE as the ODE driven by a smooth, truncated Brownian path.

Brownian motion on ``[t0, t0 + c]`` has the Karhunen--Loeve expansion

    W(t) = sum_{n >= 1} Z_n sqrt(2c) sin(w_n s) / ((n - 1/2) pi),   w_n = (n - 1/2) pi / c,  s = t - t0,

with ``Z_n ~ N(0, 1)`` independent.  Keeping ``K`` terms gives a smooth path ``W_K`` whose derivative
``xi_K(t) = sum_n Z_n sqrt(2/c) cos(w_n s)`` is an ordinary function of time, so

    dy/dt = f(t, y) + g(t, y) xi_K(t)

is an ODE every rampde method (explicit or implicit, fixed or adaptive steps, any checkpoint schedule,
the discrete or the quadrature adjoint, mixed precision) can solve and differentiate.  As ``K`` grows its
solutions converge to those of the *Stratonovich* SDE ``dy = f dt + g o dW`` (Wong & Zakai, 1965); the
variance of ``W_K(t0 + c)`` falls short of ``c`` by ``c * sum_{n > K} 2 / ((n - 1/2) pi)^2 ~ 2c / (pi^2 K)``,
a truncation bias of order ``1/K``.

This module is the host-independent core: :class:`KarhunenLoeveNoise` (the paths) and
:class:`WongZakaiField` (the ODE's right-hand side for torchsde's SDE protocol: an object with ``f``,
``g``, ``noise_type`` and ``sde_type``).  It imports no host library.
"""

from __future__ import annotations

import math
import secrets
import warnings

import torch

__all__ = ["KarhunenLoeveNoise", "WongZakaiField", "noise_channels", "NOISE_TYPES", "SDE_TYPES", "wong_zakai_variance_deficit"]

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
SDE_TYPES = ("stratonovich", "ito")


def wong_zakai_variance_deficit(n_terms: int, length: float) -> float:
    """``Var(W(t0 + c)) - Var(W_K(t0 + c))`` for ``K = n_terms``, ``c = length``: the tail of the series.

    Computed from the closed form ``sum_{n >= 1} 2 / ((n - 1/2) pi)^2 = 1`` minus the first ``K`` terms
    (so the deficit is exact, not a truncated tail sum)."""
    head = sum(2.0 / ((n - 0.5) * math.pi) ** 2 for n in range(1, int(n_terms) + 1))
    return float(length) * (1.0 - head)


class KarhunenLoeveNoise:
    """``K``-term Karhunen--Loeve Brownian paths on ``[t0, t1]``, one independent path per entry of ``shape``.

    The coefficients ``Z`` (shape ``(K, *shape)``, float64) are drawn once, at construction, from
    ``generator`` -- a ``torch.Generator`` (its state advances), an ``int`` seed (a CPU generator is
    seeded with it) or ``None`` (a CPU generator rampde seeds from the operating system's entropy; the
    seed is kept in :attr:`seed`).  torch's global RNG is never used, so drawing a path changes no
    random stream of the user's, and a field that evaluates the path any number of times (fixed,
    adaptive, rejected and recomputed steps, the backward's replays) sees the same path.

    Args:
        t0, t1: the interval (``t1 > t0``); the basis is that of Brownian motion started at ``t0``.
        n_terms: ``K >= 1``.
        shape: the shape of one evaluation, ``(batch, m)`` for torchsde (``m`` Brownian channels).
        generator: see above.
        device: where the coefficients live (default: the generator's device, else CPU).
    """

    def __init__(self, t0, t1, n_terms: int, shape, *, generator=None, device=None) -> None:
        if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
            raise ValueError(f"n_terms={n_terms!r}: the number of Karhunen--Loeve terms must be an integer >= 1")
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1)) or not t1 > t0:
            raise ValueError(f"the noise interval [t0, t1] = [{t0!r}, {t1!r}] must be finite with t1 > t0")
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape={shape!r} must be a sequence of ints such as (batch, m)") from None
        if any(s < 1 for s in shape):
            raise ValueError(f"shape={shape!r}: every size must be >= 1")
        self.seed: int | None = None
        if generator is None or (isinstance(generator, int) and not isinstance(generator, bool)):
            # Owned generator: the seed is recorded, so any path can be drawn again exactly.
            self.seed = secrets.randbits(63) if generator is None else int(generator)
            generator = torch.Generator(device="cpu")
            generator.manual_seed(self.seed)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
            )
        self.t0, self.t1, self.length = t0, t1, t1 - t0
        self.n_terms, self.shape = n_terms, shape
        # float64 draws: the same seed gives the same path whatever dtype the solve later runs in.
        z = torch.randn((n_terms, *shape), generator=generator, dtype=torch.float64, device=generator.device)
        self.device = torch.device(device) if device is not None else z.device
        self.coefficients = z.to(self.device)
        n = torch.arange(1, n_terms + 1, dtype=torch.float64, device=self.device)
        #: the angular frequencies w_n = (n - 1/2) pi / c
        self.frequencies = (n - 0.5) * math.pi / self.length
        self._cache: dict = {}

    def __repr__(self) -> str:
        return (f"KarhunenLoeveNoise(t0={self.t0}, t1={self.t1}, n_terms={self.n_terms}, shape={self.shape}, "
                f"seed={self.seed})")

    def _tables(self, dtype: torch.dtype, device: torch.device):
        # Per dtype/device: the coefficients and frequencies cast once, not at every evaluation.
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = (self.coefficients.to(device=device, dtype=dtype),
                                self.frequencies.to(device=device, dtype=dtype))
        return self._cache[key]

    def _combine(self, basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        # basis: (K,) for a 0-d time, (K, B) for one time per sample (the leading axis of shape).
        if basis.dim() == 1:
            return torch.tensordot(basis, coeffs, dims=1)
        if basis.shape[1] != coeffs.shape[1]:
            raise ValueError(f"t has {basis.shape[1]} times; one per sample needs {coeffs.shape[1]}")
        return torch.einsum("kb,kb...->b...", basis, coeffs)

    def _evaluate(self, t, kind: str, dtype) -> torch.Tensor:
        # A Python number is a float64 time (as_tensor would make it float32).
        t = torch.as_tensor(t, device=self.device, dtype=None if torch.is_tensor(t) else torch.float64)
        if t.dim() > 1:
            raise ValueError(f"t must be 0-d or one time per sample (1-D), got shape {tuple(t.shape)}")
        # The time dtype (float64 for an fp64 solve, float32 otherwise): cos(w s) with w s up to (K - 1/2) pi
        # loses about eps * K pi in absolute terms, 2e-5 for K = 80 in float32 -- far below the truncation bias.
        time_dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        # Autocast off: a low-precision sum over K terms would put the path itself in bf16/fp16, and the
        # forward and a recomputation must see exactly the same path anyway.
        with torch.autocast(device_type=self.device.type, enabled=False):
            coeffs, freq = self._tables(time_dtype, t.device)
            s = t.to(time_dtype) - self.t0
            angle = freq[:, None] * s[None] if s.dim() else freq * s
            if kind == "derivative":
                basis = torch.cos(angle) * math.sqrt(2.0 / self.length)
            else:
                basis = torch.sin(angle) * (math.sqrt(2.0 * self.length) / (freq * self.length))[
                    (slice(None),) + (None,) * s.dim()]
            out = self._combine(basis, coeffs)
        return out if dtype is None else out.to(dtype)

    def derivative(self, t, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``xi_K(t) = dW_K/dt``, shape ``self.shape``, in the time's dtype (or ``dtype``).

        ``t`` is a 0-d tensor or float, or a 1-D tensor of one time per sample (``shape[0]`` of them)."""
        return self._evaluate(t, "derivative", dtype)

    def path(self, t, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_K(t)`` (``W_K(t0) = 0``), shape ``self.shape``."""
        return self._evaluate(t, "path", dtype)

    def variance(self, t) -> float:
        """``Var(W_K(t))`` of one entry, exactly (``-> t - t0`` as K grows)."""
        s = float(t) - self.t0
        n = torch.arange(1, self.n_terms + 1, dtype=torch.float64)
        w = (n - 0.5) * math.pi / self.length
        return float((2.0 * self.length * torch.sin(w * s) ** 2 / (w * self.length) ** 2).sum())


_DEFAULT_NAMES = {"drift": "f", "diffusion": "g", "drift_and_diffusion": "f_and_g"}


def _sde_method(sde, role: str, names: dict | None, required: bool = True):
    name = (names or {}).get(role, _DEFAULT_NAMES[role])
    method = getattr(sde, name, None)
    if callable(method) or not required:
        return method if callable(method) else None
    raise TypeError(
        f"sde has no callable {name!r} (its {role}); the Wong--Zakai ODE needs f(t, y) and g(t, y), or "
        "f_and_g(t, y) returning both" + (" -- rename through names={'drift': ..., 'diffusion': ...}" if names is None else "")
    )


def _drift_and_diffusion(sde, names: dict | None):
    """``(t, y) -> (f, g)`` from ``f`` and ``g``, or from torchsde's ``f_and_g`` when one of them is missing."""
    both = _sde_method(sde, "drift_and_diffusion", names, required=False)
    drift = _sde_method(sde, "drift", names, required=both is None)
    diffusion = _sde_method(sde, "diffusion", names, required=both is None)
    if drift is not None and diffusion is not None:
        return (lambda t, y: (drift(t, y), diffusion(t, y))), diffusion
    # torchsde's SDEs may define f_and_g alone (one call for both, e.g. a shared trunk).
    return both, (diffusion if diffusion is not None else (lambda t, y: both(t, y)[1]))


def noise_channels(sde, t0, y0: torch.Tensor, *, names: dict | None = None) -> int:
    """Check an SDE's ``f`` and ``g`` at ``(t0, y0)`` against its noise type; return ``m``, its Brownian channels.

    One evaluation of each, without a graph (torchsde's own ``sdeint`` makes the same check)."""
    noise_type = _check_types(sde)
    both, _ = _drift_and_diffusion(sde, names)
    if not isinstance(y0, torch.Tensor) or y0.dim() != 2:
        got = tuple(y0.shape) if isinstance(y0, torch.Tensor) else type(y0).__name__
        raise ValueError(f"y0 must be a tensor of shape (batch, d), got {got}")
    batch, d = y0.shape
    with torch.no_grad():
        f, g = both(t0, y0)
    if not isinstance(f, torch.Tensor) or tuple(f.shape) != (batch, d):
        raise ValueError(f"the drift f(t, y) must return shape (batch, d) = {(batch, d)}, got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    gshape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
    if noise_type == "diagonal":
        if gshape != (batch, d):
            raise ValueError(f"diagonal noise: g(t, y) must return shape (batch, d) = {(batch, d)}, got {gshape}")
        return d
    if not isinstance(g, torch.Tensor) or g.dim() != 3 or tuple(g.shape[:2]) != (batch, d):
        raise ValueError(f"{noise_type} noise: g(t, y) must return shape (batch, d, m) with "
                         f"(batch, d) = {(batch, d)}, got {gshape}")
    if noise_type == "scalar" and g.shape[2] != 1:
        raise ValueError(f"scalar noise: g(t, y) must return shape (batch, d, 1), got {gshape}")
    return int(g.shape[2])


def _check_types(sde) -> str:
    noise_type = getattr(sde, "noise_type", None)
    sde_type = getattr(sde, "sde_type", None)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"sde.noise_type={noise_type!r}; valid noise types: {', '.join(NOISE_TYPES)}")
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde.sde_type={sde_type!r}; valid SDE types: {', '.join(SDE_TYPES)}")
    return noise_type


_JVP_READY = False


def _jvp(fn, y, v):
    """``(d fn / dy) v`` by forward mode."""
    global _JVP_READY
    if _JVP_READY:
        return torch.func.jvp(fn, (y,), (v,))[1]
    # torch's first forward-mode call imports its JVP decompositions, which go through torch.jit.script
    # and emit torch's own DeprecationWarning about it -- noise about torch's internals, not the user's
    # code (an error under -W error), so it is silenced for that first call only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        out = torch.func.jvp(fn, (y,), (v,))[1]
    _JVP_READY = True
    return out


class WongZakaiField(torch.nn.Module):
    """The Wong--Zakai ODE's right-hand side ``f(t, y) + g(t, y) xi_K(t)`` of an SDE object.

    ``sde`` follows torchsde's protocol: ``noise_type`` in :data:`NOISE_TYPES`, ``sde_type`` in
    :data:`SDE_TYPES`, ``f(t, y) -> (batch, d)`` and ``g(t, y)`` of shape ``(batch, d)`` for
    ``"diagonal"`` noise and ``(batch, d, m)`` otherwise (``m = 1`` for ``"scalar"``).  ``noise`` is a
    :class:`KarhunenLoeveNoise` of shape ``(batch, m)``.  When ``sde`` is an ``nn.Module`` it is a
    submodule, so its parameters and buffers are this field's.

    Ito SDEs are solved as the equivalent Stratonovich SDE, whose drift is

        f_S = f - 1/2 sum_j (d g_{:, j} / dy) g_{:, j},

    one forward-mode JVP (``torch.func.jvp``) per Brownian channel ``j`` (one in all for diagonal and
    scalar noise).  For ``"diagonal"`` noise that JVP is ``sum_k g_k dg_i/dy_k``, the exact correction
    ``g_i dg_i/dy_i`` under torchsde's convention for diagonal noise (``g_i`` depends on ``y_i`` only);
    ``"additive"`` noise (``g`` independent of ``y``) needs no correction.
    """

    def __init__(self, sde, noise: KarhunenLoeveNoise, *, names: dict | None = None) -> None:
        super().__init__()
        noise_type, sde_type = _check_types(sde), sde.sde_type
        if not isinstance(noise, KarhunenLoeveNoise):
            raise TypeError(f"noise must be a KarhunenLoeveNoise, got {type(noise).__name__}")
        if isinstance(sde, torch.nn.Module):
            self.sde = sde
        else:
            object.__setattr__(self, "sde", sde)
        self.noise_type, self.sde_type, self.noise = noise_type, sde_type, noise
        self._both, self._diffusion = _drift_and_diffusion(sde, names)

    def _ito_correction(self, t, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.noise_type == "additive":
            return torch.zeros_like(y)
        # Forward mode: one JVP of g along its own column per channel -- no Jacobian is formed, and it
        # composes with the reverse-mode VJP the adjoint takes of this field (second derivatives of g).
        if self.noise_type == "diagonal":
            return _jvp(lambda z: self._diffusion(t, z), y, g.to(y.dtype))
        total = None
        for j in range(g.shape[2]):
            term = _jvp(lambda z, j=j: self._diffusion(t, z)[:, :, j], y, g[:, :, j].to(y.dtype))
            total = term if total is None else total + term
        return total

    def forward(self, t, y: torch.Tensor) -> torch.Tensor:
        drift, g = self._both(t, y)
        # The path in the time dtype (never under autocast), then in g's dtype for the product.
        xi = self.noise.derivative(t, dtype=torch.promote_types(g.dtype, y.dtype))
        if self.noise_type == "diagonal":
            noise = g * xi
        else:
            noise = torch.einsum("bdm,bm->bd", g, xi.to(g.dtype))
        if self.sde_type == "ito":
            drift = drift - 0.5 * self._ito_correction(t, y, g)
        return drift + noise
