"""torchdiffeq's adaptive step-size control on the rampde engine.

The decisions are torchdiffeq's own: its initial-step selection, error ratio and optimal step size
functions are called as they are (``torchdiffeq._impl.misc``), and the loop around them mirrors
``RKAdaptiveStepsizeODESolver._adaptive_step`` (``min_step``/``max_step`` clamps, ``step_t`` and
``jump_t`` handling, accept/reject callbacks), so in fp64 the accepted step sequence is torchdiffeq's.
All of it runs in ``dtype`` (float64 by default) or the state dtype, whichever is wider -- never in a
half-precision dtype: torchdiffeq's dopri5 with an fp16 state overflows in its RMS norm.
"""

from __future__ import annotations

import bisect
import importlib

import torch

from rampde_plugins import StageInterpolation, StepController
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


class TorchdiffeqController(StepController):
    """Step-size control exactly as torchdiffeq's ``RKAdaptiveStepsizeODESolver``."""

    reuse_last_stage = True  # torchdiffeq starts each step from the previous step's last stage

    def __init__(self, func, y0, order, rtol, atol, norm, min_step=0, max_step=float("inf"), first_step=None,
                 step_t=None, jump_t=None, safety=0.9, ifactor=10.0, dfactor=0.2, max_num_steps=2**31 - 1,
                 dtype=torch.float64, method="", land_at=None):
        misc = importlib.import_module("torchdiffeq._impl.misc")
        self._select_initial_step = misc._select_initial_step
        self._compute_error_ratio = misc._compute_error_ratio
        self._optimal_step_size = misc._optimal_step_size
        dtype = torch.promote_types(dtype, y0.abs().dtype)
        dev = y0.device
        self.dtype, self.order, self.norm, self.func, self.method = dtype, order, norm, func, method
        self.rtol = torch.as_tensor(rtol, dtype=dtype, device=dev)
        self.atol = torch.as_tensor(atol, dtype=dtype, device=dev)
        self.min_step = torch.as_tensor(min_step, dtype=dtype, device=dev)
        self.max_step = torch.as_tensor(max_step, dtype=dtype, device=dev)
        self.first_step = None if first_step is None else torch.as_tensor(first_step, dtype=dtype, device=dev)
        self.safety = torch.as_tensor(safety, dtype=dtype, device=dev)
        self.ifactor = torch.as_tensor(ifactor, dtype=dtype, device=dev)
        self.dfactor = torch.as_tensor(dfactor, dtype=dtype, device=dev)
        self.max_num_steps = int(max_num_steps)
        self.step_t = None if step_t is None else torch.as_tensor(step_t, dtype=dtype, device=dev)
        self.jump_t = None if jump_t is None else torch.as_tensor(jump_t, dtype=dtype, device=dev)
        self.trials = 0
        self._track, self.output_steps = None, []
        # Times the steps land on exactly (as on step_t): the outputs of an implicit method.
        self.land_at = None if land_at is None else torch.as_tensor(land_at, dtype=dtype, device=dev)

    def track(self, times) -> None:
        """Record, for each of the (increasing) ``times``, the size of the accepted step that reached it
        (``output_steps``): the quadrature adjoint starts its backward solves there."""
        self._track = [float(x) for x in times]
        self.output_steps = []

    def _cb(self, name, *args):
        cb = getattr(self.func, name, None)
        if cb is not None:
            cb(*args)

    def start(self, f, t0, y0, f0):
        if self.first_step is None:
            self.dt = self._select_initial_step(f, t0, y0, self.order - 1, self.rtol, self.atol, self.norm, f0=f0)
        else:
            self.dt = self.first_step
        self.dt = self.dt.to(self.dtype)

        def sorted_after(tvals):
            if tvals is None:
                return torch.tensor([], dtype=self.dtype, device=t0.device)
            return torch.sort(tvals[tvals >= t0]).values

        step_t = self.step_t
        if self.land_at is not None:
            land = self.land_at.reshape(-1).to(self.dtype)
            for known in (step_t, self.jump_t):
                if known is not None and len(land):
                    land = land[~torch.isin(land, known)]
            step_t = land if step_t is None else torch.cat([step_t, land])
        self.step_t, self.jump_t = sorted_after(step_t), sorted_after(self.jump_t)
        if (torch.cat([self.step_t, self.jump_t]).unique(return_counts=True)[1] > 1).any():
            raise ValueError(f"odeint(method={self.method!r}): options 'step_t' and 'jump_t' must not share any time")
        self.next_step_index = min(bisect.bisect(self.step_t.tolist(), float(t0)), len(self.step_t) - 1)
        self.next_jump_index = min(bisect.bisect(self.jump_t.tolist(), float(t0)), len(self.jump_t) - 1)

    def propose(self, t0, y0=None):
        dt = self.dt
        if not torch.isfinite(dt):
            dt = self.min_step
        dt = dt.clamp(self.min_step, self.max_step)
        if self.trials >= self.max_num_steps:
            raise RuntimeError(
                f"odeint(method={self.method!r}): max_num_steps={self.max_num_steps} reached at t={float(t0):.6g} "
                f"with step size {float(dt):.3g}; the error estimate does not fall below the tolerance"
            )
        self.trials += 1
        self._cb("callback_step", t0, y0, dt)
        t0 = t0.to(self.dtype)
        if not bool(t0 + dt > t0):
            raise RuntimeError(
                f"odeint(method={self.method!r}): step size underflow at t={float(t0):.6g} (dt={float(dt):.3g}); "
                "the error estimate never falls below the tolerance -- with a low-precision policy the "
                "tolerance may be below the velocity's rounding noise"
            )
        t1 = t0 + dt
        self.on_step_t = False
        if len(self.step_t):
            nxt = self.step_t[self.next_step_index]
            self.on_step_t = bool(t0 < nxt < t0 + dt)
            if self.on_step_t:
                t1, dt = nxt, nxt - t0
        self.on_jump_t = False
        if len(self.jump_t):
            nxt = self.jump_t[self.next_jump_index]
            self.on_jump_t = bool(t0 < nxt < t0 + dt)
            if self.on_jump_t:
                self.on_step_t = False
                t1, dt = nxt, nxt - t0
        self._dt = dt
        return t1, dt

    def judge(self, t0, t1, h, y0, y1, err):
        dt = self._dt
        ratio = self._compute_error_ratio(err, self.rtol, self.atol, y0, y1, self.norm)
        accept = bool(ratio <= 1)
        if dt > self.max_step:
            accept = False
        if dt <= self.min_step:
            accept = True
        self.at_jump = False
        if accept:
            self._cb("callback_accept_step", t0, y0, dt)
            if self._track is not None:
                end, size = torch.stack([t1.to(self.dtype), dt.abs().to(self.dtype)]).tolist()  # one sync
                while len(self.output_steps) < len(self._track) and self._track[len(self.output_steps)] <= end:
                    self.output_steps.append(size)
            if self.on_step_t and self.next_step_index != len(self.step_t) - 1:
                self.next_step_index += 1
            if self.on_jump_t:
                if self.next_jump_index != len(self.jump_t) - 1:
                    self.next_jump_index += 1
                self.at_jump = True
        else:
            self._cb("callback_reject_step", t0, y0, dt)
        self.dt = self._optimal_step_size(dt, ratio, self.safety, self.ifactor, self.dfactor, self.order)
        self.dt = self.dt.clamp(self.min_step, self.max_step)
        return accept


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

    def hermite(sd, t):
        s = ((t - sd.t0) / (sd.t1 - sd.t0)).to(sd.y0.dtype)
        dt = sd.h.to(sd.y0.dtype)
        return ((1 + 2 * s) * (1 - s) ** 2 * sd.y0 + s * (1 - s) ** 2 * dt * sd.f_start()
                + s * s * (3 - 2 * s) * sd.y1 + s * s * (s - 1) * dt * sd.f_end())

    return hermite


__all__ = ["ADAPTIVE_OPTIONS", "RampdeToleranceWarning", "TorchdiffeqController", "check_tolerance", "make_interp"]
