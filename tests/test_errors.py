"""Bad input: a clear ValueError/TypeError that names the problem, and nothing changed."""

import math

import pytest
import torch
from torchdiffeq import odeint, odeint_adjoint

import rampde_plugins  # noqa: F401

from .helpers import MLPField

T = torch.tensor([0.0, 0.5, 1.0])


def _call(y0=None, t=T, method="rampde_rk4", options=None, func=None):
    y0 = torch.ones(2, 3) if y0 is None else y0
    return odeint(func or (lambda t, y: -y), y0, t, method=method, options=options)


@pytest.mark.parametrize("bad, where", [(math.nan, 4), (math.inf, 1)])
def test_nonfinite_y0(bad, where):
    y0 = torch.ones(2, 3)
    y0.view(-1)[where] = bad
    with pytest.raises(ValueError, match=rf"y0 contains NaN or inf \(first at flat index {where}\)"):
        _call(y0)


def test_nonfinite_y0_in_tuple_names_the_part():
    with pytest.raises(ValueError, match=r"y0\[1\] contains NaN or inf"):
        _call((torch.ones(2), torch.tensor([1.0, math.nan])))


def test_half_precision_t():
    with pytest.raises(ValueError, match=r"t has dtype torch.float16; use float32 or float64"):
        _call(t=T.half())


def test_non_monotone_t_names_the_index():
    with pytest.raises(ValueError, match=r"strictly increasing or strictly decreasing; t\[1\]=0.5, t\[2\]=0.25"):
        _call(t=torch.tensor([0.0, 0.5, 0.25, 1.0]))


def test_repeated_t():
    with pytest.raises(ValueError, match=r"strictly increasing"):
        _call(t=torch.tensor([0.0, 0.5, 0.5]))


def test_unknown_precision_lists_registered():
    with pytest.raises(ValueError, match=r"unknown precision policy 'fp8'; registered policies: bf16, fp16, fp16_gradscaler, fp32, fp64"):
        _call(options={"precision": "fp8"})


def test_precision_of_wrong_type():
    with pytest.raises(TypeError, match=r"options\['precision'\] must be a policy name or a PrecisionPolicy, got float"):
        _call(options={"precision": 16.0})


def test_unknown_option_named():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'step', 'tol'; valid options: step_size, grid_constructor"):
        _call(options={"step": 0.1, "tol": 1e-3})


@pytest.mark.parametrize("step", [0.0, -0.1, math.inf, "0.1"])
def test_bad_step_size(step):
    with pytest.raises(ValueError, match=r"options\['step_size'\]=.* must be a positive finite number"):
        _call(options={"step_size": step})


def test_bad_interp():
    with pytest.raises(ValueError, match=r"options\['interp'\]='quadratic'; choose one of linear, cubic"):
        _call(options={"interp": "quadratic"})


def test_grid_constructor_with_wrong_endpoints():
    with pytest.raises(ValueError, match=r"the time grid must start at t\[0\]=0.0 and end at t\[-1\]=1.0"):
        _call(options={"grid_constructor": lambda f, y0, t: torch.linspace(0, 2, 5)})


@pytest.mark.parametrize("bad", [5, (1 << 16) - 1, 1 << 16, (1 << 16) + 3])
def test_long_grid_not_increasing_names_the_index(bad):
    # the grid is checked a chunk (2^16 points) at a time: a fault on either side of a chunk boundary
    n = (1 << 16) + 8
    grid = torch.linspace(0.0, 1.0, n)
    grid[bad + 1] = grid[bad]
    with pytest.raises(ValueError, match=rf"strictly increasing; grid\[{bad}\]=.* >= grid\[{bad + 1}\]"):
        _call(t=torch.tensor([0.0, 1.0]), options={"grid_constructor": lambda f, y0, t: grid})
    grid[bad + 1] = math.nan
    with pytest.raises(ValueError, match=r"must be finite"):
        _call(t=torch.tensor([0.0, 1.0]), options={"grid_constructor": lambda f, y0, t: grid})


def test_unsupported_autocast_dtype_on_device_is_not_silent():
    policy = rampde_plugins.PrecisionPolicy("fp32_autocast", torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"torch.autocast does not support on device type 'cpu'; valid autocast dtypes there: float16, bfloat16"):
        _call(options={"precision": policy})


def test_hidden_parameters_in_a_closure():
    a = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"uses 1 tensor\(s\) that require grad but are not among the parameters .*adjoint_params"):
        _call(func=lambda t, y: y @ a)
    # With the parameter declared it works and the gradient arrives.
    y = _call(func=lambda t, y: y @ a, options={"adjoint_params": (a,)})
    y.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_internal_leaves_of_the_field_are_not_reported():
    """A CNF-style field creates its own leaf (detach().requires_grad_()); that is not a hidden parameter."""
    net = MLPField(dim=2, dtype=torch.float32)

    def func(t, y):
        with torch.enable_grad():
            z = y.detach().requires_grad_()
            out = net(t, z)
            (jac_diag,) = torch.autograd.grad(out.sum(), z, create_graph=True)
        return out + 0 * jac_diag

    y0 = torch.randn(3, 2, requires_grad=True)
    odeint(func, y0, T, method="rampde_euler", options={"adjoint_params": tuple(net.parameters())}).sum().backward()
    assert y0.grad is not None


def test_odeint_adjoint_refused_with_advice_without_torchdiffeqs_adjoint_function():
    # A torchdiffeq whose odeint_adjoint does not go through OdeintAdjointMethod.apply (a capability
    # the adapter checks): rampde methods cannot get the quadrature adjoint there, and are refused
    # rather than run under torchdiffeq's continuous adjoint.
    import rampde_plugins
    import torchdiffeq._impl.adjoint as adj

    rampde_plugins.uninstall("torchdiffeq")
    original = adj.OdeintAdjointMethod
    adj.OdeintAdjointMethod = object()
    try:
        rampde_plugins.install("torchdiffeq")
        func = MLPField(dtype=torch.float32)
        before = {k: v.clone() for k, v in func.state_dict().items()}
        with pytest.raises(ValueError, match=r"odeint_adjoint\(method='rampde_rk4'\) needs torchdiffeq's OdeintAdjointMethod"):
            odeint_adjoint(func, torch.ones(2, 3), T, method="rampde_rk4")
        assert all(torch.equal(v, before[k]) for k, v in func.state_dict().items())
    finally:
        rampde_plugins.uninstall("torchdiffeq")
        adj.OdeintAdjointMethod = original
        rampde_plugins.install("torchdiffeq")


def test_rampde_as_adjoint_method_refused():
    func = MLPField(dtype=torch.float32)
    y = odeint_adjoint(func, torch.ones(2, 3), T, method="rk4", adjoint_method="rampde_rk4",
                       options={"step_size": 0.1}, adjoint_options={"step_size": 0.1})
    with pytest.raises(ValueError, match=r"adjoint_method='rampde_rk4': rampde methods are not integrators"):
        y.sum().backward()
    assert all(p.grad is None for p in func.parameters())


def test_wrong_output_shape_of_the_field():
    with pytest.raises(ValueError, match=r"vector field returned shape \(2, 1\) for a state of shape \(2, 3\)"):
        _call(func=lambda t, y: y[:, :1])


def test_user_options_dict_not_mutated():
    opts = {"step_size": 0.1, "precision": "fp32"}
    _call(options=opts)
    assert opts == {"step_size": 0.1, "precision": "fp32"}


def test_length_one_t_returns_y0():
    y0 = torch.randn(2, 3, requires_grad=True)
    out = odeint(lambda t, y: -y, y0, torch.tensor([0.3]), method="rampde_rk4")
    assert out.shape == (1, 2, 3) and torch.equal(out[0], y0)
