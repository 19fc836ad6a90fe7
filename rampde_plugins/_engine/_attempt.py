"""One step attempt: the routine both adaptive drivers (shared time, per-sample time) call for a trial.

A trial is the stepper's step (:meth:`Stepper.step`) from ``(t, y)`` to ``t1 = t + h`` -- with a
graph when the schedule keeps the trial's tape (``"graphs"``), without one otherwise -- followed by
what every adaptive loop needs to judge it:

* an implicit stage whose Newton iteration did not converge is a rejected trial, not an error: for
  the whole batch (:class:`NewtonFailure`: an infinite error estimate, which every controller
  answers with a smaller step) or, per sample, for the samples the stepper reports as failed (their
  state kept and an error the controller rejects);
* the embedded error estimate ``h * sum_i b_err_i k_i`` as the stepper filters it;
* the hidden-tensor check of the trial's graph when the forward watches for one.

The loops differ in how they choose ``h``, accept, land on outputs and carry the first stage; the
trial itself is this one function.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ._implicit import NewtonFailure
from ._steppers import _lincomb
from ._tape import FirstStage, Tape, TimeNeeds, build_tape

__all__ = ["Attempt", "attempt_step"]


class Attempt(NamedTuple):
    """A trial step: its end state, stages, error estimate, tape (taped trials), the whole-batch
    Newton failure (or None), the samples whose Newton iteration failed (or None) and the field
    evaluations it made."""

    y1: torch.Tensor
    ks: list
    err: torch.Tensor
    tape: Tape | None
    failure: NewtonFailure | None
    failed: torch.Tensor | None
    nfe: int


def attempt_step(prob, needs: TimeNeeds, n: int, y: torch.Tensor, t, t1, h, *, h_state, k0, carried: bool,
                 first: FirstStage | None, taping: bool, jump: bool | None = None, watch: bool = False,
                 where: Callable[[], str] | str = "", running: torch.Tensor | None = None,
                 rejecting_error: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Attempt:
    """Try step ``n`` from ``(t, y)`` to ``t1`` with step size ``h``.

    Args:
        h_state: the step size as the stages combine it (a number, or per sample a tensor shaped to
            broadcast against ``y``); the error estimate is scaled by it too.
        k0: the first stage when it is known before the trial (carried from the previous step, or
            evaluated before it); ``carried``: it is the previous step's last stage (a taped trial
            then starts from it as a leaf).  ``first``: a first stage evaluated with a graph
            (:class:`FirstStage`) the taped trial starts from.
        jump: the first stage lies past a discontinuity (its time nudged to the far side).
        watch, where: scan the trial's graph for hidden tensors (``where`` ends the error message).
        running, rejecting_error: per-sample steps: the samples still running, and the error that
            makes the controller reject a sample whose Newton iteration failed.
    """
    tab = prob.tableau
    failure = failed = tape = None
    try:
        if taping:
            tape = build_tape(prob, needs, n, n + 1, y, k0 if carried else None, replay=False, points=(t, t1),
                              first=first, step=h)
            y1, ks = tape.y_end.detach(), [k.detach() for k in tape.ks]
            nfe = tape.nfe
        else:
            y1, ks = prob.step(y, prob.stage_times(t, t1, h, jump), h_state, k0)
            nfe = tab.stages - 1
    except NewtonFailure as exc:  # an implicit stage did not converge: the trial is rejected
        failure, tape, nfe = exc, None, 0
        prob.record.newton_failures += 1
        y1, ks = y, [k0] * tab.stages
    if failure is None and running is not None and prob.stepper.failed is not None:
        failed = prob.stepper.failed & running
        prob.record.newton_failures += int(failed.sum())
    if watch and y1.requires_grad:
        refs, outside = prob.check.scan([y1], (y,))
        y1, ks = y1.detach(), [k.detach() for k in ks]
        prob.check.raise_if_hidden(refs, outside, where)
    if failure is not None:
        err = torch.full_like(y, math.inf)  # every controller shrinks the step on it
    else:
        err = _lincomb(ks, tab.b_err)
        err = torch.zeros_like(y) if err is None else err * h_state
        err = prob.stepper.filter_error(err)
    if failed is not None:
        rows = failed.reshape(-1, *([1] * (y.ndim - 1)))
        y1 = torch.where(rows, y, y1)
        err = torch.where(rows, rejecting_error(y), err)
    return Attempt(y1, ks, err, tape, failure, failed, nfe)
