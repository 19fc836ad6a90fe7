"""install()/uninstall(): idempotent, reversible, and torchdiffeq's own methods untouched."""

import importlib

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins

from .helpers import MLPField
from .host_helpers import needs_torchdiffeq_callbacks

odeint_mod = importlib.import_module("torchdiffeq._impl.odeint")
adjoint_mod = importlib.import_module("torchdiffeq._impl.adjoint")
misc = importlib.import_module("torchdiffeq._impl.misc")


@pytest.fixture
def reinstall():
    yield
    rampde_plugins.install("torchdiffeq")


def _host_runs():
    torch.manual_seed(0)
    func, y0 = MLPField(dtype=torch.float32), torch.randn(4, 3)
    t = torch.linspace(0, 1, 5)
    return [odeint(func, y0, t, method=m, options=o) for m, o in [("rk4", {"step_size": 0.1}), ("dopri5", None), ("euler", None)]]


def test_uninstall_restores_torchdiffeq_exactly_and_is_idempotent(reinstall):
    with_adapter = _host_runs()
    ours = sorted(k for k in odeint_mod.SOLVERS if k.startswith("rampde_"))
    assert ours == sorted("rampde_" + n for n in rampde_plugins.get_registry().tableaus)
    rampde_plugins.uninstall("torchdiffeq")
    rampde_plugins.uninstall("torchdiffeq")
    assert not any(k.startswith("rampde_") for k in odeint_mod.SOLVERS)
    assert odeint_mod._check_inputs is misc._check_inputs and adjoint_mod._check_inputs is misc._check_inputs
    without = _host_runs()
    for a, b in zip(with_adapter, without):
        assert torch.equal(a, b)  # the host's own methods behave bit-for-bit the same
    with pytest.raises(ValueError, match='Invalid method "rampde_rk4"'):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4")
    rampde_plugins.install("torchdiffeq")
    snapshot = dict(odeint_mod.SOLVERS)
    rampde_plugins.install("torchdiffeq")
    assert dict(odeint_mod.SOLVERS) == snapshot


def test_unknown_adapter_name():
    with pytest.raises(ValueError, match=r"unknown adapter 'jax'; registered adapters: torchdiffeq"):
        rampde_plugins.install("jax")


@needs_torchdiffeq_callbacks
def test_callbacks_are_called_per_step():
    calls, adjoint_calls = [], []

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(-0.5))

        def forward(self, t, y):
            return self.w * y

        def callback_step(self, t0, y0, dt):
            calls.append((float(t0), float(dt), tuple(y0.shape)))

        def callback_step_adjoint(self, t0, y0, dt):
            adjoint_calls.append(float(t0))

    y = odeint(Field(), torch.ones(2, 3), torch.tensor([0.0, 1.0]), method="rampde_rk4", options={"step_size": 0.25})
    assert [c[0] for c in calls] == [0.0, 0.25, 0.5, 0.75] and all(c[1] == 0.25 and c[2] == (2, 3) for c in calls)
    y[-1].sum().backward()
    assert adjoint_calls == [0.75, 0.5, 0.25, 0.0]
    assert odeint_mod.SOLVERS["rampde_rk4"].valid_callbacks() == {"callback_step"}
