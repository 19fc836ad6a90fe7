"""Tapes: one or more consecutive steps rebuilt with an autograd graph, ready for one VJP.

The reverse sweep (``_adjoint``) consumes tapes; checkpoint schedules (``_schedules``) decide when a
tape is built -- in the forward (``graphs``, revolve's last step) or in the backward from a kept
state -- and the same :func:`build_tape` builds it in both places, so that a step's graph is the
same function whichever schedule ran.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .._probe import sequence_mark
from .._watch import FieldWatch, storage_key
from ._stagewise import stage_field
from ._steppers import StepData
from ._times import _StepTable


class Frame:
    """What tapes of one solve share: the detached grid and output times, its stage-time table, and
    which time gradients are needed."""

    __slots__ = ("grid", "t_out", "table", "need_grid", "need_tout", "need_time")

    def __init__(self, prob, grid, t_out, y_like, need_grid: bool, need_tout: bool):
        self.grid, self.t_out = grid.detach(), t_out.detach()
        self.table = _StepTable(prob, self.grid, y_like)
        self.need_grid, self.need_tout = bool(need_grid), bool(need_tout)
        self.need_time = self.need_grid or self.need_tout


class FirstStage:
    """A step's first stage evaluated with a graph *before* the step is tried (``"graphs"`` on
    adaptive steps): the value the controller needs before it proposes a step (torchdiffeq's and
    torchode's ``f0``, or the first stage after a jump), evaluated once, as the host evaluates it,
    and reused by every trial of the step -- a trial's tape starts from these leaves and this value
    instead of evaluating the stage again (which would be an evaluation the host does not make:
    another BatchNorm update, other dropout masks)."""

    __slots__ = ("y_leaf", "t_leaf", "k", "mark")

    def __init__(self, prob, t, y, *, need_time: bool, nudge_next: bool = False, check=None, watch: bool = False):
        self.mark = sequence_mark()
        state_dtype = prob.policy.state_dtype
        seen = FieldWatch((y, t)) if watch else contextlib.nullcontext()
        with torch.enable_grad(), prob.graph_autocast(), seen:
            self.y_leaf = y.detach().to(state_dtype).requires_grad_(True)
            self.t_leaf = t.detach().clone().requires_grad_(True) if need_time else None
            ti = self.t_leaf if need_time else t.detach()
            if nudge_next:  # the first stage past a discontinuity: on its far side (a constant nudge)
                ti = ti + (prob.nudge(ti, math.inf) - ti).detach()
            k = prob.f(ti, self.y_leaf)
            if check is not None:
                k = check(k, self.y_leaf, ti)
            self.k = k.to(state_dtype)
        if watch:
            prob.created_inside |= seen.created
            if prob.replay is not None:  # a closure's writes are put back as module buffers are
                prob.replay.adopt(seen.external_writes())


class Tape:
    """Steps ``n0 .. n1-1`` with a graph: leaves (state, carried first stage, time points), the end state
    ``y_end``, the last stage ``k_last`` (the root of a carried first stage of step ``n1``) and the
    outputs evaluated inside (``outs``: (entry, values, time leaves) per step)."""

    __slots__ = ("n0", "n1", "y_leaf", "k0_leaf", "pts", "y_end", "k_last", "ks", "outs", "ys", "mark",
                 "nfe", "checked", "nbytes", "h")

    def clear(self) -> None:
        """Drop every reference into the graph (it is freed once the VJP has run)."""
        self.y_leaf = self.k0_leaf = self.pts = self.y_end = self.k_last = self.ks = self.outs = self.ys = self.h = None


def build_tape(prob, frame, n0: int, n1: int, y: torch.Tensor, k0, *, replay: bool, points=None,
               stored=None, first: FirstStage | None = None, step=None) -> Tape:
    """Steps ``n0 .. n1-1`` from state ``y`` (and carried first stage ``k0`` of step n0, or None).

    ``stored``: ``stored(n) -> (state, carried first stage or None)`` kept for each step: every step
    after the first then starts from its stored values, joined to the previous step's end by an
    identity for the adjoint (:class:`_Rebase`) -- the steps of ``"steps"``, reversed in one VJP.
    Without it the steps are chained (segments, binomial).

    ``replay``: restore each step's random numbers and buffers first (a recomputation; a tape built
    in the forward is the first run).  ``points``: ``[t_n0, t_n0+1]`` of an adaptive trial, whose
    grid is not known yet (``frame`` then only says which time gradients are needed, a
    :class:`TimeNeeds`); the trial's stage values stay in ``tape.ks`` for its error estimate and
    the outputs evaluated once it is accepted (:func:`add_tape_outputs`), until the driver drops them.
    ``first``: step n0's first stage, already evaluated with a graph (:class:`FirstStage`); the tape
    starts from its leaves.  ``step``: with ``points``, the step size the untaped forward takes
    (the controller's ``h``, of which ``t1 - t0`` is a rounding): the taped step uses its value, so
    that it forms exactly the untaped step, while a time gradient still flows through ``t1 - t0``.
    """
    state_dtype = prob.policy.state_dtype
    outputs, tab = prob.outputs, prob.tableau
    rp = prob.replay if replay and prob.replay is not None and prob.replay.active else None
    tape = Tape()
    tape.n0, tape.n1, tape.nfe, tape.checked, tape.nbytes = n0, n1, 0, False, 0
    # autograd nodes numbered below were created before this tape (or its pre-evaluated first stage)
    tape.mark = first.mark if first is not None else sequence_mark()
    keep_ys = prob.callback_step_adjoint is not None or prob.callback_accept_step_adjoint is not None
    stages = _stagewise(prob)
    step_casts = None if stages else _step_cast_dtype(prob)
    # the forward's first taped step is watched: leaves the field creates are its own (check_tape)
    seen = FieldWatch((y,)) if not replay and n0 == 0 else contextlib.nullcontext()
    with torch.enable_grad(), prob.graph_autocast(), seen:
        y_leaf = first.y_leaf if first is not None else y.detach().to(state_dtype).requires_grad_(True)
        k0_leaf = None if k0 is None or first is not None else k0.detach().to(state_dtype).requires_grad_(True)
        pts = None
        if frame.need_time:
            src = points if points is not None else [frame.grid[m] for m in range(n0, n1 + 1)]
            pts = [p.detach().clone().requires_grad_(True) for p in src]
            if first is not None:
                pts[0] = first.t_leaf
        cur, k, ks, outs, ys = y_leaf, (first.k if first is not None else k0_leaf), None, [], []
        fresh = True  # no buffer restored yet in this tape
        for n in range(n0, n1):
            if frame.need_time:
                t0, t1 = pts[n - n0], pts[n - n0 + 1]
                h = t1 - t0
                if step is not None:  # exactly ``step`` (their difference is exact: Sterbenz)
                    h = h + (torch.as_tensor(step, dtype=h.dtype, device=h.device) - h).detach()
                stage_t = prob.stage_times(t0, t1, h, True if n in prob.first_next_steps else None)
                hs = prob.h_for_state(h, cur)
            elif points is not None:
                t0, t1 = points
                h = t1 - t0 if step is None else torch.as_tensor(step, dtype=t1.dtype, device=t1.device)
                stage_t = prob.stage_times(t0, t1, h, True if n in prob.first_next_steps else None)
                hs = float(h) if h.ndim == 0 else prob.h_for_state(h, cur)  # per sample: a (B, 1, ..) tensor
            else:
                t0, t1 = frame.grid[n], frame.grid[n + 1]
                stage_t, hs = frame.table[n]
                h = frame.table.h_at(n)
            if stored is not None and n > n0:
                y_n, k_n = stored(n)
                cur = _Rebase.apply(cur, y_n.to(state_dtype))
                if k is not None and k_n is not None:
                    k = _Rebase.apply(k, k_n.to(state_dtype))
            if keep_ys:
                ys.append(cur.detach())
            field = stage_field(prob, n, t0, prob.replay) if stages else None
            if rp is not None:
                if k is None and (n, "k0") in rp.tokens:
                    # a first stage the forward evaluated before this step's trial (adaptive steps);
                    # stage-wise, it too is a stage that keeps only its inputs (a graph of its own
                    # would hold the buffers the later stages write in place)
                    rp.restore((n, "k0"), buffers=fresh)
                    fresh = False
                    k = (field or prob.f)(stage_t[0], cur).to(state_dtype)
                    tape.nfe += 1
                # Buffers are put back once per tape: after that, the recomputation writes exactly
                # what the forward wrote, and writing it again in place would invalidate the values
                # this tape's graph saved (BatchNorm saves its running statistics).
                rp.restore(n, buffers=fresh)
                fresh = False
            if stages:
                y_next, ks = prob.step(cur, stage_t, hs, k, f=field)
            elif step_casts is None:
                y_next, ks = prob.step(cur, stage_t, hs, k)
            else:
                y_next, ks = _step_with_cast_cache(prob, step_casts, cur, stage_t, hs, k)
            tape.nfe += tab.stages - (k is not None)
            entry = outputs.steps.get(n)
            if entry is not None:
                t_leaves = outputs.times(entry, frame.t_out, frame.need_tout)
                sd = StepData(prob, t0, t1, h, cur, y_next, ks)
                with prob.full_precision():
                    values = outputs.evaluate(entry, sd, t_leaves)
                outs.append((entry, values, t_leaves))
            # (formed here, in grad mode: the carried stage is a root of the VJP)
            k_last = prob.carry_out(ks, hs)
            k = k_last if n + 1 < n1 and prob.carried_k0.carries(n + 1) else None
            cur = y_next
    if isinstance(seen, FieldWatch):
        prob.created_inside |= seen.created
        if prob.replay is not None:  # (a closure's in-place writes: an implicit method then refuses the field)
            prob.replay.adopt(seen.external_writes())
    tape.y_leaf, tape.k0_leaf, tape.pts = y_leaf, k0_leaf, pts
    # A tape kept until the backward ("graphs") keeps what it holds alive that long: an empty tuple
    # instead of an empty list is one Python object fewer per step for the garbage collector to
    # carry into its oldest generation (an adaptive trial's list stays: outputs are added to it).
    tape.y_end, tape.k_last = cur, k_last
    tape.outs = outs if outs or points is not None else ()
    tape.ys = ys if keep_ys else ()
    tape.ks = ks if points is not None else None
    tape.h = h if points is not None else None  # an adaptive trial's step size, for its outputs
    return tape


class _Rebase(torch.autograd.Function):
    """The value of ``stored``, the gradient of ``chained``: step n+1 of a grouped tape starts from
    its stored state exactly (``chained + (stored - chained).detach()`` could round), while the
    adjoint flows to step n's end as through the identity -- what one VJP per step passes on."""

    @staticmethod
    def forward(ctx, chained, stored):
        return stored.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _stagewise(prob) -> bool:
    """Does this solve's schedule reverse explicit steps stage by stage (``_stagewise``)?  (Implicit
    methods refuse ``stages=True`` when the solve is set up.)"""
    return getattr(prob.schedule, "stages", False)


def _step_cast_dtype(prob):
    """The compute dtype whose weight casts are shared by the stages of one step, or None.

    Explicit Runge--Kutta steps only: an implicit stepper's Newton iterations evaluate the field many
    times per step, and its graph is its own business (``_implicit``)."""
    return None if prob.stepper.implicit else prob.policy.compute_dtype


def _step_with_cast_cache(prob, dtype, y, stage_t, hs, k0):
    """One step's stages inside an autocast region whose weight-cast cache lives for this step only.

    Numerics.  Without the cache every use of an fp32 weight gets its own cast, so each stage's
    weight gradient (rounded to the compute dtype once, by its matmul) is converted to fp32 before it
    is summed with anything.  With a per-step cache the ``s`` stages of a step share one cast: autograd
    sums their gradients at that cast in the compute dtype (``s - 1`` additions, 3 for RK4, each
    rounding to bf16/fp16), converts the step's sum to fp32 once, and the sum over *steps* -- the sum
    whose bf16 rounding makes plain autocast's parameter gradient O(1) wrong after thousands of
    steps -- stays in fp32 (the adjoint sweep's ``g_params``).  Measured on the benchmark's problem
    (a) (bf16, 50 RK4 steps, relative to fp64): 1.71e-3 per use, 1.78e-3 per step; torchdiffeq
    under autocast (one cast for the whole solve): 9.4e-2.  Cost: 1 cast and 1 cast-back per weight
    and step instead of per stage (the benchmark's MLP: 16 -> 4 of each per step).

    The forward values are unchanged (a cast is deterministic), and every schedule builds its tapes
    here, so the gradient is still the same whichever schedule ran.

    The cache is cleared on entry and on exit: a cast cached before the step (an enclosing
    autocast region of the caller's, or the driver's no-graph steps) must not be used in this step's
    graph, and this step's casts -- nodes of its graph -- must not be reused by the next step or by
    the caller's code after the solve.  (Clearing also drops an enclosing region's own cached casts;
    that region then casts again: values unchanged.)
    """
    with torch.autocast(prob.device_type, dtype=dtype, cache_enabled=True):
        torch.clear_autocast_cache()
        try:
            return prob.step(y, stage_t, hs, k0)
        finally:
            torch.clear_autocast_cache()


class TimeNeeds:
    """Which time gradients a tape's backward needs (what :class:`Frame` says, for tapes built before
    the grid is known: adaptive trial steps)."""

    __slots__ = ("need_time", "need_tout")

    def __init__(self, need_grid: bool, need_tout: bool):
        self.need_time, self.need_tout = bool(need_grid or need_tout), bool(need_tout)


def add_tape_outputs(prob, tape: Tape, entry, t_out, t0, t1, needs: TimeNeeds):
    """Evaluate an accepted trial's outputs inside its graph (as :func:`build_tape` evaluates a
    step's outputs); returns the (differentiable) values."""
    outputs = prob.outputs
    with torch.enable_grad(), prob.graph_autocast():
        t_leaves = outputs.times(entry, t_out, needs.need_tout)
        if tape.pts is not None:
            t0, t1 = tape.pts
        sd = StepData(prob, t0, t1, t1 - t0 if tape.h is None else tape.h, tape.y_leaf, tape.y_end, tape.ks)
        with prob.full_precision():
            values = outputs.evaluate(entry, sd, t_leaves)
    tape.outs.append((entry, values, t_leaves))
    return values


def tape_roots(tape: Tape, a, a_k, g, outputs):
    """(roots, cotangents) of a tape: the end state against the adjoint, the carried last stage
    against its cotangent from the next step, the outputs against the loss's cotangents."""
    # A root without a graph depends on nothing the VJP differentiates (a field of t alone, whose
    # times need no gradient: its stages, hence the carried last stage and outputs formed from stages
    # only, are constants); its cotangent contributes nothing and autograd refuses it as a root.
    # The end state always has one: it is y_leaf plus the increment.
    roots, cot = [tape.y_end], [a]
    if a_k is not None and tape.k_last.requires_grad:  # the next step started from this tape's last stage
        roots.append(tape.k_last)
        cot.append(a_k)
    for entry, values, _ in tape.outs:
        for v, c in zip(values, outputs.cotangents(g, entry) if g is not None else [None] * len(values)):
            if v is tape.y_end:  # an output that is the end state itself: fold its cotangent in
                if c is not None:
                    cot[0] = cot[0] + c
            elif v.requires_grad:
                roots.append(v)
                cot.append(c)
    return roots, cot


def tape_inputs(tape: Tape, diff_params, frame: Frame):
    inputs = [tape.y_leaf, *diff_params]
    if tape.k0_leaf is not None:
        inputs.append(tape.k0_leaf)
    if frame.need_time:
        inputs += tape.pts
        if frame.need_tout:
            inputs += [tl for _, _, t_leaves in tape.outs for tl in t_leaves if tl is not None]
    return inputs


def check_tape(prob, tape: Tape, diff_params, frame: Frame, where) -> None:
    """The hidden-tensor walk over a tape built in the forward, for the solve's first step only: it
    raises there, as the first-stage probe does for the schedules that tape nothing in the forward.

    A later step's tape is left unchecked (``tape.checked`` False): the sweep walks it right before
    its VJP and raises after it (:meth:`_adjoint._Sweep.reverse`), exactly as it walks a recomputed
    step -- so a tensor used only for ``t > 0.5`` is reported at the same step, in the backward, with
    every schedule.  Why not here: walking a graph from Python gives each of its autograd nodes a
    Python object, which lives as long as the node.  Walked in the forward, a kept graph's node
    objects (about 50 per step of the benchmark's MLP) live until the backward, survive into the
    garbage collector's oldest generation and trigger its full collections (~150 ms each with torch
    imported): measured with problem (a)'s field at 400 steps (batch 4), 5 full collections in 20
    iterations and 800 ms of collection in all, against 1 and 160 ms with the walk in the backward,
    where the objects die right after the VJP.  The walk itself costs the same in either place.  (As
    with every schedule, steps after the last output with a non-zero cotangent are not reversed, so
    not walked either.)
    """
    if tape.n0 > 0:
        return
    roots, _ = tape_roots(tape, None, None, None, prob.outputs)
    refs, outside = prob.check.scan(roots, tape_inputs(tape, diff_params, frame), tape.mark)
    del roots
    prob.check.raise_if_hidden(refs, outside, where, internal=lambda v: storage_key(v) in prob.created_inside)
    tape.checked = True
