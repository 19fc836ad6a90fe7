"""Bookkeeping per step is O(1) Python objects (issue 10, item 5): the solver keeps no tensor object per
step beyond chunked storage, neither after the solve nor while it runs.  Memory in bytes is measured by
benchmarks/bookkeeping.py; here the count of live tensor objects, which is exact and independent of
the allocator."""

import gc

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import rampde_plugins  # noqa: F401

from .host_helpers import needs_torchdiffeq_callbacks


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ hooks


class Field(nn.Module):
    """y @ a; counts the live tensors once, at the last forward step (callback_step)."""

    def __init__(self, a, n):
        super().__init__()
        self.a, self.n, self.during = a, n, None

    def forward(self, t, y):
        return y @ self.a

    def callback_step(self, t0, y0, dt):
        if self.during is None and float(t0) >= 1.0 - 1.5 / self.n:
            self.during = _live_tensors()


@needs_torchdiffeq_callbacks  # the count during the solve is taken in callback_step
@pytest.mark.parametrize("method, opts", [
    ("rampde_rk4", lambda n: {"step_size": 1.0 / n}),
    ("rampde_dopri5", lambda n: {"max_step": 1.0 / n, "first_step": 1.0 / n}),
])
@pytest.mark.parametrize("grad", [True, False])
def test_live_tensor_objects_do_not_grow_with_the_number_of_steps(method, opts, grad):
    a = (-0.5 * torch.eye(4)).requires_grad_(grad)
    during, after = {}, {}
    for n in (500, 5000):
        field = Field(a, n)
        before = _live_tensors()
        with torch.set_grad_enabled(grad):
            y = odeint(field, torch.ones(4, 4), torch.tensor([0.0, 1.0]), method=method,
                       options={**opts(n), "precision": "fp32", "adjoint_params": (a,)}, rtol=1e-3, atol=1e-3)
        after[n] = _live_tensors() - before  # with grad the solution's graph holds what the backward needs
        during[n] = field.during - before
        assert y.requires_grad == grad
        del y
    # 4500 more steps: a few more storage chunks, not thousands of tensors
    assert during[5000] - during[500] < 40 and after[5000] - after[500] < 40, (during, after)
