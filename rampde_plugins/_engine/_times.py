"""Time layouts: stage-time tables of a grid, a chunk of steps at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._problem import _Problem


class _StepTable:
    """Stage times and step sizes of a fixed grid, computed a chunk of steps at a time.

    Precomputing them for the whole grid made one tensor view (and one float) per step -- memory
    that grew with the number of steps even under ``no_grad``.  A chunk of 256 steps is one table
    and one host synchronisation; the backward walks it in reverse, one chunk reload per 256 steps.
    """

    CHUNK = 256

    def __init__(self, prob: "_Problem", grid: torch.Tensor, y: torch.Tensor):
        self.prob, self.grid, self.y = prob, grid, y
        self.n_steps = grid.shape[0] - 1
        self.start, self.stop = 0, -1

    def h_at(self, n: int) -> torch.Tensor:
        """Step n's size as a 0-d tensor in the time dtype: a view into the loaded chunk's sizes, or
        ``grid[n+1] - grid[n]`` outside it (a whole-grid difference would be one more time value per
        step held for the solve)."""
        if self.start <= n < self.stop:
            return self.h_chunk[n - self.start]
        return self.grid[n + 1] - self.grid[n]

    def __getitem__(self, n: int):
        """(stage times of step n, its step size: a float, or a state-shaped tensor per sample)."""
        if not self.start <= n < self.stop:
            c0 = n - n % self.CHUNK
            c1 = min(c0 + self.CHUNK, self.n_steps)
            pts = self.grid[c0 : c1 + 1]
            self.times = self.prob.stage_time_table(pts, offset=c0).unbind(0)
            h = self.h_chunk = pts[1:] - pts[:-1]
            # floats: the steps then use fused add(alpha=h*a_ij) (one synchronisation per chunk)
            self.h = [self.prob.h_for_state(x, self.y) for x in h] if self.prob.per_sample else h.tolist()
            self.start, self.stop = c0, c1
        return self.times[n - self.start].unbind(0), self.h[n - self.start]


def _check_time_dtype(name, t):
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name} has dtype {t.dtype}; time must be float32 or float64 (a half-precision time "
            "cannot resolve small steps: 1000.3 is 1000.0 in fp16)"
        )
