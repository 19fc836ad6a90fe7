"""Shared definitions: every test that loops over methods or policies uses these lists."""

import importlib.metadata

import pytest
import torch
from torchdiffeq._impl import misc as _torchdiffeq_misc
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

import rampde_plugins

#: rampde methods that torchdiffeq also has under the same name (compared 1:1 with the host).
HOST_METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]
_TORCHDIFFEQ = importlib.metadata.version("torchdiffeq")


def host_method_params():
    """HOST_METHODS for parametrize; a method this torchdiffeq lacks (heun3 < 0.2.4, heun2 < 0.2.5) skips."""
    return [
        pytest.param(m, marks=pytest.mark.skipif(
            m not in _TORCHDIFFEQ_SOLVERS, reason=f"torchdiffeq {_TORCHDIFFEQ} has no method {m!r} to compare with"))
        for m in HOST_METHODS
    ]


#: torchdiffeq's callback API (callback_step, callback_accept_step, ...; 0.2.4+).
needs_torchdiffeq_callbacks = pytest.mark.skipif(
    not hasattr(_torchdiffeq_misc, "_all_callback_names"),
    reason=f"torchdiffeq {_TORCHDIFFEQ} has no callback API (callback_step etc., torchdiffeq >= 0.2.4)",
)

#: every built-in method (convergence order is measured for each).
ALL_METHODS = sorted(rampde_plugins.get_registry().tableaus)
#: every built-in policy.
ALL_POLICIES = sorted(rampde_plugins.get_registry().policies)
LOW_PRECISION_POLICIES = ["bf16", "fp16", "fp16_gradscaler"]


def rel(a, b):
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


class MLPField(torch.nn.Module):
    """A small non-autonomous vector field f(t, y) = W2 tanh(W1 y + b1) cos(t) + b2."""

    def __init__(self, dim=3, hidden=16, dtype=torch.float64, seed=0, batched_time=False):
        super().__init__()
        self.batched_time = batched_time  # torchode passes t of shape (batch,)
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(dim, hidden, dtype=dtype)
        self.l2 = torch.nn.Linear(hidden, dim, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)

    def forward(self, t, y):
        c = torch.cos(t)
        return self.l2(torch.tanh(self.l1(y))) * (c[:, None] if self.batched_time else c)


def linear_problem(dim=10, batch=12, seed=0):
    """The 10-dim stable linear problem of the mixed-precision tests: (A, y0) in float64.

    A = -0.5 I + 0.5 (M - M^T) - 0.2 M M^T with M ~ N(0, 1/dim): eigenvalues with real parts in
    about [-0.95, -0.55] (stable, mildly decaying, rotating).
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    a = -0.5 * torch.eye(dim, dtype=torch.float64) + 0.5 * (m - m.T) - 0.2 * m @ m.T
    y0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return a, y0


class FakeEntryPoint:
    """Enough of an importlib.metadata entry point for pluggy's loader; ``error`` makes load() raise."""

    def __init__(self, name, obj=None, *, error=None, group="rampde_plugins"):
        self.name, self.group, self._obj, self._error = name, group, obj, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


class FakeDist:
    """Enough of importlib.metadata.Distribution for pluggy's entry-point loader."""

    def __init__(self, name, version, entry_points):
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = entry_points

    @property
    def name(self):
        return self.metadata["name"]
