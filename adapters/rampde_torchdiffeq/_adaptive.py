"""torchdiffeq's adaptive step-size control on the rampde engine.

The decisions are torchdiffeq's own: its initial-step selection, error ratio and optimal step size
functions are called as they are (``torchdiffeq._impl.misc``), and the loop around them mirrors
``RKAdaptiveStepsizeODESolver._adaptive_step`` (``min_step``/``max_step`` clamps, ``step_t`` and
``jump_t`` handling, accept/reject callbacks), so in fp64 the accepted step sequence is torchdiffeq's.
All of it runs in ``dtype`` (float64 by default) or the state dtype, whichever is wider -- never in a
half-precision dtype: torchdiffeq's dopri5 with an fp16 state overflows in its RMS norm.
"""

from __future__ import annotations

import importlib

import torch

from rampde_plugins import RmsController, StageInterpolation, StepData
from rampde_plugins import RampdeToleranceWarning, check_tolerance  # noqa: F401 (re-exported)

ADAPTIVE_OPTIONS = {
    "first_step": "initial step size (default: torchdiffeq's selection)",
    "safety": "step-size safety factor (0.9)",
    "ifactor": "largest step growth factor (10.0)",
    "dfactor": "largest step shrink factor (0.2)",
    "max_num_steps": "maximum number of trial steps of the solve (2**31 - 1)",
    "step_t": "times the integration must step to",
    "jump_t": "times where f is discontinuous (stepped to, f re-evaluated just after)",
    "min_step": "smallest step size (0)",
    "max_step": "largest step size (inf)",
    "dtype": "dtype of the step-size arithmetic (float64; widened to the state dtype)",
}


class TorchdiffeqController(RmsController):
    """Step-size control exactly as torchdiffeq's ``RKAdaptiveStepsizeODESolver``: the core's
    controller (stepping onto ``step_t``/``jump_t``, clamps, bookkeeping) with torchdiffeq's own
    initial-step selection, error ratio and optimal step size, and ``func``'s step callbacks."""

    def __init__(self, func, y0, order, rtol, atol, norm, min_step=0, max_step=float("inf"), first_step=None,
                 step_t=None, jump_t=None, safety=0.9, ifactor=10.0, dfactor=0.2, max_num_steps=2**31 - 1,
                 dtype=torch.float64, method="", land_at=None):
        super().__init__(y0, order, rtol, atol, norm=norm, first_step=first_step, min_step=min_step,
                         max_step=max_step, safety=safety, ifactor=ifactor, dfactor=dfactor,
                         max_num_steps=max_num_steps, step_t=step_t, jump_t=jump_t, land_at=land_at, dtype=dtype,
                         owner=f"odeint(method={method!r})")
        misc = importlib.import_module("torchdiffeq._impl.misc")
        self._select_initial_step = misc._select_initial_step
        self._compute_error_ratio = misc._compute_error_ratio
        self._optimal_step_size = misc._optimal_step_size
        self.func, self.method = func, method

    def initial_step(self, f, t0, y0, f0):
        return self._select_initial_step(f, t0, y0, self.order - 1, self.rtol, self.atol, self.norm, f0=f0)

    def error_ratio(self, err, y0, y1):
        return self._compute_error_ratio(err, self.rtol, self.atol, y0, y1, self.norm)

    def optimal_step(self, last, ratio):
        return self._optimal_step_size(last, ratio, self.safety, self.ifactor, self.dfactor, self.order)

    def notify(self, event, t0, y0, dt):
        cb = getattr(self.func, event, None)
        if cb is not None:
            cb(t0, y0, dt)


# The dense output of torchdiffeq's adaptive solvers: a quartic through y0, y1, y(t0 + h/2) and
# the end slopes, with y_mid from each solver's `mid` weights.
_MID_OF = {
    "dopri5": ("torchdiffeq._impl.dopri5", "Dopri5Solver"),
    "bosh3": ("torchdiffeq._impl.bosh3", "Bosh3Solver"),
    "fehlberg2": ("torchdiffeq._impl.fehlberg2", "Fehlberg2"),
    "adaptive_heun": ("torchdiffeq._impl.adaptive_heun", "AdaptiveHeunSolver"),
    "dopri8": ("torchdiffeq._impl.dopri8", "Dopri8Solver"),
}


def make_interp(tableau_name: str, tableau=None):
    """``interp(step_data, t)`` with torchdiffeq's quartic fit, the stage-state polynomial for an
    implicit tableau (stiff components: see ``rampde_plugins.StageInterpolation``), or cubic Hermite."""
    if tableau is not None and tableau.implicit:
        stages = StageInterpolation(tableau)
        return lambda sd, t: stages(sd).at(t)
    interp_mod = importlib.import_module("torchdiffeq._impl.interp")
    fit, evaluate = interp_mod._interp_fit, interp_mod._interp_evaluate
    where = _MID_OF.get(tableau_name)
    mid = None
    if where is not None:
        try:
            mid = [float(x) for x in getattr(importlib.import_module(where[0]), where[1]).mid]
        except (ImportError, AttributeError):
            mid = None

    if mid is not None:
        def interp(sd, t):
            dt = sd.h.to(sd.y0.dtype)
            y_mid = sd.y0 + dt * sum(w * k for w, k in zip(mid, sd.ks) if w != 0.0)
            return evaluate(fit(sd.y0, sd.y1, y_mid, sd.ks[0], sd.ks[-1], dt), sd.t0, sd.t1, t)

        return interp

    return StepData.hermite


__all__ = ["ADAPTIVE_OPTIONS", "RampdeToleranceWarning", "TorchdiffeqController", "check_tolerance", "make_interp"]
