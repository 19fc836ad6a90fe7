"""One host-neutral configuration of a solve: the options every host shares, validated in one place.

Every entry point -- ``rampde_plugins.solve``, torchdiffeq's ``odeint(..., options=...)``, torchode's
``RampdeAdjoint(...)`` / ``solve_ivp(...)`` -- takes the same rampde options under its own spelling:
the precision policy, what the discrete adjoint keeps (``checkpoint`` or ``memory_budget``), which
adjoint runs, Newton's options for implicit methods, the fp16 adjoint scaler and the tensors to
differentiate.  An adapter translates its host's vocabulary into a call of :func:`configure` with an
:class:`OptionSyntax` that says how the host spells each option; the result, a :class:`SolveConfig`,
is what the adapter hands on, and nothing downstream validates these options again.  An error names
the option as the user wrote it (``options['checkpoint']`` for torchdiffeq, ``checkpoint`` for a
keyword), the bad value and the valid choices, before anything is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._engine import CheckpointSchedule, NewtonOptions, checkpoint_schedule, newton_options
from ._manager import get_registry, resolve_policy
from ._policy import PrecisionPolicy
from ._scaler import AdjointScaler
from ._tableau import ButcherTableau

__all__ = ["ADJOINTS", "OptionSyntax", "SolveConfig", "configure"]

#: The adjoints a solve can run: rampde's exact discrete adjoint of the steps (under a checkpoint
#: schedule), or the Gauss--Legendre quadrature adjoint.
ADJOINTS = ("discrete", "quadrature")


@dataclass(frozen=True)
class OptionSyntax:
    """How a host's API spells rampde's options, for error messages.

    Args:
        owner: the call the options belong to, e.g. ``"odeint(method='rampde_rk4')"``.
        template: how one option is written there, with ``{name}`` for the option's name:
            ``"options['{name}']"`` (torchdiffeq's options dict) or ``"{name}"`` (a keyword argument).
    """

    owner: str
    template: str = "{name}"

    def name(self, option: str) -> str:
        """The option as the user wrote it (``options['checkpoint']``)."""
        return self.template.format(name=option)

    def ref(self, option: str) -> str:
        """The option with its call, the start of an error message about it."""
        return f"{self.owner}: {self.name(option)}"


@dataclass(frozen=True)
class SolveConfig:
    """A validated configuration: what every engine entry point takes besides the field and times.

    ``schedule`` is the discrete adjoint's checkpoint schedule (a :class:`MemoryBudget` until a solve
    resolves it) and None for the quadrature adjoint; ``newton`` is set for implicit methods only;
    ``params`` is None when the tensors to differentiate are to be found on the field itself."""

    tableau: ButcherTableau
    syntax: OptionSyntax
    precision: str | PrecisionPolicy | None = None
    adjoint: str = "discrete"
    schedule: CheckpointSchedule | None = None
    newton: NewtonOptions | None = None
    scaler: AdjointScaler | None = None
    params: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        _check_precision(self.precision, self.syntax)  # (also when a copy gets another policy: replace())

    def policy(self, y0: torch.Tensor) -> PrecisionPolicy:
        """The precision policy for a solve from ``y0`` (from the active ``torch.autocast`` when unset)."""
        return resolve_policy(self.precision, device_type=y0.device.type, state_dtype=y0.dtype)

    def params_of(self, f: Any) -> tuple[torch.Tensor, ...]:
        """The tensors differentiated besides the state and the times: the declared ones, else the
        field's parameters when it is an ``nn.Module``, else none."""
        if self.params is not None:
            return self.params
        return tuple(f.parameters()) if isinstance(f, torch.nn.Module) else ()


def configure(
    tableau: ButcherTableau,
    syntax: OptionSyntax,
    *,
    precision: Any = None,
    adjoint: Any = "discrete",
    checkpoint: Any = None,
    memory_budget: Any = None,
    newton: Any = None,
    linear_solver: Any = None,
    scaler: Any = None,
    params: Any = None,
    rtol: Any = None,
    atol: Any = None,
    params_option: str = "params",
) -> SolveConfig:
    """Validate the options every host shares and return them as a :class:`SolveConfig`.

    ``rtol``/``atol``: the solve's tolerances (numbers or per-component tensors), of which Newton's
    unset tolerances become 1e-2; ``params_option``: the host's name for ``params`` (torchdiffeq:
    ``adjoint_params``).  Raises ``ValueError``/``TypeError`` naming the option as ``syntax``
    spells it, its value and the valid choices; nothing is evaluated or changed before.
    """
    _check_precision(precision, syntax)
    if not isinstance(adjoint, str) or adjoint not in ADJOINTS:
        raise ValueError(f"{syntax.ref('adjoint')}={adjoint!r}; choose one of {', '.join(ADJOINTS)}")

    schedule = None
    if adjoint == "quadrature":
        given = [syntax.name(n) for n, v in (("checkpoint", checkpoint), ("memory_budget", memory_budget))
                 if v is not None]
        if given:
            raise ValueError(f"{syntax.owner}: {', '.join(given)} apply to {syntax.name('adjoint')}='discrete' "
                             "(the quadrature adjoint keeps only the outputs): drop them, or use the discrete adjoint")
    else:
        schedule = checkpoint_schedule(checkpoint, memory_budget=memory_budget, owner=syntax.ref("checkpoint"),
                                       budget_owner=syntax.ref("memory_budget"))

    given = [syntax.name(n) for n, v in (("newton", newton), ("linear_solver", linear_solver)) if v is not None]
    if given and not tableau.implicit:
        raise ValueError(f"{syntax.owner}: {', '.join(given)} apply to implicit methods; {tableau.name!r} is explicit")
    options = None
    if tableau.implicit:
        options = newton_options(newton, owner=syntax.ref("newton"), linear_solver=linear_solver, rtol=rtol, atol=atol)

    if scaler is not None and not isinstance(scaler, AdjointScaler):
        raise TypeError(f"{syntax.ref('scaler')} must be a rampde_plugins.AdjointScaler, got {type(scaler).__name__}")
    if params is not None:
        params = _tensors(params, syntax.ref(params_option))
    return SolveConfig(tableau=tableau, syntax=syntax, precision=precision, adjoint=adjoint, schedule=schedule,
                       newton=options, scaler=scaler, params=params)


def _check_precision(precision: Any, syntax: OptionSyntax) -> None:
    if precision is not None and not isinstance(precision, (str, PrecisionPolicy)):
        raise TypeError(f"{syntax.ref('precision')} must be a policy name or a PrecisionPolicy, got "
                        f"{type(precision).__name__}; registered policies: {', '.join(sorted(get_registry().policies))}")


def _tensors(value: Any, where: str) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be an iterable of tensors, got one tensor; pass a tuple: (A,)")
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{where} must be an iterable of tensors, got {type(value).__name__}") from None
    bad = next((type(p).__name__ for p in out if not isinstance(p, torch.Tensor)), None)
    if bad is not None:
        raise TypeError(f"{where} must contain only tensors, got a {bad}")
    return out
