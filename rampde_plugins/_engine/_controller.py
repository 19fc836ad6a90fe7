"""The step-size controller strategy of shared-time adaptive solves: error-per-unit-step control with
an RMS norm (Hairer, Norsett & Wanner, *Solving ODEs I*, II.4), stepping onto given times.

:class:`RmsController` implements :class:`~rampde_plugins.StepController` once -- trial counting, the
step-size clamps, stepping onto ``step_t`` (and ``land_at``, an implicit method's outputs) and onto
discontinuities ``jump_t``, accept/reject bookkeeping -- and leaves the numerics to three methods a
host overrides to bring its own: :meth:`initial_step`, :meth:`error_ratio`, :meth:`optimal_step`
(the torchdiffeq adapter plugs torchdiffeq's own functions in, so that its accepted steps are
torchdiffeq's bit for bit), and :meth:`notify` for the host's step callbacks.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

import torch

from ._drivers import StepController

__all__ = ["RmsController", "rms_norm"]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """The root mean square of ``x`` (the default error norm)."""
    return x.abs().pow(2).mean().sqrt()


class RmsController(StepController):
    """Adaptive step-size control for :func:`rampde_plugins.solve_adaptive`.

    All step-size arithmetic runs in ``dtype`` (float64 by default) or the state dtype, whichever is
    wider -- never in a half-precision dtype, whose RMS norm would overflow.

    Args:
        y0: the initial state (its dtype and device).
        order: the method's order (its error estimate is of order ``order - 1``).
        rtol, atol: tolerances of the error ratio.
        norm: the error norm (default :func:`rms_norm`).
        first_step: initial step size (default: :meth:`initial_step`).
        min_step, max_step: clamps of every proposed step; a step at ``min_step`` is accepted whatever
            its error.
        safety, ifactor, dfactor: the step-size update's safety factor and largest growth and shrink.
        max_num_steps: trial steps after which the solve raises.
        step_t: times the steps end on exactly; jump_t: discontinuities of the field, stepped onto and
            left with the field re-evaluated just after (:attr:`at_jump`).
        land_at: more times to step onto (joined to ``step_t``): an implicit method's outputs.
        owner: the call as the user wrote it, starting every error message.
    """

    reuse_last_stage = True  # each step starts from the previous step's last stage

    def __init__(self, y0: torch.Tensor, order: int, rtol, atol, *, norm: Callable = rms_norm, first_step=None,
                 min_step=0.0, max_step=math.inf, safety=0.9, ifactor=10.0, dfactor=0.2,
                 max_num_steps: int = 2**31 - 1, step_t=None, jump_t=None, land_at=None,
                 dtype: torch.dtype = torch.float64, owner: str = "the solve"):
        dtype = torch.promote_types(dtype, y0.abs().dtype)
        dev = y0.device

        def tensor(x):
            return None if x is None else torch.as_tensor(x, dtype=dtype, device=dev)

        self.dtype, self.order, self.norm, self.owner = dtype, order, norm, owner
        self.rtol, self.atol = tensor(rtol), tensor(atol)
        self.min_step, self.max_step = tensor(min_step), tensor(max_step)
        self.first_step = tensor(first_step)
        self.safety, self.ifactor, self.dfactor = tensor(safety), tensor(ifactor), tensor(dfactor)
        self.max_num_steps = int(max_num_steps)
        self.step_t, self.jump_t = tensor(step_t), tensor(jump_t)
        self.land_at = None if land_at is None else tensor(land_at).reshape(-1)
        self.trials = 0
        self._track, self.output_steps = None, []

    # -- the numerics a host may bring -----------------------------------------------------------
    def initial_step(self, f, t0, y0, f0) -> torch.Tensor:
        """Hairer's selection: a step whose explicit Euler change is 1% of the scaled state, then the
        order-``p`` estimate from the change of the slope over it; the smaller of 100x the first and
        the second.  Evaluates ``f`` once."""
        order = self.order - 1
        scale = self.atol + torch.abs(y0) * self.rtol
        d0 = self.norm(y0 / scale).abs()
        d1 = self.norm(f0 / scale).abs()
        if d0 < 1e-5 or d1 < 1e-5:
            h0 = torch.tensor(1e-6, dtype=y0.dtype, device=y0.device)
        else:
            h0 = 0.01 * d0 / d1
        h0 = h0.abs()
        f1 = f(t0 + h0, y0 + h0 * f0)
        d2 = torch.abs(self.norm((f1 - f0) / scale) / h0)
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = torch.max(torch.tensor(1e-6, dtype=y0.dtype, device=y0.device), h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / float(order + 1))
        h1 = h1.abs()
        return torch.min(100 * h0, h1).to(t0.dtype)

    def error_ratio(self, err, y0, y1) -> torch.Tensor:
        """The error estimate over its tolerance, ``norm(err / (atol + rtol max(|y0|, |y1|)))``."""
        tol = self.atol + self.rtol * torch.max(y0.abs(), y1.abs())
        return self.norm(err / tol).abs()

    @torch.no_grad()
    def optimal_step(self, last, ratio) -> torch.Tensor:
        """The next step size from the last one and its error ratio."""
        if ratio == 0:
            return last * self.ifactor
        shrink = torch.ones((), dtype=last.dtype, device=last.device) if ratio < 1 else self.dfactor
        ratio = ratio.type_as(last)
        exponent = torch.tensor(self.order, dtype=last.dtype, device=last.device).reciprocal()
        return last * torch.min(self.ifactor, torch.max(self.safety / ratio ** exponent, shrink))

    def notify(self, event: str, t0, y0, dt) -> None:
        """A step event (``"callback_step"``, ``"callback_accept_step"``, ``"callback_reject_step"``)."""

    # -- the StepController interface ------------------------------------------------------------
    def track(self, times) -> None:
        """Record, for each of the (increasing) ``times``, the size of the accepted step that reached
        it (``output_steps``): the quadrature adjoint starts its backward solves there."""
        self._track = [float(x) for x in times]
        self.output_steps = []

    def start(self, f, t0, y0, f0):
        self.dt = (self.initial_step(f, t0, y0, f0) if self.first_step is None else self.first_step).to(self.dtype)

        def sorted_after(tvals):
            if tvals is None:
                return torch.tensor([], dtype=self.dtype, device=t0.device)
            return torch.sort(tvals[tvals >= t0]).values

        step_t = self.step_t
        if self.land_at is not None:
            land = self.land_at.to(self.dtype)
            for known in (step_t, self.jump_t):
                if known is not None and len(land):
                    land = land[~torch.isin(land, known)]
            step_t = land if step_t is None else torch.cat([step_t, land])
        self.step_t, self.jump_t = sorted_after(step_t), sorted_after(self.jump_t)
        if (torch.cat([self.step_t, self.jump_t]).unique(return_counts=True)[1] > 1).any():
            raise ValueError(f"{self.owner}: options 'step_t' and 'jump_t' must not share any time")
        self.next_step_index = min(bisect.bisect(self.step_t.tolist(), float(t0)), len(self.step_t) - 1)
        self.next_jump_index = min(bisect.bisect(self.jump_t.tolist(), float(t0)), len(self.jump_t) - 1)

    def propose(self, t0, y0=None):
        dt = self.dt
        if not torch.isfinite(dt):
            dt = self.min_step
        dt = dt.clamp(self.min_step, self.max_step)
        if self.trials >= self.max_num_steps:
            raise RuntimeError(
                f"{self.owner}: max_num_steps={self.max_num_steps} reached at t={float(t0):.6g} with step size "
                f"{float(dt):.3g}; the error estimate does not fall below the tolerance"
            )
        self.trials += 1
        self.notify("callback_step", t0, y0, dt)
        t0 = t0.to(self.dtype)
        if not bool(t0 + dt > t0):
            raise RuntimeError(
                f"{self.owner}: step size underflow at t={float(t0):.6g} (dt={float(dt):.3g}); the error estimate "
                "never falls below the tolerance -- with a low-precision policy the tolerance may be below the "
                "velocity's rounding noise"
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
        ratio = self.error_ratio(err, y0, y1)
        accept = bool(ratio <= 1)
        if dt > self.max_step:
            accept = False
        if dt <= self.min_step:
            accept = True
        self.at_jump = False
        if accept:
            self.notify("callback_accept_step", t0, y0, dt)
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
            self.notify("callback_reject_step", t0, y0, dt)
        self.dt = self.optimal_step(dt, ratio).clamp(self.min_step, self.max_step)
        return accept
