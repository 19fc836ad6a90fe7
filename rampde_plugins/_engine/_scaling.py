"""Adjoint scaling: how one VJP of the reverse sweep is taken (a strategy of the sweep).

``start(cotangent)`` before the sweep, ``vjp(roots, inputs, cotangents, starts, where)`` per tape
(returns the *unscaled* gradients' factor with them), ``finish()`` after it.  Two strategies:

* :class:`NoScaling` -- one ``autograd.grad``; bf16/fp32/fp64 policies (no fp16 range problem);
* :class:`DynamicScaling` -- the fp16 policy's rule (see :mod:`rampde_plugins._scaler` for the
  numerics): cotangents multiplied by a power of two ``S``; a VJP with inf/NaN is redone with
  ``S`` backed off (its graph is kept for the retry); ``S`` grows back while the scaled adjoint is
  small.  The caller multiplies the results by ``1/S`` in fp32 -- exact for powers of two.
"""

from __future__ import annotations

import math

import torch

from .._scaler import AdjointScaler


class NoScaling:
    """The plain VJP: cotangents as they are, the graph freed by the call."""

    scale = 1.0
    retains_graph = False
    #: one VJP per step wanted ("steps" does not group its steps)
    per_step = False

    def start(self, cotangent: torch.Tensor) -> None:
        pass

    def vjp(self, roots, inputs, cotangents, starts, where: str, dtype):
        grads = torch.autograd.grad(roots, inputs, [c.to(dtype) for c in cotangents], allow_unused=True)
        return grads, 1.0

    def finish(self, record) -> None:
        record.final_scale = None


class DynamicScaling:
    """fp16's dynamic adjoint scale with per-tape retries (``scaler``: the persistent one, or a fresh
    one from the policy's settings)."""

    retains_graph = True  # a retry needs the same graph again
    # The scale follows the adjoint's size tape by tape (and grows after clean tapes): over a group of
    # 16 steps the adjoint can shrink by orders of magnitude under one scale and underflow fp16 inside
    # the VJP (measured: the range-stress problem's gradient error went from 1.7e-3 to 6e-2).  So
    # "steps" keeps one step per VJP under dynamic scaling.
    per_step = True

    def __init__(self, scaler: AdjointScaler, n_steps: int, record):
        self.scaler, self.n_steps, self.record = scaler, n_steps, record
        self.max_retries = scaler._config.max_retries
        self.scale, self.clean_run, self.backoffs, self.redone = 1.0, 0, 0, 0
        self.done = 0
        self.first_clean_scale, self.first_backoffs = None, 0

    def start(self, cotangent: torch.Tensor) -> None:
        amax = float(cotangent.abs().amax()) if cotangent.numel() else 0.0  # one sync per backward
        self.scale = self.scaler._start(amax)
        self.record.initial_scale = self.scale

    def vjp(self, roots, inputs, cotangents, starts, where: str, dtype):
        for attempt in range(self.max_retries + 1):
            scale = self.scale
            scaled = [(c * scale if scale != 1.0 else c).to(dtype) for c in cotangents]
            grads = torch.autograd.grad(roots, inputs, scaled, allow_unused=True, retain_graph=True)
            # One host synchronisation per tape: are all results finite, and how large is the scaled
            # adjoint (for the growth rule)?
            present = [g for g in grads if g is not None]
            probe = torch.stack([torch.stack([g.abs().amax().float() for g in present]).amax(), grads[0].abs().amax().float()])
            worst, scaled_amax = probe.tolist()
            if math.isfinite(worst):
                break
            # NaN/inf already in what this tape starts from (the forward, the loss, a later step) is
            # not an fp16 overflow of this VJP: halving the scale cannot help, so it propagates as with
            # every other policy.  Checked only on this failure path.
            if not all(bool(torch.isfinite(x.detach()).all()) for x in (*starts, *cotangents, *roots)):
                break
            if attempt == self.max_retries:
                raise FloatingPointError(
                    f"fp16 adjoint overflow at {where} of {self.n_steps}: the VJP is still inf/nan after "
                    f"{self.max_retries} halvings of the adjoint scale (now {scale:g}). The vector field's "
                    "backward overflows fp16 even for small cotangents; use precision='bf16' (fp32 range) "
                    "or 'fp32', or bound the network's activations."
                )
            self.scale *= self.scaler._config.backoff_factor
            self.backoffs += 1
            self.clean_run = 0
        if attempt:
            self.redone += 1
        if self.done == 0:
            # What a persistent scaler carries to the next iteration: the scale that ran the *first*
            # backward tape cleanly.  The next backward also starts at t_N with a terminal cotangent
            # of similar size; the end-of-pass scale belongs to the adjoint at t_0.
            self.first_clean_scale, self.first_backoffs = scale, attempt
        self.done += 1
        inv = 1.0 / scale
        self.clean_run += 1
        self.scale, self.clean_run = self.scaler._grow(self.scale, scaled_amax, self.clean_run)
        return grads, inv

    def finish(self, record) -> None:
        if self.done:
            self.scaler._finish(self.first_clean_scale, self.backoffs, self.first_backoffs)
        else:
            self.scaler._finish(self.scale, self.backoffs, 0)
        record.scale_backoffs += self.backoffs
        record.redone_steps += self.redone
        record.final_scale = self.scale


def _dynamic_scaler(policy, scaler: AdjointScaler | None) -> AdjointScaler | None:
    """The enabled scaler a backward under ``policy`` scales with, or None (the plain VJP)."""
    if policy.scaling == "dynamic":
        s = scaler if scaler is not None else AdjointScaler._from_config(policy.scaler)
        if s.is_enabled():
            return s
    return None


def make_scaling(policy, scaler: AdjointScaler | None, n_steps: int, record):
    """The scaling strategy of a backward: dynamic for a policy that asks for it and a scaler that is
    enabled, the plain VJP otherwise."""
    s = _dynamic_scaler(policy, scaler)
    return NoScaling() if s is None else DynamicScaling(s, n_steps, record)


def scales_per_step(policy, scaler: AdjointScaler | None) -> bool:
    """Will this solve's backward want one VJP per step (the ``per_step`` of its scaling strategy)?
    Known before the forward, for the schedules that decide then how many steps one tape holds."""
    return (NoScaling if _dynamic_scaler(policy, scaler) is None else DynamicScaling).per_step
