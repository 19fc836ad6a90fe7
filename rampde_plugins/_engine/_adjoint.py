"""The discrete adjoint: the reverse sweep over a solve's tapes and its autograd Function.

The sweep owns the adjoint ``a`` (and the cotangent ``a_k`` of a first stage carried into the
step after the next tape), the fp32 sums of the parameter and time gradients, and the per-tape VJP
through an adjoint-scaling strategy (``_scaling``).  Which tapes it gets and how they are rebuilt is
the checkpoint schedule's business (``_schedules``): it calls :meth:`_Sweep.tape`,
:meth:`_Sweep.advance` and :meth:`_Sweep.reverse`.
"""

from __future__ import annotations

import contextlib

import torch

from ._drivers import _forward
from ._problem import _Problem
from ._scaling import make_scaling
from ._budget import tape_nbytes
from ._tape import Frame, Tape, build_tape, tape_inputs, tape_roots


class _Sweep:
    """One backward pass: ``needs`` = (y0, grid, t_out, *params) needs_input_grad flags."""

    def __init__(self, prob: _Problem, frame: Frame, params, grad_sol, needs):
        pol = prob.policy
        self.prob, self.frame = prob, frame
        self.state_dtype, acc = pol.state_dtype, pol.accumulation
        self.param_idx = [i for i, p in enumerate(params) if needs[3 + i]]
        self.diff_params = [params[i] for i in self.param_idx]
        self.g = g = grad_sol.to(acc)
        grid, t_out = frame.grid, frame.t_out
        self.a = torch.zeros(prob.y_shape, dtype=acc, device=grad_sol.device)
        self.a_k = None
        self.g_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc)) for p in self.diff_params]
        # Autograd's convention: a parameter no step depends on gets None, not a zero tensor (an
        # optimizer with weight decay would move it).
        self.touched = [False] * len(self.diff_params)
        self.g_grid = torch.zeros_like(grid, dtype=torch.promote_types(grid.dtype, acc)) if frame.need_grid else None
        self.g_tout = torch.zeros_like(t_out, dtype=torch.promote_types(t_out.dtype, acc)) if frame.need_tout else None
        self.scaling = make_scaling(pol, prob.scaler, prob.n_steps, prob.record)
        self.scaling.start(g)
        # Steps after the last output with a non-zero cotangent carry a zero adjoint: skipped (one
        # host synchronisation per backward, e.g. a loss on an early part of the trajectory).
        self.last = prob.outputs.last_active_step(g)
        self.nfe = self.reversed = self.taped = self.recomputed = 0
        # under a memory budget: bytes of the graphs alive (SolveStats.peak_bytes)
        self.keeper, self.live, self.peak = None, prob.held_graph_bytes, 0
        self.extra_bytes = prob.held_extra_bytes() if prob.measure else 0
        self.nfe_before = prob.nfe_extra  # end slopes of cubic outputs are counted there

    # -- what schedules call --------------------------------------------------------------------
    def tape(self, n0: int, n1: int, y, k0, stored=None) -> Tape:
        """Steps n0 .. n1-1 rebuilt with a graph from a kept (or recomputed) state (``stored``: see
        :func:`build_tape`)."""
        tape = build_tape(self.prob, self.frame, n0, n1, y, k0, replay=True, stored=stored)
        self.nfe += tape.nfe
        self.taped += n1 - n0
        if self.prob.measure:
            tape.nbytes = tape_nbytes(self.prob, tape)
            self.live += tape.nbytes
            self.note_peak()
        return tape

    def tape_bytes(self, tape: Tape) -> int:
        """What a tape's graph saved (measured once more only when no budget measured it already)."""
        return tape.nbytes if self.prob.measure else tape_nbytes(self.prob, tape)

    def note_peak(self) -> None:
        """What the schedule holds now: its states and checkpoints, the graphs alive, the time grid and
        the replay records."""
        if self.keeper is not None:
            self.peak = max(self.peak, self.keeper.nbytes() + self.live + self.extra_bytes)

    def advance(self, n: int, y, k0):
        """Step n without a graph, exactly as the forward ran it: (state, carried first stage) of n+1."""
        prob = self.prob
        rp = prob.replay if prob.replay is not None and prob.replay.active else None
        with torch.no_grad(), prob.autocast():
            stage_t, hs = self.frame.table[n]
            y = y.to(self.state_dtype)
            if rp is not None:
                if k0 is None and (n, "k0") in rp.tokens:
                    rp.restore((n, "k0"))
                    k0 = prob.f(stage_t[0], y).to(self.state_dtype)
                    self.nfe += 1
                rp.restore(n)
            y1, ks = prob.step(y, stage_t, hs, k0)
        self.nfe += prob.tableau.stages - (k0 is not None)
        self.recomputed += 1
        return y1, (prob.carry_out(ks, hs) if prob.carried_k0.carries(n + 1) else None)

    def after(self, tape: Tape | None, n: int, y, k0):
        """(state, carried first stage) after taped step n (advanced without a graph if not taped)."""
        if tape is None:
            return self.advance(n, y, k0)
        k = tape.k_last.detach() if self.prob.carried_k0.carries(n + 1) else None
        return tape.y_end.detach(), k

    def reverse(self, tape: Tape) -> None:
        """One VJP through a tape: the adjoint moves from t_{n1} to t_{n0}."""
        prob, frame = self.prob, self.frame
        n0, n1 = tape.n0, tape.n1
        if prob.callback_step_adjoint is not None:
            for n in range(n1 - 1, n0 - 1, -1):
                prob.callback_step_adjoint(frame.grid[n], tape.ys[n - n0], frame.table.h_at(n))
        roots, cot = tape_roots(tape, self.a, self.a_k, self.g, prob.outputs)
        inputs = tape_inputs(tape, self.diff_params, frame)
        refs = outside = None
        if not tape.checked:
            # Every step's graph is checked: a tensor the field uses only at some times is found here.
            refs, outside = prob.check.scan(roots, inputs, tape.mark)
        k0_leaf, n_pts = tape.k0_leaf, (len(tape.pts) if frame.need_time else 0)
        starts = (tape.y_leaf, *(() if k0_leaf is None else (k0_leaf,)))
        grads, inv = self.scaling.vjp(roots, inputs, cot, starts, f"step {n0}", self.state_dtype)
        del roots, cot, starts
        ys = tape.ys
        self.live -= tape.nbytes
        entries = [entry for entry, _, _ in tape.outs]
        leaves_per_out = [tls for _, _, tls in tape.outs]
        tape.clear()
        if refs is not None:
            prob.check.raise_if_hidden(
                refs, outside, lambda: _where_steps(frame, n0, n1, prob.n_steps))
        acc = self.a.dtype
        a = grads[0].to(acc)
        self.a = a * inv if inv != 1.0 else a
        n_par = len(self.diff_params)
        for i, gp in enumerate(grads[1 : 1 + n_par]):
            if gp is not None:
                self.g_params[i].add_(gp.to(self.g_params[i].dtype), alpha=inv)
                self.touched[i] = True
        j = 1 + n_par
        if k0_leaf is not None:
            gk = grads[j]
            self.a_k = (gk if gk is not None else torch.zeros_like(k0_leaf)).to(acc) * inv
            j += 1
        else:
            self.a_k = None
        if frame.need_time:
            gt = grads[j:]
            if self.g_grid is not None:
                for m, gr in enumerate(gt[:n_pts]):
                    if gr is not None:
                        self.g_grid[n0 + m] += gr.to(self.g_grid.dtype) * inv
            if frame.need_tout:
                it = iter(gr * inv if gr is not None else None for gr in gt[n_pts:])
                for entry, tls in zip(entries, leaves_per_out):
                    prob.outputs.add_time_grads(self.g_tout, entry, [None if tl is None else next(it) for tl in tls])
        del grads, k0_leaf
        if prob.callback_accept_step_adjoint is not None:
            for n in range(n1 - 1, n0 - 1, -1):
                prob.callback_accept_step_adjoint(frame.grid[n], ys[n - n0], frame.table.h_at(n))
        self.reversed += n1 - n0

    # -- the end --------------------------------------------------------------------------------
    def finish(self):
        prob, rec = self.prob, self.prob.record
        g_y0 = self.a + prob.outputs.y0_cotangent(self.g)
        self.scaling.finish(rec)
        rec.backward_nfe += self.nfe + prob.nfe_extra - self.nfe_before
        rec.backward_steps += self.reversed
        rec.taped_steps += self.taped
        rec.recomputed_steps += self.recomputed
        if prob.measure:
            rec.peak_bytes = max(rec.peak_bytes, self.peak)
        rec.backward_done = True
        out = [(i, gp if hit else None) for i, gp, hit in zip(self.param_idx, self.g_params, self.touched)]
        return g_y0, self.g_grid, self.g_tout, out


def _where_steps(frame, n0: int, n1: int, n_steps: int) -> str:
    """Where a tape's steps are, for an error message: one step, or the range one VJP reversed."""
    t0 = float(frame.grid[n0].min())
    if n1 - n0 == 1:
        return f" (at step {n0} of {n_steps}, t = {t0:.6g})"
    return (f" (in steps {n0} to {n1 - 1} of {n_steps}, reversed by one VJP, t = {t0:.6g} to "
            f"{float(frame.grid[n1].max()):.6g})")


def _backward(prob: _Problem, keeper, grid, t_out, params, grad_sol, needs):
    """The discrete adjoint of a solve whose forward kept ``keeper``."""
    replay = prob.replay
    with replay.sweep() if replay is not None else contextlib.nullcontext():
        frame = Frame(prob, grid, t_out, grad_sol.new_empty(prob.y_shape), needs[1], needs[2])
        sweep = _Sweep(prob, frame, params, grad_sol, needs)
        sweep.keeper = keeper
        sweep.note_peak()
        keeper.reverse(sweep)
        prob.record.checkpoints = max(prob.record.checkpoints, keeper.checkpoints)
        if keeper.grouped:
            prob.record.segment_steps = keeper.grouped
        return sweep.finish()


_HIGHER_ORDER = (
    "rampde's discrete adjoint provides first-order gradients (one VJP per step, computed without a "
    "graph of its own), so {what} through a rampde solve is not available. For Hessian-vector "
    "products or gradient penalties use torchdiffeq's own method with the same tableau (e.g. "
    "method='rk4' with options={{'step_size': h}}), which backpropagates through the steps with autograd."
)


class _GridAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob, y0, grid, t_out, *params):
        if prob.precomputed is not None:  # the adaptive driver has already run the forward
            sol, keeper = prob.precomputed
            prob.precomputed = None
        else:
            sol, keeper = _forward(prob, y0, grid, t_out, keep=True)
        ctx.prob, ctx.keeper = prob, keeper
        ctx.y0_dtype = y0.dtype
        states = keeper.states()
        # One stored tensor (steps on a known grid) goes through save_for_backward, so that saved-tensor
        # hooks (offloading, the saved-tensor meter) see it; the keeper gets the unpacked one back.
        ctx.fixed = isinstance(states, torch.Tensor)
        ctx.save_for_backward(*((states,) if ctx.fixed else ()), grid, t_out, *params)
        if ctx.fixed:
            # Autograd keeps them now: the keeper's reference would outlive the backward (a solve's
            # problem, keeper and stepper form a reference cycle that only the cyclic collector frees;
            # a training loop held one more iteration's states per iteration until it ran).
            keeper.release_states()
        return sol

    @staticmethod
    def backward(ctx, grad_sol):
        # Grad mode is on in a backward exactly when the caller asked for create_graph=True: a
        # second derivative would silently be zero (the VJPs below build no graph), so refuse.
        if torch.is_grad_enabled():
            raise RuntimeError(_HIGHER_ORDER.format(what="create_graph=True (a second derivative)"))
        saved = ctx.saved_tensors
        if ctx.fixed:
            ctx.keeper.use_states(saved[0])
            saved = saved[1:]
        grid, t_out, *params = saved
        needs = ctx.needs_input_grad[1:]
        try:
            g_y0, g_grid, g_tout, g_params = _backward(ctx.prob, ctx.keeper, grid, t_out, params, grad_sol, needs)
        finally:
            if ctx.fixed:  # (a retained graph's second backward gets them again from saved_tensors)
                ctx.keeper.release_states()
            del saved
        out_params = [None] * len(params)
        for i, gp in g_params:
            out_params[i] = None if gp is None else gp.to(params[i].dtype)
        return (
            None,
            g_y0.to(ctx.y0_dtype) if needs[0] else None,
            g_grid.to(grid.dtype) if g_grid is not None else None,
            g_tout.to(t_out.dtype) if g_tout is not None else None,
            *out_params,
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_HIGHER_ORDER.format(what="forward-mode differentiation (torch.autograd.forward_ad, jvp)"))


def _apply(prob, y0, grid, t_out, params):
    # torch.func transforms (grad, vmap, jacrev, hessian) need a functorch-aware Function; torch's
    # own error would not say what to do instead.
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(_HIGHER_ORDER.format(what="a torch.func transform (grad, vmap, jacrev, jacfwd, hessian)")
                           + " For first-order gradients call torch.autograd.grad or .backward().")
    return _GridAdjoint.apply(prob, y0, grid, t_out, *params)
