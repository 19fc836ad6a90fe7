"""Shared definitions: every test that loops over methods or policies uses these lists.

No host library is imported here: the core's own tests (test_core.py) use this module too.  What
needs torchdiffeq's internals is in ``host_helpers``."""

import torch

import rampde_plugins

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
