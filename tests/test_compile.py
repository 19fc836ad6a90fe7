"""``torch.compile`` with rampde methods: a compiled field, and a compiled function that calls ``odeint``.

A compiled field is an ordinary callable to the engine; a compiled function around ``odeint`` falls
back to eager where dynamo cannot trace (the engine's Python control flow, its autograd Functions)
and compiles the rest.  Both give the eager gradient (to fp32 rounding: compiled kernels fuse)."""

from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins  # noqa: F401  (installs the rampde methods)


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(call, f, y0):
    ys = call(y0)
    return [g.detach() for g in torch.autograd.grad(ys[-1].square().sum(), (y0, *f.parameters()))]


def _close(a, b, tol):
    return all(float((x - y).abs().max()) <= tol * max(1.0, float(y.abs().max())) for x, y in zip(a, b))


T = torch.tensor([0.0, 1.0])

# (torch.compile imports parts of torch.jit that warn about themselves,
# and dynamo reports graph breaks, and the warnings of what it traces, as UserWarnings, which this
# suite would otherwise turn into errors inside the tracer)
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("method, options", [("rampde_rk4", {"step_size": 0.25}), ("rampde_dopri5", {})])
def test_a_compiled_field(method, options):
    f = _Field()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    eager = _grads(lambda y: odeint(f, y, T, method=method, options=options), f, y0)
    compiled_f = torch.compile(f)
    compiled = _grads(lambda y: odeint(compiled_f, y, T, method=method, options=options,
                                       **({"rtol": 1e-7, "atol": 1e-9} if not options else {})), f, y0)
    assert _close(compiled, eager, 1e-5)


def test_a_compiled_function_that_calls_odeint():
    f = _Field()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def solve(y):
        return odeint(f, y, T, method="rampde_rk4", options={"step_size": 0.25})

    eager = _grads(solve, f, y0)
    compiled = _grads(torch.compile(solve), f, y0)
    assert _close(compiled, eager, 1e-5)
