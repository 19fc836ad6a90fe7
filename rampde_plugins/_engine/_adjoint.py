"""The discrete adjoint: the reverse sweep over a solve's steps and its autograd Function."""

from __future__ import annotations

import contextlib
import math

import torch

from .._probe import sequence_mark
from .._scaler import AdjointScaler
from ._drivers import _forward
from ._problem import _Problem
from ._steppers import StepData
from ._times import _StepTable


def _backward(prob: _Problem, stored, grid, t_out, params, grad_sol, needs):
    """The discrete adjoint.  ``needs`` = (y0, grid, t_out, *params) needs_input_grad flags."""
    replay = prob.replay
    with replay.sweep() if replay is not None else contextlib.nullcontext():
        return _adjoint_sweep(prob, stored, grid, t_out, params, grad_sol, needs)


def _adjoint_sweep(prob: _Problem, stored, grid, t_out, params, grad_sol, needs):
    pol, tab, outputs = prob.policy, prob.tableau, prob.outputs
    state_dtype, acc_dtype = pol.state_dtype, pol.accumulation
    need_grid, need_tout = needs[1], needs[2]
    need_time = need_grid or need_tout
    param_idx = [i for i, p in enumerate(params) if needs[3 + i]]
    diff_params = [params[i] for i in param_idx]
    g = grad_sol.to(acc_dtype)
    a = torch.zeros(stored[0].shape, dtype=acc_dtype, device=stored[0].device)
    g_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc_dtype)) for p in diff_params]
    # Autograd's convention: a parameter no step depends on gets None, not a zero tensor (an
    # optimizer with weight decay would move it).
    touched = [False] * len(diff_params)
    g_grid = torch.zeros_like(grid, dtype=torch.promote_types(grid.dtype, acc_dtype)) if need_grid else None
    g_tout = torch.zeros_like(t_out, dtype=torch.promote_types(t_out.dtype, acc_dtype)) if need_tout else None

    dynamic = pol.scaling == "dynamic"
    scaler = None
    if dynamic:
        scaler = prob.scaler if prob.scaler is not None else AdjointScaler._from_config(pol.scaler)
        dynamic = scaler.is_enabled()
    scale, clean_run, backoffs, redone = 1.0, 0, 0, 0
    if dynamic:
        scale = scaler._start(float(g.abs().amax()) if g.numel() else 0.0)  # one sync per backward
        prob.record.initial_scale = scale
    max_retries = scaler._config.max_retries if dynamic else 0

    grid_d, t_out_d = grid.detach(), t_out.detach()
    table = _StepTable(prob, grid_d, stored[0])
    h_all = table.h_all
    replay = prob.replay if prob.replay is not None and prob.replay.active else None
    check = prob.check
    mark = sequence_mark()  # nodes numbered below were created before this backward (same thread)
    nfe_before = prob.nfe_extra
    nfe, steps_done = 0, 0
    a_k = None  # cotangent of a first stage carried over from the previous step

    def rebuild(n, y_n, k0_leaf, entry):
        """Step n's graph: (roots, their cotangents, time leaves, t0, t1).  All its locals die on return."""
        nonlocal nfe
        with torch.enable_grad(), prob.autocast():
            if need_time:
                t0 = grid_d[n].clone().requires_grad_(True)
                t1 = grid_d[n + 1].clone().requires_grad_(True)
                h = t1 - t0
                first_next = True if n in prob.first_next_steps else None
                stage_t = prob.stage_times(t0, t1, h, first_next)
                hs = prob.h_for_state(h, y_n)
            else:
                t0, t1, h = grid_d[n], grid_d[n + 1], h_all[n]
                stage_t, hs = table[n]
            k0 = k0_leaf
            if replay is not None:
                if k0 is None and (n, "k0") in replay.tokens:
                    # a first stage the forward evaluated before this step's trial (adaptive steps)
                    replay.restore((n, "k0"))
                    k0 = prob.f(stage_t[0], y_n).to(state_dtype)
                    nfe += 1
                replay.restore(n)
            y_next, ks = prob.step(y_n, stage_t, hs, k0)
            nfe += tab.stages - (k0 is not None)
            roots, cot, t_leaves = [y_next], [a], []
            if a_k is not None:  # the next step started from this step's last stage
                roots.append(ks[-1])
                cot.append(a_k)
            if entry is not None:
                t_leaves = outputs.times(entry, t_out_d, need_tout)
                sd = StepData(prob, t0, t1, h, y_n, y_next, ks)
                with prob.full_precision():
                    values = outputs.evaluate(entry, sd, t_leaves)
                for v, c in zip(values, outputs.cotangents(g, entry)):
                    if v is y_next:  # an output that is y_{n+1} itself: fold its cotangent in
                        cot[0] = cot[0] + c
                    else:
                        roots.append(v)
                        cot.append(c)
        return roots, cot, t_leaves, t0, t1

    # Steps after the last output with a non-zero cotangent carry a zero adjoint: skip them (one
    # host synchronisation per backward, e.g. a loss on an early part of the trajectory).
    for n in range(outputs.last_active_step(g), -1, -1):
        entry = outputs.steps.get(n)
        y_n = stored[n].to(state_dtype).requires_grad_(True)
        carried = prob.carried_k0.get(n)
        k0_leaf = None if carried is None else carried.to(state_dtype).requires_grad_(True)
        if prob.callback_step_adjoint is not None:
            prob.callback_step_adjoint(grid_d[n], y_n.detach(), h_all[n])
        roots, cot, t_leaves, t0, t1 = rebuild(n, y_n, k0_leaf, entry)
        inputs = [y_n, *diff_params]
        if k0_leaf is not None:
            inputs.append(k0_leaf)
        t_inputs = [tl for tl in t_leaves if tl is not None] if need_tout else []
        if need_time:
            inputs += [t0, t1, *t_inputs]
        # Every step's graph is checked: a tensor the field uses only at some times is found here.
        refs, outside = check.scan(roots, inputs, mark)
        for attempt in range(max_retries + 1):
            scaled_cot = [(c * scale if scale != 1.0 else c).to(state_dtype) for c in cot]
            grads = torch.autograd.grad(roots, inputs, scaled_cot, allow_unused=True, retain_graph=dynamic)
            if not dynamic:
                break
            # One host synchronisation per step: are all results finite, and how large is the
            # scaled adjoint (for the growth rule)?
            present = [gr for gr in grads if gr is not None]
            probe = torch.stack([torch.stack([gr.abs().amax().float() for gr in present]).amax(), grads[0].abs().amax().float()])
            worst, scaled_amax = probe.tolist()
            if math.isfinite(worst):
                break
            # NaN/inf already in what this step starts from or computes (the forward, the loss, a
            # later step) is not an fp16 overflow of this VJP: halving the scale cannot help, so it
            # propagates as with every other policy.  Checked only on this failure path.
            starts = (y_n, *cot, *roots, *(() if k0_leaf is None else (k0_leaf,)))
            if not all(bool(torch.isfinite(x.detach()).all()) for x in starts):
                break
            if attempt == max_retries:
                raise FloatingPointError(
                    f"fp16 adjoint overflow at step {n} of {prob.n_steps}: the VJP is still inf/nan after "
                    f"{max_retries} halvings of the adjoint scale (now {scale:g}). The vector field's "
                    "backward overflows fp16 even for small cotangents; use precision='bf16' (fp32 range) "
                    "or 'fp32', or bound the network's activations."
                )
            scale *= scaler._config.backoff_factor
            backoffs += 1
            clean_run = 0
        del roots
        check.raise_if_hidden(refs, outside, f" (at step {n} of {prob.n_steps}, t = {float(grid_d[n].min()):.6g})")
        if attempt:
            redone += 1
        if steps_done == 0:
            # What a persistent scaler carries to the next iteration: the scale that ran the
            # *first* backward step cleanly.  The next backward also starts at t_N with a terminal
            # cotangent of similar size; the end-of-pass scale belongs to the adjoint at t_0.
            first_clean_scale, first_backoffs = scale, attempt
        inv = 1.0 / scale
        a = grads[0].to(acc_dtype)
        if scale != 1.0:
            a = a * inv
        for i, gp in enumerate(grads[1 : 1 + len(diff_params)]):
            if gp is not None:
                g_params[i].add_(gp.to(g_params[i].dtype), alpha=inv)
                touched[i] = True
        n_k = 1 if k0_leaf is not None else 0
        if n_k:
            gk = grads[1 + len(diff_params)]
            a_k = (gk if gk is not None else torch.zeros_like(k0_leaf)).to(acc_dtype) * inv
        else:
            a_k = None
        if need_time:
            gt = grads[1 + len(diff_params) + n_k :]
            if need_grid:
                if gt[0] is not None:
                    g_grid[n] += gt[0].to(g_grid.dtype) * inv
                if gt[1] is not None:
                    g_grid[n + 1] += gt[1].to(g_grid.dtype) * inv
            if need_tout and entry is not None:
                it = iter(gr * inv if gr is not None else None for gr in gt[2:])
                outputs.add_time_grads(g_tout, entry, [None if tl is None else next(it) for tl in t_leaves])
        del grads, k0_leaf
        if prob.callback_accept_step_adjoint is not None:
            prob.callback_accept_step_adjoint(grid_d[n], y_n.detach(), h_all[n])
        steps_done += 1
        if dynamic:
            clean_run += 1
            scale, clean_run = scaler._grow(scale, scaled_amax, clean_run)
    g_y0 = a + outputs.y0_cotangent(g)
    if dynamic:
        scaler._finish(first_clean_scale if steps_done else scale, backoffs, first_backoffs if steps_done else 0)
    rec = prob.record
    rec.backward_nfe += nfe + prob.nfe_extra - nfe_before
    rec.backward_steps += steps_done
    rec.scale_backoffs += backoffs
    rec.redone_steps += redone
    rec.final_scale = scale if dynamic else None
    rec.backward_done = True
    return g_y0, g_grid, g_tout, [(i, gp if hit else None) for i, gp, hit in zip(param_idx, g_params, touched)]


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
            sol, stored = prob.precomputed
            prob.precomputed = None
        else:
            sol, stored = _forward(prob, y0, grid, t_out, store=True, probe=True)
        ctx.prob = prob
        ctx.y0_dtype = y0.dtype
        if isinstance(stored, torch.Tensor):
            ctx.stored_list = None
            ctx.save_for_backward(stored, grid, t_out, *params)
        else:  # adaptive: a list of per-step states, their number known only after the solve
            ctx.stored_list = stored
            ctx.save_for_backward(grid, t_out, *params)
        return sol

    @staticmethod
    def backward(ctx, grad_sol):
        # Grad mode is on in a backward exactly when the caller asked for create_graph=True: a
        # second derivative would silently be zero (the VJPs below build no graph), so refuse.
        if torch.is_grad_enabled():
            raise RuntimeError(_HIGHER_ORDER.format(what="create_graph=True (a second derivative)"))
        if ctx.stored_list is None:
            stored, grid, t_out, *params = ctx.saved_tensors
        else:
            stored = ctx.stored_list
            grid, t_out, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        g_y0, g_grid, g_tout, g_params = _backward(ctx.prob, stored, grid, t_out, params, grad_sol, needs)
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
