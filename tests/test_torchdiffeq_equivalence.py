"""fp64: rampde methods reproduce torchdiffeq's own methods, and their gradients pass gradcheck."""

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins  # noqa: F401  (installs the adapter)

from .helpers import MLPField, rel
from .host_helpers import HOST_METHODS, host_method_params

# Same arithmetic up to the order of a few additions: agreement to 1e-12 relative is the bound the
# issue sets; observed differences are ~1e-16.
TOL = 1e-12

T_ON_GRID = torch.tensor([0.0, 0.4, 1.0, 1.7], dtype=torch.float64)
T_OFF_GRID = torch.tensor([0.0, 0.33, 0.91, 1.7], dtype=torch.float64)  # not multiples of 0.1

OPTION_CASES = {
    "grid=t": (T_ON_GRID, {}),
    "step_size,linear": (T_OFF_GRID, {"step_size": 0.1}),
    "step_size,cubic": (T_OFF_GRID, {"step_size": 0.1, "interp": "cubic"}),
    "step_size,perturb": (T_OFF_GRID, {"step_size": 0.1, "perturb": True}),
    "grid_constructor": (T_OFF_GRID, {"grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], 23, dtype=t.dtype)}),
}


def _both(method, y0, t, opts, func, params=None):
    extra = {} if params is None else {"adjoint_params": params}
    ours = odeint(func, y0, t, method="rampde_" + method, options=dict(opts, precision="fp64", **extra))
    host = odeint(func, y0, t, method=method, options=opts)
    return ours, host


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("method", host_method_params())
def test_trajectory_and_gradients_match_torchdiffeq(method, case):
    t, opts = OPTION_CASES[case]
    func = MLPField()
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    t = t.clone().requires_grad_()
    ours, host = _both(method, y0, t, opts, func)
    assert ours.dtype == torch.float64 and ours.shape == host.shape
    assert rel(ours, host) < TOL
    # Not required by the issue but free: the discrete adjoint equals backprop through the host.
    wrt = [y0, t, *func.parameters()]
    g_ours = torch.autograd.grad((ours**2).sum(), wrt)
    g_host = torch.autograd.grad((host**2).sum(), wrt)
    for go, gh in zip(g_ours, g_host):
        assert rel(go, gh) < 1e-10


@pytest.mark.parametrize("method", host_method_params())
def test_tuple_state_and_decreasing_time_match(method):
    func_a, func_b = MLPField(seed=2), MLPField(dim=2, seed=3)

    def func(t, y):
        u, v = y
        return func_a(t, u) + 0.1 * v.sum(), func_b(t, v) * u.mean()

    y0 = (torch.randn(4, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    t = torch.tensor([1.7, 1.1, 0.45, 0.0], dtype=torch.float64)  # decreasing
    params = (*func_a.parameters(), *func_b.parameters())  # a closure: declare what it uses
    ours, host = _both(method, y0, t, {"step_size": 0.1}, func, params)
    assert isinstance(ours, tuple) and len(ours) == 2
    for o, h in zip(ours, host):
        assert rel(o, h) < TOL


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", HOST_METHODS)
def test_gradcheck_y0_t_params(method):
    func = MLPField(dim=2, hidden=5)
    params = list(func.parameters())
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.37, 0.83], dtype=torch.float64, requires_grad=True)  # off the 0.1 grid (a grid point on t[-1] is a kink)

    def fn(y0, t, *params):
        return odeint(func, y0, t, method="rampde_" + method, options={"precision": "fp64", "step_size": 0.1})

    _gradcheck(fn, (y0, t, *params))


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_gradcheck_tuple_state_decreasing_time_closure(interp):
    a = torch.tensor([[-0.3, 0.8], [-0.7, -0.2]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.4, -0.6], dtype=torch.float64, requires_grad=True)

    def func(t, y):
        u, v = y
        return u @ a + v[:, None] * torch.sin(t), (u * w).sum(-1) - v

    def fn(u0, v0, t, a, w):
        u, v = odeint(func, (u0, v0), t, method="rampde_rk4",
                      options={"precision": "fp64", "step_size": 0.15, "interp": interp, "adjoint_params": (a, w)})
        return u, v

    u0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.62, 0.2], dtype=torch.float64, requires_grad=True)  # decreasing
    _gradcheck(fn, (u0, v0, t, a, w))


def test_gradcheck_time_on_grid_without_step_size():
    func = MLPField(dim=2, hidden=4)
    y0 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1.2, 7, dtype=torch.float64).requires_grad_()
    _gradcheck(lambda y0, t: odeint(func, y0, t, method="rampde_heun3", options={"precision": "fp64"}), (y0, t))


def test_full_precision_time_reaches_the_function():
    """torchdiffeq's wrapper casts t to the state's dtype; rampde calls f with full-precision time."""
    seen = []

    def func(t, y):
        seen.append((t.dtype, float(t)))
        return -y

    y0 = torch.ones(2, dtype=torch.float16)
    t = torch.tensor([1000.0, 1000.3], dtype=torch.float32)
    out = odeint(func, y0, t, method="rampde_euler")
    assert out.dtype == torch.float32  # the fp16 policy's state/output dtype
    assert seen[0][0] == torch.float32 and seen[0][1] == pytest.approx(1000.0)
    # fp16 would have rounded 1000.3 to 1000.0 (spacing 0.5 there); the stage times stay distinct.
    assert {round(s[1], 3) for s in seen} <= {1000.0}  # euler evaluates at t0 only
    seen.clear()
    odeint(func, y0, t, method="rampde_midpoint")
    assert any(abs(s[1] - 1000.15) < 1e-3 for s in seen)
