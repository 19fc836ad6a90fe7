"""Dynamic adjoint scaling for fp16 backward passes.

Why: the VJP of an fp16 velocity is computed in fp16.  Adjoints of a mean loss are small (they
underflow: fp16's smallest normal is 6e-5) and products with large activations overflow (max 65504).
The cotangent fed to each step's VJP is therefore multiplied by a power of two ``S`` and the results
divided by it again in fp32 -- exact, because powers of two only shift the exponent.  The adjoint
and the gradient sums are kept *unscaled* in fp32, so a change of ``S`` never touches them.

Rules (see DESIGN.md section 4 for the defects of the original package that these avoid):

* start: ``S = 2**round(log2(target / max|cotangent|))`` over all cotangents of the solve, so the
  scaled adjoint's largest entry is near ``target`` (1/eps(fp16) = 1024 by default);
* a step whose VJP has an inf/nan: ``S *= backoff_factor`` and the same step is redone (not the
  whole backward, as GradScaler would); after ``max_retries`` backoffs on one step the backward
  raises with advice;
* growth looks at the *scaled* adjoint ``S * max|a|`` after a step: when it has fallen below
  ``target / growth_factor`` and ``growth_interval`` steps in a row were clean, ``S`` grows by powers
  of ``growth_factor`` towards ``target``.  A decaying adjoint thus keeps its mantissa bits, and
  because growth is tied to the scaled value (not the unscaled one) it does not oscillate with
  backoffs.
"""

from __future__ import annotations

import math

from ._policy import ScalerConfig

__all__ = ["AdjointScaler"]


def _pow2_at_most(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


class AdjointScaler:
    """A persistent dynamic adjoint scaler, passed as ``options={"scaler": scaler}``.

    It carries the scale from one backward pass to the next (the first backward sizes it from the
    data), and it exposes the vocabulary of ``torch.amp.GradScaler``.  Without one, each backward
    starts from a data-driven scale.

    Args:
        init_scale: starting scale, or ``None`` to size it from the first backward's cotangent.
        growth_factor, backoff_factor, growth_interval: as in ``torch.amp.GradScaler`` but counted in
            solver steps of one backward pass (see the module docstring for the rule).
        max_retries: backoffs allowed for a single step before the backward raises.
        target: the scaled adjoint's max-abs entry is steered towards this value.
        enabled: ``False`` turns scaling off (scale 1, no host synchronisation).
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
        self._config = ScalerConfig(target, growth_factor, backoff_factor, growth_interval, max_retries)
        if init_scale is not None and not (isinstance(init_scale, (int, float)) and init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"AdjointScaler init_scale={init_scale!r} must be a positive finite number or None")
        self._scale = None if init_scale is None else float(init_scale)
        self._enabled = bool(enabled)
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
        """The scale the next backward starts from (``None`` until sized from data; 1.0 if disabled).

        After a backward this is the scale that ran its first (terminal) step without overflow.
        """
        return 1.0 if not self._enabled else self._scale

    def get_backoff_count(self) -> int:
        """Total backoffs (redone steps) over the scaler's lifetime."""
        return self._backoffs

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_factor": self._config.growth_factor,
            "backoff_factor": self._config.backoff_factor,
            "growth_interval": self._config.growth_interval,
            "max_retries": self._config.max_retries,
            "target": self._config.target,
            "enabled": self._enabled,
            "backoffs": self._backoffs,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval"} - set(state_dict)
        if missing:
            raise ValueError(f"AdjointScaler.load_state_dict: missing keys {sorted(missing)}")
        config = ScalerConfig(
            state_dict.get("target", self._config.target),
            state_dict["growth_factor"],
            state_dict["backoff_factor"],
            state_dict["growth_interval"],
            state_dict.get("max_retries", self._config.max_retries),
        )
        self._config = config
        self._scale = state_dict["scale"]
        self._enabled = bool(state_dict.get("enabled", True))
        self._backoffs = int(state_dict.get("backoffs", 0))

    def __repr__(self) -> str:
        return f"AdjointScaler(scale={self.get_scale()}, enabled={self._enabled})"

    # --- used by the engine -------------------------------------------------------------------
    @classmethod
    def _from_config(cls, config: ScalerConfig) -> "AdjointScaler":
        s = cls.__new__(cls)
        s._config, s._scale, s._enabled, s._backoffs = config, None, True, 0
        return s

    def _start(self, cotangent_amax: float) -> float:
        """Scale for a new backward pass given the largest |cotangent| entry of the solve."""
        if self._scale is not None:
            return self._scale
        if cotangent_amax > 0 and math.isfinite(cotangent_amax):
            return 2.0 ** round(math.log2(self._config.target / cotangent_amax))
        return 1.0

    def _grow(self, scale: float, scaled_amax: float, clean_run: int) -> tuple[float, int]:
        """Apply the growth rule after a clean step; returns (scale, clean_run)."""
        cfg = self._config
        if clean_run >= cfg.growth_interval and 0 < scaled_amax < cfg.target / cfg.growth_factor:
            steps = math.floor(math.log(cfg.target / scaled_amax) / math.log(cfg.growth_factor))
            return scale * cfg.growth_factor ** max(steps, 1), 0
        return scale, clean_run

    def _finish(self, scale: float, backoffs: int) -> None:
        self._scale = scale
        self._backoffs += backoffs
