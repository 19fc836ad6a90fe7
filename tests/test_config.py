"""One host-neutral configuration: the options every host shares are validated by ``configure`` alone.

The same bad value gives the same error from ``rampde_plugins.solve``, torchdiffeq's ``odeint`` and
torchode's ``RampdeAdjoint`` -- only the option's spelling differs (``checkpoint``,
``options['checkpoint']``) -- and a valid configuration reaches the engine as the object the core
built (no adapter builds or checks it again)."""

from __future__ import annotations

import pytest
import torch

import rampde_plugins
from rampde_plugins import (AdjointScaler, BinomialSchedule, MemoryBudget, NewtonOptions, OptionSyntax, SolveConfig,
                            configure, get_registry)

RK4 = get_registry().tableau("rk4")
SDIRK2 = get_registry().tableau("sdirk2")

#: (options, error type, what follows the option's reference in the message)
BAD = [
    (dict(checkpoint="bogus"), ValueError, "='bogus' is not a checkpoint schedule"),
    (dict(checkpoint=0), ValueError, "=0"),
    (dict(checkpoint=2, memory_budget="1MB"), ValueError, "=2 and "),
    (dict(memory_budget="lots"), ValueError, "='lots'"),
    (dict(precision=3), TypeError, " must be a policy name or a PrecisionPolicy, got int"),
    (dict(scaler="dynamic"), TypeError, " must be a rampde_plugins.AdjointScaler, got str"),
    (dict(newton={"rtol": 1e-3}), ValueError, " apply to implicit methods; 'rk4' is explicit"),
    (dict(params=[1.0]), TypeError, " must contain only tensors, got a float"),
]


def _spelled(host: str, option: str) -> str:
    """How ``host`` writes ``option`` in an error message (the call, then the option)."""
    if host == "core":
        return f"rampde_plugins.solve(method='rk4'): {option}"
    if host == "torchdiffeq":
        name = "adjoint_params" if option == "params" else option
        return f"odeint(method='rampde_rk4'): options['{name}']"
    return f"RampdeAdjoint: {option}"


def _call(host: str, options: dict) -> None:
    y0, t = torch.ones(2, 2), torch.tensor([0.0, 1.0])
    if host == "core":
        rampde_plugins.solve(lambda t, y: -y, y0, t, method="rk4", step_size=0.5, **options)
    elif host == "torchdiffeq":
        from torchdiffeq import odeint

        opts = {("adjoint_params" if k == "params" else k): v for k, v in options.items()}
        odeint(lambda t, y: -y, y0, t, method="rampde_rk4", options={"step_size": 0.5, **opts})
    else:
        import torchode as to
        from rampde_torchode import RampdeAdjoint

        term = to.ODETerm(lambda t, y: -y)
        RampdeAdjoint(to.interface.METHODS["rampde_rk4"](term=term), to.FixedStepController(), **options)


HOSTS = ["core", "torchdiffeq", "torchode"]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("options, kind, rest", BAD, ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None)
def test_the_same_bad_option_gives_the_same_error_in_each_hosts_spelling(host, options, kind, rest):
    option = "newton" if "newton" in options else next(iter(options))
    with pytest.raises(kind) as caught:
        _call(host, options)
    message = str(caught.value)
    assert message.startswith(_spelled(host, option)), message
    assert rest in message, message


def test_configure_returns_the_validated_options():
    scaler = AdjointScaler()
    a = torch.ones(2, requires_grad=True)
    config = configure(SDIRK2, OptionSyntax("f()"), precision="bf16", checkpoint=3, newton={"max_iter": 7},
                       linear_solver="dense", scaler=scaler, params=[a], rtol=1e-5, atol=1e-8)
    assert isinstance(config, SolveConfig)
    assert isinstance(config.schedule, BinomialSchedule) and config.adjoint == "discrete"
    assert isinstance(config.newton, NewtonOptions)
    assert config.newton.max_iter == 7 and config.newton.linear_solver == "dense"
    assert config.newton.rtol == pytest.approx(1e-7) and config.newton.atol == pytest.approx(1e-10)
    assert config.scaler is scaler and config.params == (a,)
    assert config.policy(torch.ones(2)).name == "bf16"
    assert isinstance(configure(RK4, OptionSyntax("f()"), memory_budget="8MB").schedule, MemoryBudget)
    explicit = configure(RK4, OptionSyntax("f()"))
    assert explicit.newton is None and explicit.params is None
    net = torch.nn.Linear(2, 2)
    assert explicit.params_of(net) == tuple(net.parameters()) and explicit.params_of(lambda t, y: y) == ()


def test_the_quadrature_adjoint_keeps_no_schedule():
    config = configure(RK4, OptionSyntax("f()"), adjoint="quadrature")
    assert config.adjoint == "quadrature" and config.schedule is None
    with pytest.raises(ValueError, match=r"f\(\): checkpoint apply to adjoint='discrete'.*drop them"):
        configure(RK4, OptionSyntax("f()"), adjoint="quadrature", checkpoint="graphs")
    with pytest.raises(ValueError, match=r"f\(\): adjoint='continuous'; choose one of discrete, quadrature"):
        configure(RK4, OptionSyntax("f()"), adjoint="continuous")


def test_a_host_spelling_is_a_template():
    syntax = OptionSyntax("odeint(method='rampde_rk4')", "options['{name}']")
    assert syntax.name("checkpoint") == "options['checkpoint']"
    assert syntax.ref("checkpoint") == "odeint(method='rampde_rk4'): options['checkpoint']"
    with pytest.raises(TypeError, match=r"f\(\): params must be an iterable of tensors, got one tensor"):
        configure(RK4, OptionSyntax("f()"), params=torch.ones(2))


def test_torchdiffeq_hands_the_cores_configuration_to_the_engine(monkeypatch):
    """The schedule object the user passes is the one the engine runs: the adapter neither copies nor
    rebuilds it (it is validated once, by ``configure``)."""
    from torchdiffeq import odeint

    import rampde_torchdiffeq._solver as solver_module

    seen = []
    real = solver_module.solve_grid

    def spy(*args, **kwargs):
        seen.append(kwargs["checkpoint"])
        return real(*args, **kwargs)

    monkeypatch.setattr(solver_module, "solve_grid", spy)
    schedule = BinomialSchedule(2)
    odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
           options={"step_size": 0.25, "checkpoint": schedule})
    assert seen == [schedule]
