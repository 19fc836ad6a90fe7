"""``sdeint`` with torchsde's conventions, solved as the Wong--Zakai ODE on the rampde engine.

The ODE goes through :func:`rampde_plugins.solve`, the host-neutral entry of the core (where every
rampde method, checkpoint schedule and precision policy lives, and both adjoints) -- so this adapter
needs no other adapter and no other host library: it works with torchdiffeq uninstalled from the
registry or not installed at all.  Only public APIs are used: ``rampde_plugins`` and torchsde's
protocol for the SDE object.
"""

from __future__ import annotations

import math

import torch

from rampde_plugins import (
    QUADRATURE_OPTIONS,
    KarhunenLoeveNoise,
    WongZakaiField,
    collect_stats,
    get_registry,
    noise_channels,
    solve,
)

__all__ = ["sdeint", "WONG_ZAKAI_DEFAULT_TERMS", "ADJOINTS", "OPTIONS"]

#: K when ``n_terms`` is not given: the variance deficit 2c/(pi^2 K) is 0.3% of the interval's length c.
WONG_ZAKAI_DEFAULT_TERMS = 64
#: ``adjoint=``: rampde's exact discrete adjoint of the steps, or the Gauss--Legendre quadrature adjoint
ADJOINTS = ("discrete", "quadrature")
#: Default fixed step: this many steps per half period of the fastest Karhunen--Loeve mode,
#: pi / w_K = c / (K - 1/2).  rk4's local error on cos(w t) is ~(w h)^5 / 120: with 8 steps per half
#: period (w h = pi / 8) the path itself is integrated to ~1e-4 relative per half period.
_STEPS_PER_HALF_PERIOD = 8

#: ``options=`` keys and the :func:`rampde_plugins.solve` argument each one sets.
OPTIONS = {
    "precision": "precision", "checkpoint": "checkpoint", "memory_budget": "memory_budget", "scaler": "scaler",
    "newton": "newton", "linear_solver": "linear_solver", "adjoint_params": "params", "interp": "interp",
    "perturb": "perturb", "first_step": "first_step", "min_step": "min_step", "max_step": "max_step",
    "safety": "safety", "ifactor": "ifactor", "dfactor": "dfactor", "max_num_steps": "max_num_steps",
}


def _method_name(method, owner: str) -> str:
    names = sorted("rampde_" + n for n in get_registry().tableaus)
    if not isinstance(method, str) or method not in names:
        raise ValueError(f"{owner}: method={method!r} is not a rampde method; valid methods: {', '.join(names)}")
    return method


def _times(ts, y0: torch.Tensor, owner: str) -> torch.Tensor:
    if not torch.is_tensor(ts):
        if not isinstance(ts, (tuple, list)) or not all(isinstance(t, (float, int)) for t in ts):
            raise TypeError(f"{owner}: ts must be a 1-D tensor or a list/tuple of floats, got {type(ts).__name__}")
        dtype = y0.dtype if y0.dtype in (torch.float32, torch.float64) else torch.float32
        ts = torch.tensor(ts, dtype=dtype, device=y0.device)
    if ts.dim() != 1 or ts.shape[0] < 1:
        raise ValueError(f"{owner}: ts must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}")
    if ts.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{owner}: ts has dtype {ts.dtype}; use float32 or float64")
    tc = ts.detach().cpu()
    if not bool(torch.isfinite(tc).all()) or (tc.shape[0] > 1 and not bool((tc[1:] > tc[:-1]).all())):
        raise ValueError(f"{owner}: ts must be finite and strictly increasing, got {tc.tolist()[:8]}...")
    return ts


def _subdivided_grid(t: torch.Tensor, max_step: float) -> torch.Tensor:
    """Every output interval of ``t`` cut into equal steps no longer than ``max_step``.

    The outputs are grid points, so no output is interpolated (a step_size grid would put them between
    steps and interpolate linearly, a first-order error on a path that oscillates)."""
    pieces = [t[:1]]
    for i in range(t.shape[0] - 1):
        a, b = t[i], t[i + 1]
        n = max(1, math.ceil(float(b - a) / max_step - 1e-9))
        inner = torch.arange(1, n + 1, dtype=t.dtype, device=t.device) / n
        piece = a + (b - a) * inner
        piece[-1] = b  # exactly the output time
        pieces.append(piece)
    return torch.cat(pieces)


def _unused_field(t, y):  # pragma: no cover - the validating solve evaluates nothing
    raise AssertionError("not evaluated")


def sdeint(sde, y0, ts, bm=None, method: str = "rampde_rk4", dt=None, adaptive=None, rtol=1e-5, atol=1e-4,
           options=None, names=None, logqp=False, extra=False, extra_solver_state=None, *,
           n_terms: int = WONG_ZAKAI_DEFAULT_TERMS, generator=None, noise: KarhunenLoeveNoise | None = None,
           adjoint: str = "discrete", adjoint_method=None, adjoint_rtol=None, adjoint_atol=None,
           adjoint_options=None, adjoint_params=None):
    """Solve (and differentiate) an SDE through its Wong--Zakai ODE ``dy/dt = f + g xi_K(t)``.

    Args:
        sde: torchsde's protocol -- ``noise_type`` ("diagonal", "scalar", "additive", "general"),
            ``sde_type`` ("stratonovich"; "ito" is converted with the Ito-to-Stratonovich drift
            correction, see :class:`rampde_plugins.WongZakaiField`), ``f(t, y)`` and ``g(t, y)``.
            An ``nn.Module`` SDE's parameters are differentiated.
        y0: ``(batch, d)``.
        ts: strictly increasing output times; the driving path lives on ``[ts[0], ts[-1]]``.
        bm: must be None -- the path is a Karhunen--Loeve series, drawn from ``generator``.
        method: a rampde method, ``"rampde_<name>"`` (explicit or implicit, any registered tableau).
        dt: fixed steps: the largest step (each output interval is cut into equal steps no longer than
            ``dt``, so the outputs are steps).  Default: ``c / (8 (K - 1/2))``, eight steps per half
            period of the fastest mode.  Adaptive steps: the first step.
        adaptive: True for adaptive steps (needs an embedded pair, e.g. ``rampde_dopri5``).  Default:
            adaptive for embedded pairs when ``dt`` is not given, else fixed steps.
        rtol, atol: adaptive tolerances (torchsde's defaults).
        options: rampde's solve options (:data:`OPTIONS`: ``precision``, ``checkpoint``, ``memory_budget``,
            ``scaler``, ``newton``, ``adjoint_params``, the adaptive ``first_step``, ``max_num_steps``, ...,
            as :func:`rampde_plugins.solve` takes them); not ``step_size``/``grid_constructor`` (use ``dt``).
        names: torchsde's renaming of the drift and diffusion methods, ``{"drift": ..., "diffusion": ...}``.
        n_terms: K, the number of Karhunen--Loeve terms (bias of the final variance ~ 2c / (pi^2 K)).
        generator: a ``torch.Generator`` (advanced by one draw of ``(K, batch, m)`` normals), an int
            seed (the same path on every call), or None (a fresh path from a generator rampde seeds;
            torch's global RNG is never used).
        noise: a :class:`rampde_plugins.KarhunenLoeveNoise` to reuse exactly (overrides ``n_terms`` and
            ``generator``); its interval must contain ``[ts[0], ts[-1]]`` and its shape be ``(batch, m)``.
        adjoint: "discrete" (rampde's exact discrete adjoint of the steps) or "quadrature" (the
            Gauss--Legendre quadrature adjoint: memory flat in the number of steps) with ``adjoint_method``
            (a rampde method; default ``method``), ``adjoint_rtol``/``adjoint_atol`` (adaptive backward
            solves; default ``rtol``/``atol``), ``adjoint_options`` (the node rule:
            ``rampde_plugins.QUADRATURE_OPTIONS`` keys) and ``adjoint_params`` (the tensors to differentiate;
            default: the SDE's parameters).

    Returns:
        ``(len(ts), batch, d)``.  :func:`rampde_plugins.collect_stats` records the solve with
        ``noise_terms`` (K) and ``noise_seed``.
    """
    owner = f"sdeint(method={method!r})"
    method = _method_name(method, owner)
    if bm is not None:
        raise TypeError(
            f"{owner}: bm={type(bm).__name__} cannot drive a Wong--Zakai ODE (a Brownian sample is not a smooth "
            "path); the path is a Karhunen--Loeve series -- pass generator= (a torch.Generator or a seed) or noise="
        )
    for flag, value in (("logqp", logqp), ("extra", extra)):
        if value:
            raise ValueError(f"{owner}: {flag}=True is not supported on the Wong--Zakai route; use torchsde's own methods")
    if extra_solver_state is not None:
        raise ValueError(f"{owner}: extra_solver_state is not supported (the ODE's state is y itself)")
    if adjoint not in ADJOINTS:
        raise ValueError(f"{owner}: adjoint={adjoint!r}; choose one of {', '.join(ADJOINTS)}")
    if adjoint == "discrete":
        given = [k for k, v in (("adjoint_method", adjoint_method), ("adjoint_rtol", adjoint_rtol),
                                ("adjoint_atol", adjoint_atol), ("adjoint_options", adjoint_options),
                                ("adjoint_params", adjoint_params)) if v is not None]
        if given:
            raise ValueError(f"{owner}: {', '.join(given)} apply to adjoint='quadrature' (the discrete adjoint "
                             "replays the forward's own steps)")
    elif adjoint_method is not None and adjoint_method != method:
        try:
            _method_name(adjoint_method, owner)
        except ValueError:
            raise ValueError(
                f"{owner}: adjoint_method={adjoint_method!r} is not a rampde method; the backward of a rampde method is "
                "rampde's quadrature adjoint, integrated by a rampde method -- leave adjoint_method out (it defaults to "
                f"method) or name one of {', '.join(sorted('rampde_' + n for n in get_registry().tableaus))}"
            ) from None
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"{owner}: y0 must be a torch.Tensor of shape (batch, d), got {type(y0).__name__}")
    ts = _times(ts, y0, owner)
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"{owner}: options must be a dict, got {type(options).__name__}")
    opts = dict(options or {})
    bad = [k for k in ("step_size", "grid_constructor") if k in opts]
    if bad:
        raise ValueError(f"{owner}: options {bad} are set by dt here (the largest fixed step)")
    unknown = sorted(set(opts) - set(OPTIONS), key=str)
    if unknown:
        raise ValueError(f"{owner}: unknown option(s) {', '.join(map(repr, unknown))}; valid options: "
                         f"{', '.join(OPTIONS)}")
    if dt is not None and not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"{owner}: dt={dt!r} must be a positive finite number")
    if adjoint_options is not None and not isinstance(adjoint_options, dict):
        raise TypeError(f"{owner}: adjoint_options must be a dict, got {type(adjoint_options).__name__}")
    unknown = sorted(set(adjoint_options or {}) - set(QUADRATURE_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"{owner}: unknown adjoint option(s) {', '.join(map(repr, unknown))}; valid adjoint options "
                         f"(the quadrature's node rule): {', '.join(QUADRATURE_OPTIONS)}")
    if adjoint_params is not None and "adjoint_params" in opts:
        raise ValueError(f"{owner}: adjoint_params and options['adjoint_params'] both name the tensors to "
                         "differentiate; give one of them")

    name = method[len("rampde_"):]
    embedded = get_registry().tableau(name).b_err is not None
    if adaptive is None:
        adaptive = embedded and dt is None
    if adaptive and not embedded:
        raise ValueError(f"{owner}: adaptive=True needs a method with an error estimate (e.g. rampde_dopri5); "
                         f"{method} has none -- give dt for fixed steps")
    kwargs = {OPTIONS[k]: v for k, v in opts.items()}
    kwargs.update(rtol=rtol, atol=atol)
    if adaptive and dt is not None:
        kwargs.setdefault("first_step", dt)
    if adjoint == "quadrature":
        kwargs.update(quadrature=dict(adjoint_options or {}), adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol)
        if adjoint_method is not None:
            kwargs["adjoint_method"] = adjoint_method[len("rampde_"):]
        if adjoint_params is not None:
            kwargs["params"] = adjoint_params
    # Every option is checked before the path is drawn, so a call that fails does not advance a generator
    # passed in: the same solve at the first output time alone validates all of it and evaluates nothing
    # (step_size stands in for the grid, which is built from the path's length below).
    solve(_unused_field, y0, ts[:1], method=name, adjoint=adjoint,
          **({**kwargs, "step_size": 1.0} if not adaptive else kwargs))

    m = noise_channels(sde, ts[0], y0, names=names)
    batch = y0.shape[0]
    t0, t1 = float(ts[0]), float(ts[-1])
    if noise is None:
        if ts.shape[0] > 1:  # a single output time needs no path (and draws none)
            noise = KarhunenLoeveNoise(t0, t1, n_terms, (batch, m), generator=generator, device=y0.device)
    else:
        if not isinstance(noise, KarhunenLoeveNoise):
            raise TypeError(f"{owner}: noise must be a rampde_plugins.KarhunenLoeveNoise, got {type(noise).__name__}")
        if noise.shape != (batch, m):
            raise ValueError(f"{owner}: noise has shape {noise.shape}; this SDE needs (batch, m) = {(batch, m)}")
        if noise.t0 > t0 or noise.t1 < t1:
            raise ValueError(f"{owner}: noise lives on [{noise.t0}, {noise.t1}], which does not contain ts's "
                             f"[{t0}, {t1}]")
    if ts.shape[0] == 1:
        return y0.unsqueeze(0).clone()
    field = WongZakaiField(sde, noise, names=names)

    if not adaptive:
        step = dt if dt is not None else noise.length / (_STEPS_PER_HALF_PERIOD * (noise.n_terms - 0.5))
        kwargs["grid"] = _subdivided_grid(ts, step)

    with collect_stats() as stats:
        ys = solve(field, y0, ts, method=name, adjoint=adjoint, **kwargs)
    for record in stats:
        record.noise_terms, record.noise_seed = noise.n_terms, noise.seed
    return ys
