"""Forward drivers: the fixed-grid loop and the two adaptive loops (shared and per-sample time)."""

from __future__ import annotations

import math

import torch

from .._storage import ChunkedStore
from ._problem import _check_storage, _Problem, _probe_first, _with_replay
from ._implicit import NewtonFailure
from ._attempt import attempt_step
from ._steppers import StepData, _check_velocity
from ._tape import FirstStage, Frame, TimeNeeds, add_tape_outputs, build_tape, check_tape
from ._budget import MemoryBudget, resolve_budget, tape_nbytes
from ._scaling import scales_per_step
from ._schedules import GROUP_MAX


def _forward(prob: _Problem, y0, grid, t_out, *, keep: bool):
    """Run the grid forward without an adjoint graph (but for the tapes its schedule builds now).

    Returns (solution, the schedule's keeper or None)."""
    if keep and isinstance(prob.schedule, MemoryBudget):
        resolve_budget(prob, y0, grid[:2], prob.n_steps,
                       (grid.numel() * grid.element_size() + t_out.numel() * t_out.element_size(), 0))
    schedule_replays = keep and prob.schedule.replays_steps(prob.n_steps)
    sol = _with_replay(prob, lambda replaying: _forward_once(prob, y0, grid, t_out, keep, replaying), schedule_replays)
    keeper = prob.keeper if keep else None
    if keep:
        _check_storage(prob, keeper, grid)
        keeper.end_forward(prob.n_steps)
    return sol, keeper


def _forward_once(prob: _Problem, y0, grid, t_out, keep: bool, replaying: bool):
    pol, tab, outputs = prob.policy, prob.tableau, prob.outputs
    state_dtype = pol.state_dtype
    n_steps = prob.n_steps
    y = y0.detach().to(state_dtype)
    keeper = prob.keeper = prob.schedule.keeper(n_steps, pol.storage) if keep else None
    replay = prob.replay if keep and prob.schedule.replays_steps(n_steps) else None
    # The first stage is probed (with a graph) unless the first step's whole graph is built now.
    probe = keep and not keeper.tape_now(0)
    # Without an adjoint graph but in grad mode, a field whose output requires grad uses a tensor
    # rampde does not know about: it is reported, not silently differentiated by plain autograd.
    watch = not keep and torch.is_grad_enabled()
    sol = outputs.allocate(y, pol.output)
    frame = Frame(prob, grid, t_out, y, prob.need_grid, prob.need_tout)
    grid, t_out, table = frame.grid, frame.t_out, frame.table
    # First-same-as-last: the last stage of a step is f(t_{n+1}, y_{n+1}) bit for bit (same
    # coefficients, same operation order), so it is the next step's first stage.  Not with
    # `perturb`, which evaluates the two at different sides of t_{n+1}.  For a field that is
    # replayed the value is *carried* (kept with the next step's state, its cotangent flowing into
    # this step): a recomputation would draw other random numbers than the last stage did, and
    # evaluating afresh would make the forward depend on whether a backward is to come.
    fsal = tab.fsal and not prob.perturb
    nfe = taped = 0
    k0 = None
    with prob.autocast():
        if probe:
            # The first stage, with a graph: hidden tensors are looked for, and the value is reused.
            k0 = _probe_first(prob, table[0][0][0], y)
            nfe += 1
            if replay is not None:
                if not replaying:
                    replay.detect()
                replay.put(0, replay.start_token())
            if not prob.tableau.explicit_first_stage:
                # an implicit first stage is no evaluation of f(t0, y0): the probe only checked the
                # field, and is not handed to the step as a Newton guess the untaped forward (no
                # backward to come) would not have -- the values must not depend on grad mode
                k0 = None
        carry = fsal and replay is not None and replay.active
        if carry:
            prob.carried_k0.clear()
        group = _tape_group(prob, keeper, fsal)
        if group > 1 and n_steps > 1:
            keeper.grouped = min(group, n_steps - 1)  # (SolveStats.segment_steps; the first step is its own)
        skip_to = 0
        for n in range(n_steps):
            if n < skip_to:  # (taped with an earlier step: one graph for a group of steps)
                continue
            if keeper is not None:
                carried = carry and n > 0 and k0 is not None
                if carried:
                    prob.carried_k0.mark(n)
                keeper.keep(n, y, k0 if carried else None)
            if n and replay is not None:
                replay.capture(n)
            if prob.callback_step is not None:
                prob.callback_step(grid[n], y, table.h_at(n))
            if keeper is not None and keeper.tape_now(n):
                # This step's graph is kept for the backward (the tape checks itself for hidden tensors);
                # under "graphs", with the group of steps after it that one VJP will reverse.
                # (the first step alone: its tape is checked for hidden tensors now, in the forward, and
                # only that step is watched for the leaves the field creates itself)
                n1 = min(n + group, n_steps) if n else 1
                tape = build_tape(prob, frame, n, n1, y, k0, replay=False)
                nfe += tape.nfe
                taped += n1 - n
                skip_to = n1
                check_tape(prob, tape, prob.params, frame,
                           lambda: (f" (at step {n} of {n_steps}, t = {float(grid[n].min()):.6g})" if n1 - n == 1 else
                                    f" (in steps {n} to {n1 - 1} of {n_steps}, t = {float(grid[n].min()):.6g} to "
                                    f"{float(grid[n1].max()):.6g})"))
                for entry, values, _ in tape.outs:
                    outputs.write(sol, entry, [v.detach() for v in values])
                y = tape.y_end.detach()
                if prob.measure:
                    tape.nbytes = tape_nbytes(prob, tape)
                    prob.held_graph_bytes += tape.nbytes
                # An FSAL method's next taped step starts from this one's last stage (a leaf whose
                # cotangent flows back into this graph), as the untaped forward and the host do.
                # Otherwise the last stage is no root of the VJP: dropped, it is one state less per
                # kept graph ("graphs": N states; measured on problem (a), 12.5 MiB of 261 at 50 steps).
                k0 = tape.k_last.detach() if fsal else None
                if not fsal:
                    tape.k_last = None
                keeper.put_tape(n, tape)
                del tape
                continue
            stage_t, h_n = table[n]
            try:
                y_next, ks = prob.step(y, stage_t, h_n, k0)
            except NewtonFailure as exc:  # a fixed grid cannot shrink the step: say which one it was
                raise NewtonFailure(f"{exc} [step {n} of {n_steps}]", exc.t, exc.h, exc.residual) from None
            nfe += tab.stages - (k0 is not None)
            if watch and y_next.requires_grad:
                refs, outside = prob.check.scan([y_next], (y,))
                y_next, ks = y_next.detach(), [k.detach() for k in ks]
                prob.check.raise_if_hidden(refs, outside, f" (at step {n}, t = {float(grid[n].min()):.6g})")
            entry = outputs.steps.get(n)
            if entry is not None:
                sd = StepData(prob, grid[n], grid[n + 1], table.h_at(n), y, y_next, ks)
                with prob.full_precision():
                    values = outputs.evaluate(entry, sd, outputs.times(entry, t_out, False))
                outputs.write(sol, entry, [v.detach() for v in values] if watch else values)
            k0 = prob.carry_out(ks, h_n) if fsal else None
            y = y_next
    rec = prob.record
    rec.n_steps, rec.n_outputs, rec.forward_nfe = n_steps, t_out.numel(), nfe + prob.nfe_extra
    rec.taped_steps = taped
    rec.stored_bytes = 0 if keeper is None else keeper.nbytes()
    rec.checkpoints = 0 if keeper is None else keeper.checkpoints
    if prob.measure and keeper is not None:
        rec.peak_bytes = keeper.nbytes() + prob.held_graph_bytes + prob.held_extra_bytes()
    return sol


def _tape_group(prob: _Problem, keeper, fsal: bool) -> int:
    """Steps per tape of a fixed-grid forward that tapes every step (``"graphs"``): the group one VJP
    reverses, as ``"steps"`` groups its recomputed steps -- a small field's backward is dominated by
    autograd's per-call cost (measured on the benchmark's tiny field: 1000 one-step VJPs took 30%
    longer than the field's whole backward).  The graphs are kept either way, so a group costs no
    memory; it changes the gradient only by the order of floating-point sums.  One step per tape
    where a group would change what runs: an FSAL tableau (each step starts from the carried last
    stage), a per-step callback, fp16's dynamic adjoint scaling (its scale follows the adjoint VJP
    by VJP), an implicit stepper."""
    if keeper is None or not keeper.groups_tapes:
        return 1
    if (fsal or prob.stepper.implicit or scales_per_step(prob.policy, prob.scaler) or prob.callback_step is not None
            or prob.callback_step_adjoint is not None or prob.callback_accept_step_adjoint is not None):
        return 1
    return GROUP_MAX


class StepController:
    """What the adaptive driver asks of a step-size controller (a host adapter implements it).

    The driver owns the Runge--Kutta steps, the error estimate ``h * sum(b_err_i k_i)`` (state dtype),
    storage and outputs; the controller owns every decision, in its own (fp32 or wider) arithmetic:

    * ``start(f, t0, y0, f0)`` -- before the first step (``f`` evaluates under the policy; counted);
    * ``propose(t0, y0) -> (t1, h)`` -- the next trial step (0-d tensors in the time dtype);
    * ``judge(t0, t1, h, y0, y1, err) -> bool`` -- accept or reject it and choose the next step size;
      after an accepted step ``at_jump`` says whether it ended on a discontinuity of ``f``;
    * ``reuse_last_stage`` -- start the next step from the last stage even when it is not
      ``f(t1, y1)`` (torchdiffeq does this for every pair); the driver then carries that value
      through the adjoint so the gradient stays exact;
    * ``accepted`` -- ``None``, or ``accepted(step)`` called with the :class:`StepData` of each accepted
      step (after its outputs are written).  It may raise to end the solve there: the event search of
      the torchdiffeq adapter stops at the step whose end changes the event function's sign and reads
      the step's dense output from ``step``.
    """

    at_jump: bool = False
    reuse_last_stage: bool = False
    accepted = None

    def start(self, f, t0, y0, f0):  # pragma: no cover - interface
        raise NotImplementedError

    def propose(self, t0, y0):  # pragma: no cover - interface
        raise NotImplementedError

    def judge(self, t0, t1, h, y0, y1, err) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


def _adaptive_forward(prob: _Problem, y0, t_out, controller: StepController, probe: bool):
    """Adaptive steps until the last output is passed.  Rejected steps cost no memory.

    Returns (solution, the schedule's keeper or None, accepted grid values or None).
    """
    if prob.tableau.b_err is None:
        raise ValueError(f"method {prob.tableau.name!r} has no embedded error estimate; it cannot adapt its step size")
    if probe and isinstance(prob.schedule, MemoryBudget):
        t0 = t_out[0].detach()
        span = (t_out[-1].detach() - t0) if t_out.numel() > 1 else torch.ones_like(t0)
        item = torch.promote_types(t_out.dtype, y0.dtype).itemsize  # the accepted times' dtype
        resolve_budget(prob, y0, torch.stack([t0, t0 + 1e-3 * span]), None, (t_out.numel() * t_out.element_size() + item, item))
    # the adaptive drivers probe exactly when a backward may follow
    return _with_replay(prob, lambda replaying: _adaptive_forward_once(prob, y0, t_out, controller, probe, replaying),
                        probe and prob.schedule.replays_steps(None))


def _adaptive_forward_once(prob: _Problem, y0, t_out, controller: StepController, probe: bool, replaying: bool):
    pol, tab, outputs = prob.policy, prob.tableau, prob.outputs
    state_dtype = pol.state_dtype
    keeper = prob.keeper = prob.schedule.keeper(None, pol.storage) if probe else None
    replay = prob.replay if probe and prob.schedule.replays_steps(None) else None
    prob.carried_k0.clear()
    prob.first_next_steps.clear()
    outputs.steps.clear()
    y = y0.detach().to(state_dtype)
    t_out = t_out.detach()
    sol = outputs.allocate(y, pol.output)
    t = t_out[0]
    t_host = t_out.tolist()
    n_out = len(t_host)
    # accepted end times (8 bytes a step), only for a backward: the adjoint's grid
    grid = ChunkedStore() if probe else None
    nfe = 0
    watch = prob.watch
    # A schedule that keeps the forward's graphs ("graphs"): every trial is built with a graph and
    # the first stage is either a leaf carried from the previous step's last stage or evaluated with
    # a graph where the host evaluates it (FirstStage: f0, after a jump), and every trial of the step
    # starts from it -- no evaluation the host would not make, none outside a graph the backward reverses.
    taping = keeper is not None and keeper.tape_now(0)
    first = None
    needs = TimeNeeds(prob.need_grid, prob.need_tout)
    taped = 0
    watch_steps = getattr(controller, "accepted", None)

    def f_counted(tt, yy):
        nonlocal nfe
        nfe += 1
        return _check_velocity(prob.f(tt, yy), yy, tt).to(state_dtype)

    with prob.autocast():
        k0_token = None
        if probe and taping:
            # (its graph is walked for hidden tensors with the first trial's: check_tape)
            first = FirstStage(prob, t, y, need_time=needs.need_time, check=_check_velocity, watch=True)
            k0 = first.k.detach()
            nfe += 1
        elif probe:
            k0 = _probe_first(prob, t, y)
            nfe += 1
            if replay is not None:
                if not replaying:
                    replay.detect()
                k0_token = replay.start_token()
        else:
            k0 = f_counted(t, y)
        active = replay is not None and replay.active
        controller.start(f_counted, t, y, k0)
        carried = False  # is k0 the previous step's last stage rather than f(t, y)?
        first_next = False
        out_j, n, rejected = 1, 0, 0
        tape = None
        while out_j < n_out:
            t1, h = controller.propose(t, y)
            h_float = float(h)
            stage_token = replay.snapshot() if active else None
            if taping and first_next:
                prob.first_next_steps.add(n)
            trial = attempt_step(prob, needs, n, y, t, t1, h, h_state=h_float, k0=k0, carried=carried,
                                 first=None if carried else first, taping=taping,
                                 jump=True if first_next else None, watch=watch,
                                 where=lambda: f" (at t = {float(t):.6g})")
            y1, ks, err, tape, failure = trial.y1, trial.ks, trial.err, trial.tape, trial.failure
            nfe += trial.nfe
            accepted = controller.judge(t, t1, h, y, y1, err)
            if failure is not None and accepted:  # (at min_step the controller accepts anything)
                raise failure
            if not accepted:
                rejected += 1
                tape = None  # a rejected trial's graph goes at once
                continue
            if taping:
                check_tape(prob, tape, prob.params, needs, lambda: f" (at t = {float(t):.6g})")
            if probe:  # without a backward to come nothing is kept
                if carried:
                    prob.carried_k0.mark(n)
                keeper.keep(n, y, k0 if carried else None)
                if not carried and active:
                    replay.put((n, "k0"), k0_token)
                if active:
                    replay.put(n, stage_token)
            if first_next:
                prob.first_next_steps.add(n)
            t1_host = float(t1)
            if grid is not None:
                grid.append(t1)
            entry = []
            while out_j < n_out and t_host[out_j] <= t1_host:
                entry.append((out_j, False))
                out_j += 1
            if entry:
                outputs.steps[n] = entry
                if taping:
                    values = add_tape_outputs(prob, tape, entry, t_out, t, t1, needs)
                    outputs.write(sol, entry, [v.detach() for v in values])
                    del values
                else:
                    sd = StepData(prob, t, t1, h, y, y1, ks)
                    with prob.full_precision():
                        outputs.write(sol, entry, outputs.evaluate(entry, sd, outputs.times(entry, t_out, False)))
            if taping:
                _keep_trial_tape(prob, keeper, n, tape)
                tape = None
                taped += 1
            if watch_steps is not None:
                watch_steps(StepData(prob, t, t1, h, y, y1, ks))
            n += 1
            y, t = y1, t1
            first_next = bool(controller.at_jump)
            k0_token = None
            if first_next:
                # Past a discontinuity of f: its value on the new side, as torchdiffeq does.
                t_next = prob.nudge(t1, math.inf)
                k0_token = replay.snapshot() if active else None
                # (taped: evaluated inside the next trial's graph, at the same nudged time)
                if taping:
                    first = FirstStage(prob, t1, y1, need_time=needs.need_time, nudge_next=True, check=_check_velocity)
                    k0, carried = first.k.detach(), False
                    nfe += 1
                else:
                    k0, carried = f_counted(t_next, y1), False
            elif tab.fsal:
                # f(t1, y1) up to the c == 1 time nudge.  A replayed field's next evaluation would
                # draw other random numbers: then the value is carried, like a reused last stage.
                # Taped: carried as a leaf of the next trial's graph, its cotangent flows back.
                k0, carried = ks[-1], active or taping
            elif controller.reuse_last_stage:
                k0, carried = ks[-1], True
            elif taping:  # f(t1, y1) where the host evaluates it, with a graph for the next step's trials
                first = FirstStage(prob, t1, y1, need_time=needs.need_time, check=_check_velocity)
                k0, carried = first.k.detach(), False
                nfe += 1
            else:
                k0_token = replay.snapshot() if active else None
                k0, carried = f_counted(t1, y1), False
    rec = prob.record
    rec.n_steps, rec.n_outputs, rec.forward_nfe = n, t_out.numel(), nfe + prob.nfe_extra
    rec.rejected_steps, rec.taped_steps = rejected, taped
    if keeper is None:
        return sol, None, None
    keeper.end_forward(n)
    rec.stored_bytes, rec.checkpoints = keeper.nbytes(), keeper.checkpoints
    _budget_record(prob, keeper)
    ends = grid.stack() if grid else t_out[:0]
    dtype = torch.promote_types(t_out.dtype, ends.dtype)
    return sol, keeper, torch.cat([t_out[:1].to(dtype), ends.to(dtype)])


class BatchedStepController:
    """Per-sample step-size control for :func:`solve_batched_adaptive` (torchode's layout).

    * ``start(f, t0, y0, dt0) -> (dt, f0 or None)`` -- initial step sizes ``(B,)``;
    * ``judge(t0, dt, y0, y1, err) -> (accept, dt_next, status)`` -- per sample; ``status`` is a
      ``(B,)`` long tensor of torchode status codes or ``None``;
    * ``merge(running)`` -- keep the controller state of samples that are still running;
    * ``rejecting_error(y0)`` -- a finite error estimate that rejects (a sample whose Newton failed).
    """

    def start(self, f, t0, y0, dt0):  # pragma: no cover - interface
        raise NotImplementedError

    def judge(self, t0, dt, y0, y1, err):  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, running):  # pragma: no cover - interface
        raise NotImplementedError

    def rejecting_error(self, y0):  # pragma: no cover - interface
        """A finite error estimate that ``judge`` rejects with the strongest step-size cut (a sample
        whose Newton iteration failed); an infinite one would be a status, not a rejection."""
        raise NotImplementedError


def _batched_adaptive_once(prob, y0, t_start, t_end, outputs, controller, dt0, max_steps, probe, replaying):
    """One run of the per-sample adaptive forward; returns (sol, keeper, grid rows, anchors, info) --
    keeper, grid rows and anchors only for a backward (None otherwise)."""
    policy, tableau, record = prob.policy, prob.tableau, prob.record
    state_dtype = policy.state_dtype
    time_dtype = t_start.dtype
    keeper = prob.keeper = prob.schedule.keeper(None, policy.storage) if probe else None
    replay = prob.replay if probe and prob.schedule.replays_steps(None) else None
    outputs.steps.clear()
    nfe = taped = 0
    # "graphs": each iteration's trial is built with a graph for the whole batch (its first stage
    # evaluated inside it, not carried: a carried stage would mix iterations per sample); once judged,
    # the rows of the samples that did not move become the identity (_mask_tape).
    taping = keeper is not None and keeper.tape_now(0)
    needs = TimeNeeds(prob.need_grid, prob.need_tout)

    # The field is evaluated exactly where torchode evaluates it, with or without a backward to
    # come (values, random numbers and buffers then do not depend on grad mode): the controller's
    # start, the FSAL first stage once (then carried, merged with the accept mask), or a non-FSAL
    # method's first stage at every iteration for every sample.  The first of these evaluations is
    # the probe: its graph is walked for hidden tensors and it tells whether the field draws random
    # numbers or writes buffers.
    first = [probe]
    # "graphs": the first evaluation, f(t0, y0), with a graph (FirstStage) -- an FSAL method's first
    # trial starts from it, as torchode's first step does
    pre = [None]

    def f_counted(tt, yy):
        nonlocal nfe
        nfe += 1
        if first[0] and taping:
            first[0] = False
            pre[0] = FirstStage(prob, tt, yy, need_time=needs.need_time, check=_check_velocity, watch=True)
            return pre[0].k.detach()
        if first[0]:
            first[0] = False
            # (the controller may pass the host's start time, which can require grad: the time
            # gradients come from the adjoint's grid, the probe only looks at the field)
            k = _probe_first(prob, tt.detach(), yy)
            if replay is not None and not replaying:
                replay.detect()
            return k
        return _check_velocity(prob.f(tt, yy), yy, tt).to(state_dtype)

    def snapshot():
        """What the field sees before its next evaluation (for the replay of a recomputation);
        ``"start"`` before the first (whether the field needs replaying is known only after it)."""
        if replay is None:
            return None
        return "start" if first[0] else replay.snapshot()

    with prob.autocast():
        y = y0.detach().to(state_dtype)
        t = t_start.detach().clone()
        ts, te = t_start.detach(), t_end.detach()
        direction = torch.where(te > ts, 1, -1).to(time_dtype)
        t_min, t_max = torch.minimum(ts, te), torch.maximum(ts, te)
        outputs.start_incremental(ts)
        sol = outputs.allocate(y, policy.output)
        fsal = tableau.fsal
        k0_token = snapshot()
        dt, k0 = controller.start(f_counted, t, y, dt0)
        if not fsal:
            k0 = None  # evaluated at each iteration's start
        elif k0 is None:
            k0_token = snapshot()
            k0 = f_counted(t, y)
        # (the controller's f0 is the field's first evaluation: k0_token is the start's)
        carried = False  # does this iteration start from the previous one's merged last stage?
        clamped = torch.clamp(dt, t_min - t, t_max - t)
        # A step clamped to the end of its span lands on t_end: that point (and every later one of
        # the sample) moves with t_end, the others with t_start (step sizes are constants).
        will_anchor, anchored = clamped != dt, torch.zeros_like(t, dtype=torch.bool)
        dt = clamped
        running = (t - te) * direction < 0
        n_steps = torch.zeros_like(t, dtype=torch.long)
        n_accepted = torch.zeros_like(t, dtype=torch.long)
        status = torch.zeros_like(t, dtype=torch.long)
        # iteration times and anchors (for the adjoint's grid), only for a backward
        grid, anchors = (ChunkedStore(), ChunkedStore()) if probe else (None, None)
        if probe:
            grid.append(t)
            anchors.append(anchored)
        n = 0
        out_steps = torch.full(outputs.t_eval.shape, math.nan, dtype=time_dtype, device=t.device)
        prob.stepper.reject_per_sample = True  # one sample's failed step (Newton) is its own rejection
        while bool(running.any()):
            if max_steps is not None and int(n_steps.max()) >= max_steps:
                status = torch.where(running, 3, status)  # torchode's REACHED_MAX_STEPS
                break
            active = replay is not None and replay.active
            if not fsal:
                k0_token = snapshot()
                k0 = None if taping else f_counted(t, y)  # (taped: evaluated inside the trial's graph)
                active = replay is not None and replay.active
            if active:
                replay.capture(n)
            # the step's end times as the adjoint's grid will hold them (t + dt), so that a taped
            # step is the one the backward's grid describes (an FSAL method's first iteration
            # starts from f0, evaluated with a graph)
            pre_n = pre[0] if taping and n == 0 and fsal and pre[0] is not None and pre[0].y_leaf.shape == y.shape \
                else None
            trial = attempt_step(prob, needs, n, y, t, t + dt, dt, h_state=prob.h_for_state(dt, y), k0=k0,
                                 carried=carried, first=pre_n, taping=taping, watch=prob.watch,
                                 where=lambda: f" (at iteration {n})", running=running,
                                 rejecting_error=controller.rejecting_error)
            y1, ks, err, tape, failure, failed = trial.y1, trial.ks, trial.err, trial.tape, trial.failure, trial.failed
            # (a whole-batch Newton failure counts the stages it tried, as the untaped step would)
            nfe += trial.nfe if failure is None else tableau.stages - 1
            accept, dt_next, st = controller.judge(t, dt, y, y1, err)
            if failure is not None and bool((accept & running).any()):
                raise failure
            if failed is not None and bool((accept & failed).any()):  # (at dt_min a controller accepts)
                which = torch.nonzero(accept & failed).flatten().tolist()
                raise NewtonFailure(
                    f"Newton's method did not converge for a stage of {tableau.name!r} in sample(s) {which} at "
                    f"t = {[round(float(x), 6) for x in t[which]]} and the controller accepted the step anyway "
                    "(its minimum step size): use looser Newton tolerances or more iterations (max_iter)",
                    float(t[which[0]]), float(dt[which[0]].abs()), math.inf)
            to_update = accept & running
            t_new = torch.where(to_update, t + dt, t)
            anchored = anchored | (will_anchor & to_update)
            mask = to_update.reshape(-1, *([1] * (y.ndim - 1)))
            if taping:
                tape, extra = _mask_tape(prob, needs, n, tape, mask, y, y1, err, t, t_new, k0 if carried else None)
                nfe += extra
                check_tape(prob, tape, prob.params, needs, lambda: " (at iteration 0)")  # (the first only)
            if probe:  # without a backward to come nothing is kept
                if carried:
                    prob.carried_k0.mark(n)
                keeper.keep(n, y, k0 if carried else None)
                if not carried and active and k0_token is not None:
                    replay.put((n, "k0"), replay.start_token() if k0_token == "start" else k0_token)
                grid.append(t_new)
                anchors.append(anchored)
            entry = outputs.assign(n, t, t_new, direction)
            if entry is not None:
                out_steps[entry] = dt.detach()[entry[0]].abs().to(out_steps.dtype)
                if taping:
                    values = add_tape_outputs(prob, tape, entry, outputs.t_eval.detach(), t, t + dt, needs)
                    outputs.write(sol, entry, [v.detach() for v in values])
                    del values
                else:
                    # The trial step's data, as torchode interpolates (only accepted samples own outputs).
                    sd = StepData(prob, t, t + dt, dt, y, y1, ks)
                    with prob.full_precision():
                        outputs.write(sol, entry, outputs.evaluate(entry, sd, outputs.times(entry, outputs.t_eval.detach(), False)))
            if taping:
                _keep_trial_tape(prob, keeper, n, tape)
                tape = None
                taped += 1
            y = torch.where(mask, y1, y)
            if fsal and ks[0] is not None:
                # torchode's FSAL merge: a sample that moved starts from its last stage, the others
                # keep theirs.  Carried through the adjoint (the next tape's first-stage leaf, its
                # cotangent to this step's merged last stage) unless every sample moved: then the
                # value is f(t_new, y_new) of the whole batch, which a recomputation gives again.
                k0 = torch.where(mask, ks[-1], ks[0])
                carried = probe and (active or taping or not bool(mask.all()))
                k0_token = None
            t = t_new
            n_steps += running
            n_accepted += to_update
            if st is not None:
                status = torch.maximum(status, torch.where(running, st, 0))
            running = (t - te) * direction < 0
            dt = torch.where(running, dt_next, dt)
            clamped = torch.clamp(dt, t_min - t, t_max - t)
            will_anchor = clamped != dt
            dt = clamped
            controller.merge(running)
            n += 1
            if bool((status != 0).any()):
                break
    record.n_steps, record.n_outputs, record.forward_nfe = n, outputs.t_eval.numel(), nfe + prob.nfe_extra
    record.rejected_steps = int((n_steps - n_accepted).sum())
    record.taped_steps = taped
    prob.n_steps = n
    # output_steps: the size of the accepted step that reached each output (NaN: none did) -- where
    # the quadrature adjoint's backward solves start their steps
    info = {"n_steps": n_steps, "n_accepted": n_accepted, "status": status, "output_steps": out_steps}
    if keeper is not None:
        keeper.end_forward(n)
        record.stored_bytes, record.checkpoints = keeper.nbytes(), keeper.checkpoints
        _budget_record(prob, keeper)
    return sol, keeper, grid, anchors, info


def _keep_trial_tape(prob, keeper, n, tape) -> None:
    """Hand an adaptive iteration's tape to the "graphs" keeper (its bytes counted under a budget)."""
    if prob.measure:
        tape.nbytes = tape_nbytes(prob, tape)
        prob.held_graph_bytes += tape.nbytes
    tape.ks = None  # the stages' memory goes with the graph's own references
    keeper.put_tape(n, tape)


def _mask_tape(prob, needs, n, tape, mask, y, y1, err, t, t_new, k0=None):
    """Iteration ``n``'s taped trial made the step the adjoint's grid describes: the rows of the
    samples that did not move (rejected, or already finished) become the identity,
    ``y_end = where(moved, y_end, y)`` -- what "steps" rebuilds for them with ``h = 0``.

    Numerics: those rows' stage values stay in the graph under a zero cotangent, which the VJP turns
    into exact zeros -- unless they are not finite (an overflowing trial: 0 * inf is NaN, and the
    batch sum would carry it into the parameters' gradient).  Such an iteration is taped again from
    ``(t, t_new)``, where those rows have ``h = 0``: one more set of stage evaluations, for that
    iteration only.  Returns (tape, the field evaluations that took)."""
    if tape is not None and bool(torch.isfinite(y1).all() & torch.isfinite(err).all()):
        with torch.enable_grad():
            tape.y_end = torch.where(mask, tape.y_end, tape.y_leaf)
            # the first stage the next iteration starts from (FSAL): merged with the same mask
            tape.k_last = torch.where(mask, tape.ks[-1], tape.ks[0])
        return tape, 0
    tape = build_tape(prob, needs, n, n + 1, y, k0, replay=False, points=(t, t_new))
    return tape, tape.nfe


def _budget_record(prob, keeper) -> None:
    """An adaptive solve under a memory budget: what it chose, known at the end of the forward."""
    if not prob.measure:
        return
    rec = prob.record
    rec.schedule, rec.predicted_bytes = keeper.resolved_name, keeper.predicted
    rec.peak_bytes = keeper.nbytes() + prob.held_extra_bytes()
