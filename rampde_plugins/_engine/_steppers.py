"""Steppers: one step of a Runge--Kutta method, behind one protocol (:class:`Stepper`), and the
explicit stepper, its linear-combination kernels and the per-evaluation checks.

A stepper attempts one step: ``step(y, times, h, k0, f) -> (y_next, stages)``.  The forward
drivers (fixed grid, shared-time adaptive, per-sample adaptive) and every schedule's tapes call it
and nothing else; its VJP is autograd's over the rebuilt step (the adjoint sweep takes one
``autograd.grad`` per tape), so an explicit stepper needs nothing more, and an implicit one brings
its own transposed solves inside its graph (``_implicit``).  A stepper kind is one class plus one
:func:`register_stepper` call in its own module, which says which tableaus it steps;
:func:`make_stepper` picks the latest registered stepper that applies.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import math

import torch


def _lincomb(ks: Sequence[torch.Tensor], coeffs: Sequence[float], scale: float = 1.0,
             dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """scale * sum_j coeffs[j] * ks[j] in ``dtype`` (default: the stages'), skipping zero weights.

    None if all weights are zero.  Never writes into a stage value; accumulates in place only into
    its own fresh tensor and only without a graph.
    """
    acc, fresh = None, False
    for k, w in zip(ks, coeffs):
        if w == 0.0:
            continue
        w = scale * w
        if acc is None:
            acc = k if dtype is None else k.to(dtype)
            fresh = acc is not k
            if w != 1.0:
                acc, fresh = acc * w, True
        elif fresh and not torch.is_grad_enabled():
            acc.add_(k, alpha=w)
        else:
            acc, fresh = torch.add(acc, k, alpha=w), True
    return acc


@functools.lru_cache(maxsize=512)
def _relative_weights(coeffs: tuple, n: int) -> tuple[tuple[int, ...], float, tuple[float, ...]]:
    """For a tableau row over ``n`` stages: the stages with a non-zero weight, the first such weight
    and every weight relative to it -- derived once per row, not at every step."""
    idx = tuple(j for j, w in enumerate(coeffs[:n]) if w != 0.0)
    if not idx:
        return (), 0.0, ()
    w0 = coeffs[idx[0]]
    return idx, w0, tuple(coeffs[j] / w0 for j in idx)


def _axpy(y: torch.Tensor, h, ks: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """y + h * sum_j coeffs[j] * ks[j]: the increment summed in y's dtype, then added to y once.

    Once, not stage by stage: every addition into y rounds to y's precision, and with an fp32 state
    the increments of a small step are a tiny fraction of |y| -- four roundings per rk4 step drifted
    14x further than one (rampde_rk4 on a field with f ~ 0.2, y ~ 4, 700 steps: 1.9e-5 relative against
    1.4e-6).  The sum itself is formed in y's dtype (fp32 under a bf16/fp16 policy), never in the
    stages' low precision.  Op count as before (the tiny field of problem (b) is per-op overhead): the
    sum is taken relative to its first weight, which the final addition applies."""
    if isinstance(h, float):
        idx, w0, rel = _relative_weights(coeffs if isinstance(coeffs, tuple) else tuple(coeffs), len(ks))
        if not idx:
            return y
        if len(idx) == 1:
            return torch.add(y, ks[idx[0]], alpha=h * w0)
        return torch.add(y, _lincomb([ks[j] for j in idx], rel, dtype=y.dtype), alpha=h * w0)
    comb = _lincomb(ks, coeffs, dtype=y.dtype)
    return y if comb is None else torch.addcmul(y, h, comb)


class StepData:
    """One step as the output plans see it: times, states, stage values and a lazy end slope."""

    __slots__ = ("t0", "t1", "h", "y0", "y1", "ks", "_prob", "_f1", "_f0")

    def __init__(self, prob, t0, t1, h, y0, y1, ks):
        self.t0, self.t1, self.h, self.y0, self.y1, self.ks = t0, t1, h, y0, y1, ks
        self._prob, self._f1, self._f0 = prob, None, None

    def f_start(self) -> torch.Tensor:
        """f(t0, y0): the first stage of an explicit (or ESDIRK) step; evaluated once otherwise."""
        prob = self._prob
        if prob.tableau.explicit_first_stage:
            return self.ks[0]
        if self._f0 is None:
            with prob.autocast():
                self._f0 = prob.f(_inside(prob, self.t0, math.inf), self.y0).to(prob.policy.state_dtype)
            prob.nfe_extra += 1
        return self._f0

    def stage_state(self, i: int) -> torch.Tensor:
        """The state stage ``i`` was evaluated at, ``y0 + h sum_j a_ij k_j`` (diagonal included)."""
        tab = self._prob.tableau
        h = self.h.to(self.y0.dtype) if isinstance(self.h, torch.Tensor) else self.h
        if isinstance(h, torch.Tensor) and h.ndim:  # per sample: broadcast over the features
            h = h.reshape(*h.shape, *([1] * (self.y0.ndim - 1)))
        z = self.y0
        for a, k in zip((*tab.a[i], tab.diag[i]), self.ks):
            if a != 0.0:
                z = z + (h * a) * k
        return z

    def hermite(self, t) -> torch.Tensor:
        """The cubic Hermite interpolant through ``(y0, f_start)`` and ``(y1, f_end)`` at ``t`` (shared
        time: the dense output of an adaptive step without a better one)."""
        s = ((t - self.t0) / (self.t1 - self.t0)).to(self.y0.dtype)
        dt = self.h.to(self.y0.dtype)
        return ((1 + 2 * s) * (1 - s) ** 2 * self.y0 + s * (1 - s) ** 2 * dt * self.f_start()
                + s * s * (3 - 2 * s) * self.y1 + s * s * (s - 1) * dt * self.f_end())

    def f_end(self) -> torch.Tensor:
        """f(t1, y1) in the state dtype, evaluated once (cubic Hermite output needs it)."""
        if self._f1 is None:
            prob = self._prob
            with prob.autocast():
                self._f1 = prob.f(_inside(prob, self.t1, -math.inf), self.y1).to(prob.policy.state_dtype)
            prob.nfe_extra += 1
        return self._f1


def _inside(prob, t: torch.Tensor, toward: float) -> torch.Tensor:
    """``t`` moved one representable time into the step under ``perturb`` (a field that jumps at grid
    points is evaluated on the step's side, as its stages are); the nudge is a constant for gradients."""
    if not prob.perturb:
        return t
    nudged = prob.nudge(t, toward)
    return t + (nudged - t).detach()


def _bad_velocity(k, y, t) -> None:
    """The field's result must be a real floating tensor of the state's shape, at every evaluation.

    A broadcastable shape (a (1,) result for a (3,) state) would otherwise be summed into the state
    without a word; an integer or complex result would be cast."""
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"the vector field must return a tensor, got {type(k).__name__} (at t = {float(t.min()):.6g})")
    if not k.dtype.is_floating_point:
        raise TypeError(f"the vector field must return a real floating-point tensor, got {k.dtype} (at t = {float(t.min()):.6g})")
    if k.shape != y.shape:
        raise ValueError(
            f"the vector field returned shape {tuple(k.shape)} for a state of shape {tuple(y.shape)} "
            f"(at t = {float(t.min()):.6g}); it must return the state's shape"
        )


def _check_velocity(k, y, t):
    """``k`` if it is a real floating tensor of ``y``'s shape, else the error (see :func:`_bad_velocity`)."""
    if type(k) is not torch.Tensor or k.shape != y.shape or not k.dtype.is_floating_point:
        _bad_velocity(k, y, t)
    return k


class Stepper:
    """The stepper protocol (with the defaults of a stepper that cannot fail).

    * ``step(y, times, h, k0=None, f=None) -> (y_next, stages)``: one step from ``y`` (state dtype)
      with stage times ``times``; ``h`` a Python float (shared time, no time gradient) or a tensor
      broadcasting against ``y``; ``k0`` a first stage already evaluated (FSAL, carried); ``f`` the
      field to evaluate stages with (default the solve's; stage-wise tapes pass theirs);
    * ``filter_error(err)``: the error estimate the controller sees (an implicit stepper filters its
      stiff components);
    * ``failed``: after a per-sample step, the groups whose step failed (None: none can fail);
      ``reject_per_sample``: set by the per-sample adaptive driver (fail a group, not the batch);
    * ``deterministic(replay, run)``: run a forward, refusing fields this stepper cannot honour;
    * ``implicit``: Newton per stage -- no stage-wise VJPs, no shared per-step weight casts.
    """

    implicit = False
    failed = None
    reject_per_sample = False

    def __init__(self, prob, options=None):
        self.prob = prob

    def step(self, y, times, h, k0=None, f=None):  # pragma: no cover - protocol
        raise NotImplementedError

    def filter_error(self, err: torch.Tensor) -> torch.Tensor:
        return err

    def deterministic(self, replay, run):
        return run()


class ExplicitStepper(Stepper):
    """An explicit Runge--Kutta step: ``k_i = f(t_n + c_i h, y_n + h sum_j a_ij k_j)``, every
    combination formed in the state dtype."""

    def step(self, y, times, h, k0=None, f=None):
        prob = self.prob
        f, tab, state_dtype = f or prob.f, prob.tableau, prob.policy.state_dtype
        ks: list[torch.Tensor] = []
        for i in range(tab.stages):
            if i == 0 and k0 is not None:
                ks.append(k0)
                continue
            yi = _axpy(y, h, ks, tab.a[i]) if i else y
            k = f(times[i], yi)
            if type(k) is not torch.Tensor or k.shape != y.shape or not k.dtype.is_floating_point:
                _bad_velocity(k, y, times[i])
            if k.dtype != state_dtype:
                # Velocities may come back in fp16/bf16; every combination is formed in the state
                # dtype (a 0-d h would not promote a half-precision k).
                k = k.to(state_dtype)
            ks.append(k)
        return _axpy(y, h, ks, tab.b), ks


#: kind -> (factory, which tableaus it steps); the latest registration that applies wins
_STEPPERS: dict[str, tuple[Callable, Callable]] = {}


def register_stepper(kind: str, factory: Callable, applies: Callable[[object], bool]) -> None:
    """Make ``factory(prob, options) -> Stepper`` the stepper of kind ``kind`` for the tableaus
    ``applies(tableau)`` accepts.  A new stepper is its module plus this call: :func:`make_stepper`
    asks the registered steppers, latest first, which one steps a tableau (re-registering a kind
    replaces it)."""
    if not callable(factory) or not callable(applies):
        raise TypeError(f"register_stepper({kind!r}, ...): the factory and applies must be callable")
    _STEPPERS.pop(kind, None)
    _STEPPERS[kind] = (factory, applies)


def unregister_stepper(kind: str) -> None:
    """Remove the stepper of kind ``kind`` (a later registration of the tableaus it stepped wins again)."""
    if kind not in _STEPPERS:
        raise ValueError(f"unregister_stepper({kind!r}): no such stepper; registered: {', '.join(_STEPPERS)}")
    del _STEPPERS[kind]


def stepper_kind(tableau) -> str:
    """The kind of the stepper that steps ``tableau`` (the latest registered one that applies)."""
    for kind, (_, applies) in reversed(_STEPPERS.items()):
        if applies(tableau):
            return kind
    raise ValueError(f"no registered stepper steps tableau {tableau.name!r} "
                     f"(registered: {', '.join(_STEPPERS) or 'none'})")


def make_stepper(prob, options=None) -> Stepper:
    """The registered stepper for ``prob.tableau``."""
    return _STEPPERS[stepper_kind(prob.tableau)][0](prob, options)


register_stepper("explicit", ExplicitStepper, lambda tableau: not tableau.implicit)
