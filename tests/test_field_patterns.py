"""What a field may do, under both adjoints -- the patterns of FFJORD's ``ODEfunc`` and other CNFs.

A call counter in a registered buffer, a random probe drawn at the first call and cached, a time made
a leaf inside the field, and a divergence taken with ``torch.autograd.grad(..., create_graph=True)``
inside the field: each alone and all together, through ``odeint`` (rampde's exact discrete adjoint)
and ``odeint_adjoint`` (the quadrature adjoint), on fixed and adaptive steps, against torchdiffeq's
own method in fp64 with the same steps or tolerances.  A field whose randomness changes at every
evaluation is refused by ``odeint_adjoint`` with an error that names ``odeint``.
"""

from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint, odeint_adjoint

from rampde_plugins import collect_stats

F64 = torch.float64
PATTERNS = ("counter", "cached-draw", "inner-leaf", "inner-grad", "all")


class PatternField(torch.nn.Module):
    """A CNF-like field on ``[z, logp]``: ``dz = tanh(W z + b t)``, ``dlogp = -div`` (Hutchinson's
    estimate with a probe ``e`` when the divergence is taken inside the field, else 0)."""

    def __init__(self, pattern: str, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g, dtype=F64) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=F64) * 0.5)
        self.register_buffer("_num_evals", torch.tensor(0.0, dtype=F64))
        self.pattern, self.dim, self.calls = pattern, dim, 0
        self._e = None

    def has(self, what: str) -> bool:
        return self.pattern in (what, "all")

    def before_odeint(self):  # (FFJORD resets these before every solve)
        self._e = None
        self._num_evals.fill_(0)
        self.calls = 0

    def forward(self, t, state):
        self.calls += 1
        if self.has("counter"):
            self._num_evals += 1
        if self.has("cached-draw") and self._e is None:
            self._e = torch.randn_like(state[:, : self.dim])
        with torch.enable_grad():  # (as FFJORD's ODEfunc: the state sliced and made a leaf in grad mode)
            z = state[:, : self.dim]
            if self.has("inner-leaf"):
                t = t.detach().clone().requires_grad_(True)
            if self.has("inner-grad") and not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = torch.tanh(z @ self.w.T + self.b * t)
            if self.has("inner-grad"):
                e = self._e if self._e is not None else torch.ones_like(z)
                (e_dzdx,) = torch.autograd.grad(dz, z, e, create_graph=True)
                div = (e_dzdx * e).sum(1, keepdim=True)
            else:
                div = torch.zeros_like(z[:, :1])
        return torch.cat([dz, -div], 1)


def _solve(pattern, adjoint, method, adaptive):
    f = PatternField(pattern)
    f.before_odeint()
    state0 = torch.cat([torch.linspace(-1, 1, 12, dtype=F64).reshape(4, 3), torch.zeros(4, 1, dtype=F64)], 1)
    state0.requires_grad_(True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    if adaptive:
        kw = dict(rtol=1e-10, atol=1e-10, options={"first_step": 0.05})
        if adjoint:
            kw.update(adjoint_rtol=1e-10, adjoint_atol=1e-10)
    else:
        kw = dict(options={"step_size": 1 / 64})
        if adjoint:
            kw["adjoint_options"] = {"step_size": 1 / 64}
    torch.manual_seed(11)
    with collect_stats() as stats:
        ys = (odeint_adjoint if adjoint else odeint)(f, state0, t, method=method, **kw)
        forward_calls = f.calls
        weights = torch.tensor([0.5, 1.0, 2.0], dtype=F64)[:, None, None]
        grads = torch.autograd.grad((weights * ys.square()).sum(), (state0, f.w, f.b))
    return dict(ys=ys.detach(), grad=torch.cat([g.reshape(-1) for g in grads]), f=f, rng=torch.get_rng_state(),
                forward_calls=forward_calls, records=stats.records)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_odeint_matches_torchdiffeq_and_leaves_what_it_leaves(pattern, adaptive):
    """The discrete adjoint: the gradient of the steps that ran (torchdiffeq's own backprop through the
    same steps), and the counter and the random stream as torchdiffeq leaves them."""
    host = _solve(pattern, False, "dopri5" if adaptive else "rk4", adaptive)
    mine = _solve(pattern, False, "rampde_dopri5" if adaptive else "rampde_rk4", adaptive)
    assert _rel(mine["ys"], host["ys"]) < 1e-12
    assert _rel(mine["grad"], host["grad"]) < 1e-8
    assert torch.equal(mine["rng"], host["rng"])
    assert float(mine["f"]._num_evals) == float(host["f"]._num_evals)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_odeint_adjoint_matches_torchdiffeqs_adjoint(pattern, adaptive):
    """The quadrature adjoint runs these fields (their writes and the cached draw do not change what
    they return): the gradient of torchdiffeq's own adjoint to 1e-8, the same random stream (one
    draw), and the counter counts every evaluation but the checks that are put back."""
    host = _solve(pattern, True, "dopri5" if adaptive else "rk4", adaptive)
    mine = _solve(pattern, True, "rampde_dopri5" if adaptive else "rampde_rk4", adaptive)
    assert _rel(mine["ys"], host["ys"]) < 1e-12
    assert _rel(mine["grad"], host["grad"]) < 1e-8
    assert torch.equal(mine["rng"], host["rng"])
    if mine["f"].has("counter"):
        checks = mine["records"][0].field_checks
        assert checks >= 2 and int(mine["f"]._num_evals) == mine["f"].calls - checks


def test_randomness_at_every_evaluation_is_refused_by_odeint_adjoint_and_changes_nothing():
    """A probe drawn anew at every call (no cache) makes the field another function at each evaluation:
    the quadrature adjoint cannot replay it and says so, naming odeint; nothing is changed."""

    class Fresh(PatternField):
        def forward(self, t, state):
            self._e = None  # (drawn again every time)
            return super().forward(t, state)

    f = Fresh("all")
    f.before_odeint()
    state0 = torch.ones(4, 4, dtype=F64, requires_grad=True)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"another value at the same \(t, y\).*random numbers.*torchdiffeq\.odeint"):
        odeint_adjoint(f, state0, torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4",
                       options={"step_size": 0.25})
    assert torch.equal(torch.get_rng_state(), rng)
    assert float(f._num_evals) == 0
    # ... while odeint replays the draws step by step: the exact gradient of what ran
    ys = odeint(f, state0, torch.tensor([0.0, 1.0], dtype=F64), method="rampde_rk4", options={"step_size": 0.25})
    ys.sum().backward()


def test_torchdiffeqs_own_backprop_is_the_outlier_on_adaptive_steps():
    """Why FFJORD trained through ``odeint`` drifts from torchdiffeq's own ``odeint`` (1e-4 in the loss
    after 100 iterations) but not from either adjoint: on this FFJORD-like field at FFJORD's tolerance
    (1e-5), torchdiffeq's backprop through ``dopri5`` also differentiates its initial step selection,
    which puts its gradient far from the ODE's; rampde's discrete adjoint (step sizes constant) is as
    close to it as both adjoints."""

    def grad(method, adjoint, rtol):
        f = PatternField("all")
        f.before_odeint()
        state0 = torch.cat([torch.linspace(-1, 1, 12, dtype=F64).reshape(4, 3), torch.zeros(4, 1, dtype=F64)], 1)
        state0.requires_grad_(True)
        torch.manual_seed(0)
        kw = dict(rtol=rtol, atol=rtol)
        if adjoint:
            kw.update(adjoint_rtol=rtol, adjoint_atol=rtol)
        ys = (odeint_adjoint if adjoint else odeint)(f, state0, torch.tensor([0.0, 0.5], dtype=F64), method=method, **kw)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(ys[-1].square().sum(), (state0, f.w, f.b))])

    ode = grad("dopri5", True, 1e-12)
    err = {name: _rel(grad(m, adj, 1e-5), ode) for name, m, adj in (
        ("torchdiffeq odeint", "dopri5", False), ("rampde odeint", "rampde_dopri5", False),
        ("torchdiffeq odeint_adjoint", "dopri5", True), ("rampde odeint_adjoint", "rampde_dopri5", True))}
    assert err["torchdiffeq odeint"] > 20 * err["rampde odeint"], err
    assert err["rampde odeint"] < 5 * max(err["torchdiffeq odeint_adjoint"], err["rampde odeint_adjoint"]), err
