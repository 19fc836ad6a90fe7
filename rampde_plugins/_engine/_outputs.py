"""Output plans: where a solve's outputs fall among its steps and how they are interpolated.

Built on the host once per solve; the forward writes the outputs of each step, the adjoint sweep
asks for the same values with a graph and for their cotangents.
"""

from __future__ import annotations

import math

import torch

from ._steppers import StepData


#: Dense output between grid points (torchdiffeq's fixed-grid ``interp`` option).
INTERPOLATIONS = ("linear", "cubic")


class _SharedTimeOutputs:
    """torchdiffeq's fixed-grid outputs: ``sol[j]`` at ``t_out[j]``, one time for the whole state.

    ``sol[0] = y0``; ``t_out[j]`` (j >= 1) is produced by the step with ``t_n < t_j <= t_{n+1}``, as
    ``y_{n+1}`` itself when ``t_j == t_{n+1}`` and ``interp == "linear"`` (torchdiffeq returns it without
    interpolating) and otherwise by linear or cubic Hermite interpolation.
    """

    def __init__(self, t_out, grid_cpu, interp):
        self.t_out, self.interp = t_out, interp
        tout_cpu = t_out.detach().cpu().contiguous()  # searchsorted warns (and copies) on a strided view
        self.steps: dict[int, list] = {}
        if grid_cpu is not None and tout_cpu.shape[0] > 1:
            step_of = (torch.searchsorted(grid_cpu, tout_cpu[1:], side="left") - 1).clamp_(min=0)
            # The cubic formula is always applied, also on grid points, as torchdiffeq does, so the
            # one-sided time derivatives at grid points agree with the host's.
            exact = (tout_cpu[1:] == grid_cpu[step_of + 1]) & (interp == "linear")
            for j, (n, ex) in enumerate(zip(step_of.tolist(), exact.tolist()), start=1):
                self.steps.setdefault(n, []).append((j, ex))

    def allocate(self, y, dtype):
        sol = torch.empty((self.t_out.shape[0], *y.shape), dtype=dtype, device=y.device)
        sol[0] = y
        return sol

    def y0_cotangent(self, g):
        return g[0]

    def last_active_step(self, g) -> int:
        if g.shape[0] <= 1:
            return -1
        active = (g[1:].reshape(g.shape[0] - 1, -1) != 0).any(dim=1).tolist()
        return max((n for n, outs in self.steps.items() if any(active[j - 1] for j, _ in outs)), default=-1)

    def evaluate(self, entry, sd: StepData, t_leaves):
        """Values of the step's outputs (differentiable) -- y1 itself for exact hits."""
        values = []
        for (j, exact), tj in zip(entry, t_leaves):
            if exact:
                values.append(sd.y1)
                continue
            if callable(self.interp):  # a host's own dense output, e.g. torchdiffeq's adaptive fit
                values.append(self.interp(sd, tj))
                continue
            s = ((tj - sd.t0) / (sd.t1 - sd.t0)).to(sd.y0.dtype)
            if self.interp == "linear":
                values.append(sd.y0 + s * (sd.y1 - sd.y0))
            else:
                dt = (sd.t1 - sd.t0).to(sd.y0.dtype)
                f1 = sd.f_end()
                values.append((1 + 2 * s) * (1 - s) * (1 - s) * sd.y0 + s * (1 - s) * (1 - s) * dt * sd.f_start()
                              + s * s * (3 - 2 * s) * sd.y1 + s * s * (s - 1) * dt * f1)
        return values

    def times(self, entry, t_out, need_grad):
        return [None if exact else (t_out[j].clone().requires_grad_(True) if need_grad else t_out[j]) for j, exact in entry]

    def write(self, sol, entry, values):
        for (j, _), v in zip(entry, values):
            sol[j] = v

    def cotangents(self, g, entry):
        return [g[j] for j, _ in entry]

    def add_time_grads(self, g_tout, entry, grads):
        for (j, exact), gj in zip(entry, grads):
            if gj is not None:
                g_tout[j] += gj.to(g_tout.dtype)


class BatchedOutputs:
    """torchode's outputs: ``ys[b, j]`` at ``t_eval[b, j]``, one time grid per sample.

    Output ``(b, j)`` is produced by the first step whose interval contains it (in that sample's
    direction of time), by ``interpolant(step_data)`` -- any object with ``evaluate(t, sample_idx)``,
    such as the host method's own dense output.  ``t_eval[b, 0] == t_start[b]`` returns ``y0[b]``.

    Args:
        t_eval: ``(B, M)`` output times (time dtype).
        interpolant: ``callable(StepData) -> object`` with ``evaluate(t, sample_idx)``.
    """

    def __init__(self, t_eval, interpolant):
        self.t_eval, self.interpolant = t_eval, interpolant
        self.steps: dict[int, tuple] = {}
        self.at_start = None

    def plan(self, grid_cpu):
        """Assign outputs to steps (host side, once; grid_cpu is ``(N+1, B)``)."""
        tev = self.t_eval.detach().cpu()
        direction = torch.where(grid_cpu[-1] >= grid_cpu[0], 1.0, -1.0).to(grid_cpu.dtype)
        g_norm = (grid_cpu * direction).T.contiguous()  # (B, N+1), non-decreasing per row
        e_norm = (tev * direction[:, None]).contiguous()
        step_of = torch.searchsorted(g_norm, e_norm, side="left") - 1  # (B, M)
        # Outputs at a sample's start time are y0 itself (all of a sample's outputs when its span is
        # empty, t_start == t_end, as torchode returns y0 there).
        at_start = tev == grid_cpu[0][:, None]
        step_of = torch.where(at_start, -1, step_of.clamp(min=0))
        self.at_start = at_start.to(self.t_eval.device)
        dev = self.t_eval.device
        flat = step_of.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat[flat >= 0], minlength=grid_cpu.shape[0] - 1).tolist()
        sample = (order // tev.shape[1])
        evalj = (order % tev.shape[1])
        offset = int((flat < 0).sum())
        for n, c in enumerate(counts):
            if c:
                sl = slice(offset, offset + c)
                self.steps[n] = (sample[sl].to(dev), evalj[sl].to(dev))
                offset += c

    def start_incremental(self, t_start):
        """For adaptive solves: outputs are assigned as steps are accepted (see :meth:`assign`)."""
        self.at_start = self.t_eval == t_start[:, None]
        self._pending = ~self.at_start

    def assign(self, n, t_old, t_new, direction):
        """Outputs passed by step ``n`` (torchode's rule: the first step whose end reaches them)."""
        passed = ((t_new[:, None] - self.t_eval) * direction[:, None] >= 0) & self._pending
        passed &= (t_new != t_old)[:, None]
        if not bool(passed.any()):
            return None
        self._pending &= ~passed
        sample, evalj = passed.nonzero(as_tuple=True)
        self.steps[n] = (sample, evalj)
        return self.steps[n]

    def allocate(self, y, dtype):
        ys = torch.full((y.shape[0], self.t_eval.shape[1], *y.shape[1:]), math.nan, dtype=dtype, device=y.device)
        mask = self.at_start.reshape(*self.at_start.shape, *([1] * (y.ndim - 1)))
        return torch.where(mask, y[:, None].to(dtype), ys)

    def y0_cotangent(self, g):
        mask = self.at_start.reshape(*self.at_start.shape, *([1] * (g.ndim - 2))).to(g.dtype)
        return (g * mask).sum(dim=1)

    def last_active_step(self, g) -> int:
        active = (g.reshape(g.shape[0], g.shape[1], -1) != 0).any(dim=2)
        return max((n for n, (b, j) in self.steps.items() if bool(active[b, j].any())), default=-1)

    def evaluate(self, entry, sd: StepData, t_leaves):
        sample, _ = entry
        return [self.interpolant(sd).evaluate(t_leaves[0], sample)]

    def times(self, entry, t_eval, need_grad):
        sample, evalj = entry
        t = t_eval[sample, evalj]
        return [t.clone().requires_grad_(True) if need_grad else t]

    def write(self, ys, entry, values):
        sample, evalj = entry
        ys[sample, evalj] = values[0].to(ys.dtype)

    def cotangents(self, g, entry):
        sample, evalj = entry
        return [g[sample, evalj]]

    def add_time_grads(self, g_tout, entry, grads):
        if grads[0] is not None:
            sample, evalj = entry
            g_tout.index_put_((sample, evalj), grads[0].to(g_tout.dtype), accumulate=True)


class StageInterpolation:
    """Dense output of a step through its stage *states*: the polynomial through ``y0`` at ``t0``, the
    state of each stage at ``t0 + c_i h`` (one per distinct ``c``, the last stage with it) and ``y1`` at
    ``t1``.

    For implicit methods on stiff problems: a Hermite interpolant uses slopes ``f(t, y)``, and the
    slope of a stiff component amplifies the state's error by the Jacobian's norm (``|lambda| * err *
    h`` in the output); the stage states carry no such factor.

    ``StageInterpolation(tableau)(step_data)`` is an object with ``at(t)`` (one time for the whole
    state, torchdiffeq's layout) and ``evaluate(t, sample_idx)`` (torchode's interpolation protocol).
    """

    def __init__(self, tableau):
        nodes = {0.0: None, 1.0: None}
        for i, c in enumerate(tableau.c):
            if 0.0 < c < 1.0:
                nodes[c] = i
        self.nodes = sorted(nodes.items())

    def __call__(self, sd):
        states = [sd.y0 if c == 0.0 else sd.y1 if c == 1.0 else sd.stage_state(i) for c, i in self.nodes]
        return _StagePolynomial([c for c, _ in self.nodes], states, sd.t0, sd.t1)


class _StagePolynomial:
    __slots__ = ("c", "states", "t0", "t1")

    def __init__(self, c, states, t0, t1):
        self.c, self.states, self.t0, self.t1 = c, states, t0, t1

    def _weights(self, s):
        out = []
        for j, cj in enumerate(self.c):
            w = torch.ones_like(s)
            for m, cm in enumerate(self.c):
                if m != j:
                    w = w * (s - cm) / (cj - cm)
            out.append(w)
        return out

    def at(self, t):
        dtype = self.states[0].dtype
        s = ((t - self.t0) / (self.t1 - self.t0)).to(dtype)
        return sum(w * z for w, z in zip(self._weights(s), self.states))

    def evaluate(self, t, idx):
        dtype = self.states[0].dtype
        s = ((t - self.t0[idx]) / (self.t1[idx] - self.t0[idx])).to(dtype)
        shape = (-1, *([1] * (self.states[0].ndim - 1)))
        return sum(w.reshape(shape) * z[idx] for w, z in zip(self._weights(s), self.states))
