"""The benchmark suite's problems: vector fields, data and training losses (deterministic seeds).

Every problem is built from a fixed seed, first in float32 and then cast, so the fp32 run and the
fp64 reference of one problem hold the same parameter and data values (the fp64 copy is exact).
A built problem (:class:`Case`) knows how to flatten its state to the ``(batch, features)`` layout
of batch-first libraries (torchode) and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SEED = 0


@dataclass
class Case:
    """One problem instance on one device and dtype."""

    func: nn.Module  # f(t, y) -> dy/dt; y is a tensor or a tuple of tensors (torchdiffeq layout)
    y0: object  # tensor or tuple of tensors
    t1: float  # integrate over [0, t1]
    n_steps: int  # fixed RK4 steps on [0, t1]
    loss: Callable  # state at t1 -> scalar training loss (computed in the case's dtype)
    flatten: Callable  # state -> (batch, features)
    unflatten: Callable  # (batch, features) -> state

    @property
    def step_size(self) -> float:
        return self.t1 / self.n_steps


@dataclass(frozen=True)
class Problem:
    key: str
    title: str
    build: Callable  # (smoke, n_steps, device, dtype) -> Case
    cpu_fp16: bool  # emulated fp16 on a CPU finishes quickly enough to run (tiny fields)


def _tensor_layout(y0: torch.Tensor):
    shape = y0.shape[1:]
    return (lambda y: y.reshape(y.shape[0], -1)), (lambda y: y.reshape(y.shape[0], *shape))


def _mse_to(target: torch.Tensor):
    return lambda y: (y.to(target.dtype) - target).square().mean()


def _place(func: nn.Module, tensors, device, dtype):
    """Everything is created in float32 from the seed, then cast: fp32 and fp64 share values."""
    return func.to(device, dtype), [x.to(device, dtype) for x in tensors]


def _gen() -> torch.Generator:
    """The data's generator (the parameters come from torch.manual_seed(SEED))."""
    return torch.Generator().manual_seed(SEED + 1000)


# -- (a) and (e): an MLP vector field --------------------------------------------------------------
class MLPField(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y)


def _mlp_case(dim, hidden, batch, n_steps, device, dtype) -> Case:
    torch.manual_seed(SEED)
    func = MLPField(dim, hidden)
    g = _gen()
    func, (y0, target) = _place(func, [torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)],
                                device, dtype)
    return Case(func, y0, 1.0, n_steps, _mse_to(target), *_tensor_layout(y0))


def build_mlp(smoke, n_steps, device, dtype):
    # Smoke: still 256x128 activations (128 KiB tensors), so every iteration's memory growth is
    # visible in the resident set.
    dim, hidden, batch, steps = (16, 128, 256, 4) if smoke else (64, 512, 1024, 50)
    return _mlp_case(dim, hidden, batch, n_steps or steps, device, dtype)


def build_tiny(smoke, n_steps, device, dtype):
    return _mlp_case(2, 50, 16, n_steps or (20 if smoke else 1000), device, dtype)


# -- (c): a convolutional ODE block ------------------------------------------------------------------
class ConvField(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t, y):
        return self.conv2(torch.tanh(self.conv1(y)))


def build_conv(smoke, n_steps, device, dtype):
    channels, size, batch, steps = (4, 8, 2, 2) if smoke else (64, 32, 32, 8)
    torch.manual_seed(SEED)
    func = ConvField(channels)
    g = _gen()
    shape = (batch, channels, size, size)
    func, (y0, target) = _place(func, [torch.randn(shape, generator=g), torch.randn(shape, generator=g)], device, dtype)
    return Case(func, y0, 1.0, n_steps or steps, _mse_to(target), *_tensor_layout(y0))


# -- (d): a continuous normalizing flow with the exact trace ----------------------------------------
class CNFField(nn.Module):
    """(x, logp) -> (dx, -tr(d dx / dx)); dx = MLP([x, t])."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2))

    def forward(self, t, state):
        x = state[0]
        # The trace needs a graph from x even where the solver runs without one (rampde's forward,
        # torchdiffeq's adjoint forward): then x is made a leaf; inside a graph it is used as is so
        # that the direct backprop flows through it.
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            tt = t.to(x.dtype)
            tt = tt.expand(x.shape[0], 1) if tt.ndim == 0 else tt.reshape(-1, 1)  # torchode: t is (batch,)
            dx = self.net(torch.cat([x, tt], dim=1))
            trace = sum(torch.autograd.grad(dx[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
        return dx, -trace.unsqueeze(1)


def eight_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    centers = torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)]) * 2.0
    idx = torch.randint(0, 8, (n,), generator=generator)
    return centers[idx] + 0.25 * torch.randn(n, 2, generator=generator)


def _cnf_nll(state):
    z, delta_logp = state
    z = z.to(delta_logp.dtype)
    log_base = -0.5 * z.square().sum(1, keepdim=True) - math.log(2 * math.pi)
    return -(log_base - delta_logp).mean()  # log p(x) = log N(z(1)) - int_0^1 (-tr) dt


def build_cnf(smoke, n_steps, device, dtype):
    hidden, batch, steps = (16, 64, 4) if smoke else (64, 512, 20)
    torch.manual_seed(SEED)
    func = CNFField(hidden)
    func, (x, logp) = _place(func, [eight_gaussians(batch, _gen()), torch.zeros(batch, 1)], device, dtype)
    return Case(func, (x, logp), 1.0, n_steps or steps, _cnf_nll,
                flatten=lambda s: torch.cat([s[0], s[1].to(s[0].dtype)], dim=1),
                unflatten=lambda y: (y[:, :2], y[:, 2:]))


PROBLEMS = {
    "a": Problem("a", "MLP field 64-512-64, batch 1024, 50 steps", build_mlp, cpu_fp16=False),
    "b": Problem("b", "tiny field 2-50-2, batch 16, 1000 steps (Python overhead)", build_tiny, cpu_fp16=True),
    "c": Problem("c", "conv ODE block 64x32x32, batch 32, 8 steps", build_conv, cpu_fp16=False),
    "d": Problem("d", "CNF, exact trace, 8 Gaussians, batch 512, 20 steps", build_cnf, cpu_fp16=True),
}
# (e) is problem (a) at these step counts.
SCALING_STEPS = (25, 50, 100, 200, 400, 800)
SCALING_STEPS_SMOKE = (2, 4, 8)


def build_case(key: str, *, smoke: bool, device, dtype=torch.float32, n_steps: int | None = None) -> Case:
    """Problem ``key`` ("e" = "a" with ``n_steps``) on ``device`` in ``dtype``."""
    return PROBLEMS["a" if key == "e" else key].build(smoke, n_steps, torch.device(device), dtype)
