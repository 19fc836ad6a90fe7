"""Precision policies: which dtype each part of a solve uses.

A policy is a frozen value.  The engine reads it and nothing else decides a dtype, so a user plugin can
register e.g. "bf16 velocities, fp16 storage" without touching the engine.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch

__all__ = ["PrecisionPolicy", "ScalerConfig", "BUILTIN_POLICIES", "SCALING_MODES", "RampdeToleranceWarning", "check_tolerance"]

#: ``"none"``: no adjoint scaling.  ``"dynamic"``: rampde's per-step adjoint scaling with redo on
#: overflow (for fp16).  ``"inf_signal"``: no scaling of our own; an fp16 overflow in the backward
#: shows up as inf/nan gradients so that ``torch.amp.GradScaler.step`` skips the iteration and backs
#: off the loss scale.
SCALING_MODES = ("none", "dynamic", "inf_signal")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WIDE = (torch.float32, torch.float64)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _real_setting(owner: str, name: str, value, valid: str) -> float:
    """``value`` as a float; a bool, a non-number or an int too large for a float is rejected."""
    # bool is an int subclass: ``growth_factor=True`` would silently mean 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner} {name}={value!r} has type {type(value).__name__}; {name} must be {valid}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"{owner} {name}={value!r} is not finite as a float; {name} must be {valid}") from None


def _int_setting(owner: str, name: str, value, low: int, valid: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner} {name}={value!r} has type {type(value).__name__}; {name} must be {valid}")
    if value < low:
        raise ValueError(f"{owner} {name}={value!r} must be {valid}")
    return int(value)


def _is_pow2(x: float) -> bool:
    """A positive finite power of two (frexp's mantissa is exactly 1/2 only for those)."""
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


#: Why powers of two: the engine multiplies each cotangent by the scale and divides the results by
#: it again in fp32.  Only a power of two makes that round trip exact (it shifts the exponent and
#: leaves the mantissa alone), so a factor like 1.5 would perturb every gradient by a rounding error.
_POW2_REASON = "scaling is undone exactly only for powers of two"


def _check_scaler_settings(owner, target, growth_factor, backoff_factor, growth_interval, max_retries):
    """Validate the scaler's settings; returns them normalised to (float, float, float, int, int).

    Raises TypeError for a wrong type (including bool) and ValueError for a bad value, naming
    ``owner``, the argument, the value and what is valid.
    """
    valid = "a positive finite number (default 1024.0)"
    t = _real_setting(owner, "target", target, valid)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{owner} target={target!r} must be {valid}")
    valid = "a power of two > 1 (2.0, 4.0, ...)"
    g = _real_setting(owner, "growth_factor", growth_factor, valid)
    if not (g > 1 and _is_pow2(g)):
        raise ValueError(
            f"{owner} growth_factor={growth_factor!r} must be > 1 and a power of two (2.0, 4.0, ...): {_POW2_REASON}"
        )
    valid = "a power of two in (0, 1) (0.5, 0.25, ...)"
    b = _real_setting(owner, "backoff_factor", backoff_factor, valid)
    if not (0 < b < 1 and _is_pow2(b)):
        raise ValueError(
            f"{owner} backoff_factor={backoff_factor!r} must be in (0, 1) and a power of two (0.5, 0.25, ...): {_POW2_REASON}"
        )
    gi = _int_setting(owner, "growth_interval", growth_interval, 1, "a positive int")
    mr = _int_setting(owner, "max_retries", max_retries, 0, "a non-negative int")
    return t, g, b, gi, mr


@dataclass(frozen=True)
class ScalerConfig:
    """Defaults of the dynamic adjoint scaler (names follow ``torch.amp.GradScaler``).

    Args:
        target: the scaled adjoint's max-abs entry is steered towards this value.  2**10 = 1/eps(fp16):
            large enough that the fp16 VJP keeps all of its mantissa bits, 64x below fp16's max.
            A positive finite number.
        growth_factor: multiply the scale by this (repeatedly, towards ``target``) after
            ``growth_interval`` clean steps in a row.  A power of two > 1.
        backoff_factor: multiply the scale by this when a step's VJP overflows, then redo the step.
            A power of two in (0, 1).
        growth_interval: clean steps needed before the scale may grow again (a positive int).
        max_retries: backoffs allowed for one step before the backward raises (a non-negative int).

    Raises:
        TypeError: a setting of the wrong type (a bool counts as wrong for every field).
        ValueError: a bad value (zero, negative, nan, inf, not a power of two), naming the field,
            the value and what is valid.
    """

    target: float = 2.0**10
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 16
    max_retries: int = 24

    def __post_init__(self):
        values = _check_scaler_settings(
            "ScalerConfig", self.target, self.growth_factor, self.backoff_factor, self.growth_interval, self.max_retries
        )
        # Store plain float/int (a numpy scalar or an int 2 would otherwise end up in state_dict()).
        for name, value in zip(("target", "growth_factor", "backoff_factor", "growth_interval", "max_retries"), values):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which dtype each part of a solve uses.

    Args:
        name: registry name (``options={"precision": name}``).
        compute_dtype: autocast dtype of the velocity evaluations ``f(t, y)``; ``None`` evaluates
            ``f`` with autocast disabled (plain state-dtype math).
        state_dtype: dtype of the Runge--Kutta recurrence (stage inputs and the increment
            ``h * sum(b_i k_i)``).  float32 or float64: adding a small increment to a half-precision
            state rounds it away, which is what makes naive fp16 integration drift.
        storage_dtype: dtype of the one state per step kept for the backward (``None``: state dtype).
        accumulation_dtype: dtype of the adjoint and of the parameter/time gradient sums
            (``None``: state dtype).  float32 or float64.
        output_dtype: dtype of the returned trajectory (``None``: state dtype; returning fp16 would
            quantise the user's result for no memory gain worth having).
        scaling: one of :data:`SCALING_MODES`.
        scaler: defaults of the dynamic scaler.
        description: one line for ``python -m rampde_plugins``.

    Raises:
        ValueError: naming the field, the bad value and the valid choices.
    """

    name: str
    compute_dtype: torch.dtype | None
    state_dtype: torch.dtype = torch.float32
    storage_dtype: torch.dtype | None = None
    accumulation_dtype: torch.dtype | None = None
    output_dtype: torch.dtype | None = None
    scaling: str = "none"
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PrecisionPolicy name={self.name!r} must be a non-empty string")

        def check(field_name, value, allowed, allow_none):
            if value is None and allow_none:
                return
            if value not in allowed:
                choices = ", ".join(_dtype_name(d) for d in allowed) + (", None" if allow_none else "")
                raise ValueError(
                    f"PrecisionPolicy {self.name!r}: {field_name}={value!r} is not supported; choose one of {choices}"
                )

        check("compute_dtype", self.compute_dtype, _FLOATS, True)
        check("state_dtype", self.state_dtype, _WIDE, False)
        check("storage_dtype", self.storage_dtype, _FLOATS, True)
        check("accumulation_dtype", self.accumulation_dtype, _WIDE, True)
        check("output_dtype", self.output_dtype, _FLOATS, True)
        if self.scaling not in SCALING_MODES:
            raise ValueError(
                f"PrecisionPolicy {self.name!r}: scaling={self.scaling!r} is not one of {', '.join(SCALING_MODES)}"
            )
        if not isinstance(self.scaler, ScalerConfig):
            raise TypeError(f"PrecisionPolicy {self.name!r}: scaler must be a ScalerConfig, got {type(self.scaler).__name__}")

    # Resolved dtypes (None fields fall back to the state dtype).
    @property
    def storage(self) -> torch.dtype:
        return self.storage_dtype or self.state_dtype

    @property
    def accumulation(self) -> torch.dtype:
        return self.accumulation_dtype or self.state_dtype

    @property
    def output(self) -> torch.dtype:
        return self.output_dtype or self.state_dtype

    def check_device(self, device_type: str) -> None:
        """Raise ``ValueError`` if this policy's autocast dtype does not work on ``device_type``.

        torch's autocast on an unsupported (device, dtype) pair only warns and silently runs in full
        precision; a precision policy must not be silent about that.  The check asks torch itself
        (capability, not a hand-kept table) and caches the answer.
        """
        if self.compute_dtype is None:
            return
        if not _autocast_supported(device_type, self.compute_dtype):
            raise ValueError(
                f"precision policy {self.name!r} evaluates f in {_dtype_name(self.compute_dtype)}, which "
                f"torch.autocast does not support on device type {device_type!r}; "
                f"valid autocast dtypes there: {', '.join(supported_autocast_dtypes(device_type)) or 'none'}"
            )

    def describe(self) -> str:
        cd = _dtype_name(self.compute_dtype) if self.compute_dtype else "no autocast"
        return (
            f"f: {cd}; state: {_dtype_name(self.state_dtype)}; stored: {_dtype_name(self.storage)}; "
            f"adjoint: {_dtype_name(self.accumulation)}; output: {_dtype_name(self.output)}; scaling: {self.scaling}"
        )


@lru_cache(maxsize=None)
def _autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, ValueError):
            return False
    return enabled and not any("autocast" in str(w.message).lower() for w in caught)


def supported_autocast_dtypes(device_type: str) -> list[str]:
    """Names of the half-precision dtypes torch's autocast accepts on ``device_type``."""
    return [_dtype_name(d) for d in (torch.float16, torch.bfloat16) if _autocast_supported(device_type, d)]


BUILTIN_POLICIES = (
    PrecisionPolicy(
        "fp64", None, torch.float64, description="everything in float64 (reference; gradcheck)"
    ),
    PrecisionPolicy("fp32", None, torch.float32, description="everything in float32"),
    PrecisionPolicy(
        "bf16",
        torch.bfloat16,
        torch.float32,
        storage_dtype=torch.bfloat16,
        description="bf16 velocities and stored states; fp32 state and gradients (fp32 range: no scaling)",
    ),
    PrecisionPolicy(
        "fp16",
        torch.float16,
        torch.float32,
        storage_dtype=torch.float16,
        scaling="dynamic",
        description="fp16 velocities and stored states; fp32 state and gradients; dynamic adjoint scaling",
    ),
    PrecisionPolicy(
        "fp16_gradscaler",
        torch.float16,
        torch.float32,
        storage_dtype=torch.float16,
        scaling="inf_signal",
        description="fp16 like 'fp16' but unscaled: overflow yields inf gradients for torch.amp.GradScaler",
    ),
)


class RampdeToleranceWarning(UserWarning):
    """A tolerance below what the policy's velocity precision can resolve."""


# Tolerances this far below the unit roundoff of the velocity dtype are below its noise: a
# velocity rounded to fp16/bf16 has relative error ~eps/2 per evaluation, and the embedded error
# estimate h * sum(b_err_i k_i) inherits ~h*|f|*eps of noise, so the controller keeps shrinking the
# step without the error going down.  Measured step counts are in the adaptive tests.
NOISE_FACTOR = 1e-2


def check_tolerance(policy, rtol, where: str) -> None:
    """Warn (once per call site) when rtol is below what the policy's velocity dtype resolves."""
    cd = policy.compute_dtype
    if cd not in (torch.float16, torch.bfloat16):
        return
    eps = torch.finfo(cd).eps
    rmin = float(torch.as_tensor(rtol).min())
    if rmin < NOISE_FACTOR * eps:
        warnings.warn(
            f"{where} with precision={policy.name!r}: rtol={rmin:g} is below the noise of "
            f"{str(cd).replace('torch.', '')} velocities (unit roundoff {eps:g}); the step size may shrink until "
            f"max_num_steps or underflow. Use rtol >= {NOISE_FACTOR * eps:.0e} with this policy, or precision='fp32'.",
            RampdeToleranceWarning,
            stacklevel=6,
        )
