"""Host edge cases answer like the host or with a clear error (issue 10, item 4)."""

import importlib

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

import rampde_plugins  # noqa: F401  (activates the adapters)

F = lambda t, y: -y  # noqa: E731


def test_torchode_empty_span_returns_y0_like_torchode():
    y0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t_eval = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # sample 1: t_start == t_end
    ours = to.solve_ivp(F, y0, t_eval, method="rampde_rk4", dt0=0.1)
    host = to.solve_ivp(F, y0, t_eval, method="dopri5")
    # torchode returns y0 at t_start and leaves the repeated output NaN; every output of an empty
    # span is y0 here (the solution does not move)
    assert torch.equal(ours.ys[1, 0], host.ys[1, 0]) and torch.equal(ours.ys[1], y0[1].expand(2, 2))
    assert abs(ours.ys[0, -1, 0].item() - torch.exp(torch.tensor(-1.0)).item()) < 1e-5
    y0g = y0.clone().requires_grad_()
    ys = to.solve_ivp(F, y0g, t_eval, method="rampde_rk4", dt0=0.1).ys
    (g,) = torch.autograd.grad(ys[:, -1].sum(), y0g)
    assert torch.equal(g[1], torch.ones(2))  # the identity for the empty span


def test_torchode_empty_batch_returns_an_empty_solution():
    sol = to.solve_ivp(F, torch.ones(0, 2), torch.zeros(0, 3), method="rampde_rk4", dt0=0.1)
    assert sol.ys.shape == (0, 3, 2) and sol.status.shape == (0,)


@pytest.mark.parametrize("call, match", [
    (lambda: to.solve_ivp(F, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4", dt0=0.1),
     r"y0 must be \(batch, features\) as in torchode, got shape \(2,\)"),
    (lambda: to.solve_ivp(F, torch.ones(2, 2), torch.tensor([0.0, float("nan"), 1.0]), method="rampde_rk4", dt0=0.1),
     r"t_eval\[0, 1\]=nan: output times must be finite"),
    (lambda: to.solve_ivp(F, torch.ones(2, 2), torch.tensor([0.0, 1.0]), method="rampde_rk4", dt0=torch.full((3,), 0.1)),
     r"dt0 must be a number or a \(batch,\) = \(2,\) tensor, got shape \(3,\)"),
])
def test_torchode_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rampde_version_of_every_torchode_method_name():
    methods = importlib.import_module("torchode.interface").METHODS
    own = [m for m in methods if not m.startswith("rampde_")]
    assert own and all(f"rampde_{m}" in methods for m in own)
    y0 = torch.ones(2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for m in own:
        ctrl = to.IntegralController(1e-8, 1e-8, term=to.ODETerm(F))
        ours = to.solve_ivp(F, y0, t, method=f"rampde_{m}", controller=ctrl).ys
        assert abs(ours[0, -1, 0].item() - torch.exp(torch.tensor(-1.0, dtype=torch.float64)).item()) < 1e-5, m


def test_torchdiffeq_single_time_point_returns_a_copy():
    y0 = torch.ones(3)
    out = odeint(F, y0, torch.tensor([0.0]), method="rampde_rk4")
    host = odeint(F, y0, torch.tensor([0.0]), method="rk4")
    assert torch.equal(out, host) and out.data_ptr() != y0.data_ptr()
    out[0, 0] = 5.0
    assert y0[0] == 1.0


@pytest.mark.parametrize("method, opts", [("rampde_rk4", {"step_size": 0.25}), ("rampde_dopri5", {})])
@pytest.mark.parametrize("result, exc, match", [
    (lambda y: 1.0, TypeError, r"must return a tensor, got float"),
    (lambda y: torch.ones(3, dtype=torch.long), TypeError, r"real floating-point tensor, got torch.int64"),
    (lambda y: y.to(torch.complex64), TypeError, r"real floating-point tensor, got torch.complex64"),
    (lambda y: torch.ones(1), ValueError, r"returned shape \(1,\) for a state of shape \(3,\)"),
])
@pytest.mark.parametrize("when", ["always", "later"])
def test_torchdiffeq_bad_field_result_at_any_step(method, opts, result, exc, match, when):
    def field(t, y):
        return result(y) if when == "always" or float(t) > 0.5 else -y

    with pytest.raises(exc, match=match):
        odeint(field, torch.ones(3), torch.tensor([0.0, 1.0]), method=method, options=opts)
