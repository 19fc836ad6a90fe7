"""Dynamic adjoint scaling for fp16 backward passes.

Why: the VJP of an fp16 velocity is computed in fp16.  Adjoints of a mean loss are small (they
underflow: fp16's smallest normal is 6e-5) and products with large activations overflow (max 65504).
The cotangent fed to each step's VJP is therefore multiplied by a power of two ``S`` and the results
divided by it again in fp32 -- exact, because powers of two only shift the exponent.  The adjoint
and the gradient sums are kept *unscaled* in fp32, so a change of ``S`` never touches them.

Rules within one backward pass (see DESIGN.md section 4 for the defects of the original package that
these avoid):

* start: ``S`` for the terminal cotangent (see "across passes" below).  The *ideal* scale for a
  cotangent whose largest entry is ``amax`` is ``2**round(log2(target / amax))``: the scaled
  adjoint's largest entry is then near ``target`` (1/eps(fp16) = 1024 by default);
* a step whose VJP has an inf/nan: ``S *= backoff_factor`` and the same step is redone (not the
  whole backward, as GradScaler would); after ``max_retries`` backoffs on one step the backward
  raises with advice;
* growth looks at the *scaled* adjoint ``S * max|a|`` after a step: when it has fallen below
  ``target / growth_factor`` and ``growth_interval`` steps in a row were clean, ``S`` grows by powers
  of ``growth_factor`` towards ``target``.  A decaying adjoint thus keeps its mantissa bits, and
  because growth is tied to the scaled value (not the unscaled one) it does not oscillate with
  backoffs.

Rules across passes (a persistent :class:`AdjointScaler`).  The scaler remembers the scale that ran
the last pass's first (terminal) step cleanly *and* the terminal ``amax`` it ran for:

* the next pass moves that scale by the power of two nearest ``prev_amax / amax``, so it follows the
  loss down and up exactly (a loss 1e-7 smaller starts at a scale 2**23 larger), and clamps it to
  ``[ideal / 2**8, ideal]``.  Below the ideal is headroom that an earlier overflow taught; more than
  8 binades of it means the carried scale is far off and the pass is sized from the data instead.
  A scale without a known ``amax`` (``init_scale``, an old ``state_dict``) is clamped the same way;
  with nothing carried the pass starts at the ideal;
* a zero or non-finite terminal cotangent says nothing about size: the pass runs at the carried
  scale (1.0 if none) and leaves what the scaler remembers as it was;
* at the end of a pass whose first step needed no backoff, a remembered scale below the ideal grows
  by ``growth_factor`` (capped at the ideal), so headroom learned from one overflow is given back
  over the following iterations instead of being kept forever.

Scales stay within ``[2**-126, 2**126]``: the engine multiplies fp32 tensors by ``S`` and ``1/S``, and a
Python float outside fp32's normal range turns into inf or 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ._policy import ScalerConfig, _check_scaler_settings, _int_setting, _is_pow2, _real_setting

__all__ = ["AdjointScaler"]

# Both S and 1/S must be fp32 normals (see the module docstring).
_MIN_EXP, _MAX_EXP = -126, 126
# A carried scale more than 2**8 below the ideal is "far off": re-sized from the data.  8 binades
# keep any headroom a real overflow teaches (the first step's VJP amplifying the cotangent by up
# to 256x beyond target's 64x margin to fp16's max), and cap what a stale scale can cost: at
# most 8 of fp16's 10 mantissa bits lost on the first step before the in-pass growth rule acts.
_MAX_HEADROOM_EXP = 8

_SCALE_VALID = "None or a positive finite power of two (e.g. 1.0, 1024.0, 65536.0)"


def _pow2(exp: float) -> float:
    """2**exp with the exponent clamped to the fp32-safe range."""
    return 2.0 ** min(max(int(exp), _MIN_EXP), _MAX_EXP)


def _log2(x: float) -> int:
    """Exponent of a power of two (exact)."""
    return math.frexp(x)[1] - 1


def _check_scale(owner: str, name: str, value) -> float | None:
    if value is None:
        return None
    v = _real_setting(owner, name, value, _SCALE_VALID)
    if not _is_pow2(v):
        raise ValueError(
            f"{owner} {name}={value!r} must be {_SCALE_VALID}: scaling is undone exactly only for powers of two"
        )
    if not 2.0**_MIN_EXP <= v <= 2.0**_MAX_EXP:
        raise ValueError(
            f"{owner} {name}={value!r} must lie in [2**{_MIN_EXP}, 2**{_MAX_EXP}] (fp32 must hold it and its inverse)"
        )
    return v


def _check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner} {name}={value!r} has type {type(value).__name__}; {name} must be True or False")
    return value


class AdjointScaler:
    """A persistent dynamic adjoint scaler, passed as ``options={"scaler": scaler}``.

    It carries the scale from one backward pass to the next together with the size of the terminal
    cotangent it was used for, and rescales it when the loss changes size (see the module docstring),
    and it exposes the vocabulary of ``torch.amp.GradScaler``.  Without one, each backward starts
    from a data-driven scale.

    Args:
        init_scale: starting scale (a power of two), or ``None`` to size it from the first backward's
            cotangent.  Clamped at the first backward to ``[ideal / 2**8, ideal]`` for that cotangent.
        growth_factor, backoff_factor, growth_interval: as in ``torch.amp.GradScaler`` but counted in
            solver steps of one backward pass (see the module docstring for the rule).  The factors
            must be powers of two (> 1 and in (0, 1)): only those are undone exactly.
        max_retries: backoffs allowed for a single step before the backward raises.
        target: the scaled adjoint's max-abs entry is steered towards this value (positive, finite).
        enabled: ``False`` turns scaling off (scale 1, no host synchronisation).

    Raises:
        TypeError: a setting of the wrong type (bool counts as wrong for the numbers).
        ValueError: a bad value, naming the argument, the value and what is valid.
    """

    def __init__(
        self,
        init_scale: float | None = None,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 16,
        max_retries: int = 24,
        target: float = 2.0**10,
        enabled: bool = True,
    ) -> None:
        owner = "AdjointScaler"
        settings = _check_scaler_settings(owner, target, growth_factor, backoff_factor, growth_interval, max_retries)
        self._config = ScalerConfig(*settings)
        self._scale = _check_scale(owner, "init_scale", init_scale)
        self._enabled = _check_bool(owner, "enabled", enabled)
        self._init_state()

    def _init_state(self) -> None:
        # The terminal amax that ``_scale`` was used for (None: unknown, e.g. init_scale), and the
        # amax of the pass in progress, committed by _finish (a pass that raises commits nothing).
        self._amax: float | None = None
        self._pending_amax: float | None = None
        self._backoffs = 0

    # --- GradScaler-like public surface -------------------------------------------------------
    @property
    def growth_factor(self) -> float:
        return self._config.growth_factor

    @property
    def backoff_factor(self) -> float:
        return self._config.backoff_factor

    @property
    def growth_interval(self) -> int:
        return self._config.growth_interval

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float | None:
        """Where the next backward's first step starts for a terminal cotangent of the same size as the last.

        After a backward that is the scale that ran its first (terminal) step without overflow --
        times ``growth_factor`` (at most up to the ideal) when that step needed no backoff and was
        below the ideal.  A next cotangent ``r`` times smaller starts at about ``r`` times this.
        Before any backward it is ``init_scale`` (``None`` when not given: sized from data); 1.0
        when disabled.
        """
        return 1.0 if not self._enabled else self._scale

    def get_backoff_count(self) -> int:
        """Total backoffs (redone steps) over the scaler's lifetime."""
        return self._backoffs

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "amax": self._amax,
            "growth_factor": self._config.growth_factor,
            "backoff_factor": self._config.backoff_factor,
            "growth_interval": self._config.growth_interval,
            "max_retries": self._config.max_retries,
            "target": self._config.target,
            "enabled": self._enabled,
            "backoffs": self._backoffs,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore :meth:`state_dict`'s result.  All of it is checked before anything is changed.

        ``amax``, ``target``, ``max_retries``, ``enabled`` and ``backoffs`` are optional (older dicts
        lack ``amax``: the restored scale is then clamped to the data at the next backward).

        Raises:
            TypeError, ValueError: as the constructor; the scaler is then left as it was.
        """
        owner = "AdjointScaler.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{owner}: state_dict must be a mapping (from AdjointScaler.state_dict()), got {type(state_dict).__name__}"
            )
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval"} - set(state_dict)
        if missing:
            raise ValueError(f"{owner}: missing keys {sorted(missing)}")
        config = ScalerConfig(*_check_scaler_settings(
            owner,
            state_dict.get("target", self._config.target),
            state_dict["growth_factor"],
            state_dict["backoff_factor"],
            state_dict["growth_interval"],
            state_dict.get("max_retries", self._config.max_retries),
        ))
        scale = _check_scale(owner, "scale", state_dict["scale"])
        amax = state_dict.get("amax")
        if amax is not None:
            valid = "None or a positive finite number"
            amax = _real_setting(owner, "amax", amax, valid)
            if not (amax > 0 and math.isfinite(amax)):
                raise ValueError(f"{owner} amax={state_dict['amax']!r} must be {valid}")
            if scale is None:
                raise ValueError(f"{owner} amax={amax!r} given with scale=None; an amax belongs to a scale")
        enabled = _check_bool(owner, "enabled", state_dict.get("enabled", True))
        backoffs = _int_setting(owner, "backoffs", state_dict.get("backoffs", 0), 0, "a non-negative int")
        # Everything is valid: only now change the scaler (a failed load leaves it untouched).
        self._config, self._scale, self._enabled = config, scale, enabled
        self._amax, self._pending_amax, self._backoffs = amax, None, backoffs

    def __repr__(self) -> str:
        return f"AdjointScaler(scale={self.get_scale()}, enabled={self._enabled})"

    # --- used by the engine -------------------------------------------------------------------
    @classmethod
    def _from_config(cls, config: ScalerConfig) -> "AdjointScaler":
        s = cls.__new__(cls)
        s._config, s._scale, s._enabled = config, None, True
        s._init_state()
        return s

    def _ideal(self, amax: float) -> float:
        # log2 of each (not of the quotient): target / amax overflows for a subnormal amax.
        return _pow2(round(math.log2(self._config.target) - math.log2(amax)))

    def _start(self, cotangent_amax: float) -> float:
        """Scale for a new backward pass given the largest |cotangent| entry of the solve."""
        amax = float(cotangent_amax)
        carried = self._scale
        if not (amax > 0 and math.isfinite(amax)):
            # No size to go by: the carried scale is the best guess, and this pass must not
            # overwrite the amax that the carried scale belongs to.
            self._pending_amax = None
            return carried if carried is not None else 1.0
        self._pending_amax = amax
        ideal = self._ideal(amax)
        if carried is None:
            return ideal
        if self._amax is not None:
            # Follow the loss in both directions in powers of two: the carried scale keeps the
            # headroom it learned relative to the ideal, and the multiplication stays exact.
            carried = _pow2(_log2(carried) + round(math.log2(self._amax) - math.log2(amax)))
        # Never above the ideal: overflow would only be found by backoffs (one redo each).  Never
        # far below it: a stale or hand-set scale (init_scale=1) would underflow the fp16 VJPs of
        # the first steps, which the in-pass growth rule only repairs after growth_interval steps.
        return min(max(carried, _pow2(_log2(ideal) - _MAX_HEADROOM_EXP)), ideal)

    def _grow(self, scale: float, scaled_amax: float, clean_run: int) -> tuple[float, int]:
        """Apply the growth rule after a clean step; returns (scale, clean_run)."""
        cfg = self._config
        if clean_run >= cfg.growth_interval and 0 < scaled_amax < cfg.target / cfg.growth_factor:
            steps = math.floor(math.log(cfg.target / scaled_amax) / math.log(cfg.growth_factor))
            # In exponents, capped: an adjoint decaying towards fp32's subnormals would otherwise
            # push S past 2**127, which is inf as an fp32 scalar (and inf * 0 = nan).
            return _pow2(_log2(scale) + _log2(cfg.growth_factor) * max(steps, 1)), 0
        return scale, clean_run

    def _finish(self, first_step_scale: float, backoffs: int, first_step_backoffs: int = 0) -> None:
        """Remember what the next pass starts from; called once at the end of each backward pass.

        ``first_step_scale`` ran the first (terminal) step cleanly; ``backoffs`` is the pass's total,
        ``first_step_backoffs`` the part of it spent on that first step.
        """
        self._backoffs += int(backoffs)
        amax, self._pending_amax = self._pending_amax, None
        if amax is None:
            # A zero or non-finite terminal cotangent: the pass ran at the carried scale and taught
            # nothing about size (a zero cotangent cannot overflow; a non-finite one raises).
            return
        scale = float(first_step_scale)
        ideal = self._ideal(amax)
        if first_step_backoffs == 0 and scale < ideal:
            # Headroom kept after an overflow is given back one growth_factor per clean pass, as
            # GradScaler grows after clean iterations: if the field still overflows there, the
            # next pass backs off once more on its first step (one redo) and keeps that scale.
            scale = min(scale * self._config.growth_factor, ideal)
        self._scale, self._amax = scale, amax
