"""rampde-plugins: mixed-precision neural-ODE solvers with an exact discrete adjoint.

Importing this package loads the plugins of the ``rampde_plugins`` entry-point group and installs
the host adapters whose libraries are present, so that e.g.::

    import rampde_plugins  # noqa: F401  (activates the adapters)
    from torchdiffeq import odeint
    y = odeint(func, y0, t, method="rampde_rk4", options={"precision": "bf16"})

runs on the rampde engine.  Set ``RAMPDE_PLUGINS_DISABLE_AUTOLOAD=1`` to load no entry points and
install nothing on import; :func:`install`/:func:`uninstall` do it by hand.
"""

from ._adapter import HostAdapter, UnsupportedHostError
from ._engine import (
    INTERPOLATIONS,
    BatchedOutputs,
    BatchedStepController,
    StageInterpolation,
    StepController,
    RmsController,
    StepData,
    ExplicitStepper,
    Stepper,
    register_stepper,
    unregister_stepper,
    solve_adaptive,
    solve_batched,
    solve_batched_adaptive,
    solve_grid,
)
from ._hookspecs import hookimpl, hookspec
from ._manager import (
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    RampdeAdapterWarning,
    Registry,
    get_plugin_manager,
    get_registry,
    install,
    make_plugin_manager,
    register_plugin,
    resolve_policy,
    uninstall,
    unregister_plugin,
)
from ._engine import (
    BinomialSchedule,
    CheckpointSchedule,
    GraphsSchedule,
    LINEAR_SOLVERS,
    MemoryBudget,
    StepMeasure,
    budget_candidates,
    register_budget_candidate,
    unregister_budget_candidate,
    NewtonFailure,
    NewtonOptions,
    SegmentsSchedule,
    StepsSchedule,
    checkpoint_schedule,
    newton_options,
    parse_memory_budget,
    QUADRATURE_OPTIONS,
    QuadratureOptions,
    QuadratureProblem,
    quadrature_options,
    solve_quadrature,
)
from ._policy import SCALING_MODES, PrecisionPolicy, RampdeToleranceWarning, ScalerConfig, check_tolerance
from ._scaler import AdjointScaler
from ._config import ADJOINTS, OptionSyntax, SolveConfig, configure
from ._solve import solve
from ._stats import SolveStats, StatsCollector, collect_stats
from ._tableau import BUILTIN_TABLEAUS, ButcherTableau
from ._wong_zakai import KarhunenLoeveNoise, WongZakaiField, noise_channels, wong_zakai_variance_deficit

__version__ = "0.1.0"

__all__ = [
    "ADJOINTS",
    "ExplicitStepper",
    "Stepper",
    "register_stepper",
    "unregister_stepper",
    "OptionSyntax",
    "SolveConfig",
    "configure",
    "AdjointScaler",
    "BUILTIN_TABLEAUS",
    "BatchedOutputs",
    "BatchedStepController",
    "BinomialSchedule",
    "ButcherTableau",
    "CheckpointSchedule",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "GraphsSchedule",
    "HostAdapter",
    "KarhunenLoeveNoise",
    "LINEAR_SOLVERS",
    "MemoryBudget",
    "StepMeasure",
    "budget_candidates",
    "register_budget_candidate",
    "unregister_budget_candidate",
    "NewtonFailure",
    "NewtonOptions",
    "INTERPOLATIONS",
    "PrecisionPolicy",
    "QUADRATURE_OPTIONS",
    "QuadratureOptions",
    "QuadratureProblem",
    "RampdeAdapterWarning",
    "RampdeToleranceWarning",
    "Registry",
    "SCALING_MODES",
    "ScalerConfig",
    "SegmentsSchedule",
    "SolveStats",
    "StageInterpolation",
    "StepController",
    "RmsController",
    "StepData",
    "StepsSchedule",
    "StatsCollector",
    "UnsupportedHostError",
    "WongZakaiField",
    "check_tolerance",
    "checkpoint_schedule",
    "newton_options",
    "parse_memory_budget",
    "quadrature_options",
    "solve_quadrature",
    "collect_stats",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "install",
    "make_plugin_manager",
    "noise_channels",
    "register_plugin",
    "resolve_policy",
    "solve",
    "solve_adaptive",
    "solve_batched",
    "solve_batched_adaptive",
    "solve_grid",
    "uninstall",
    "unregister_plugin",
    "wong_zakai_variance_deficit",
]

# Last, once every public name exists: entry-point plugins import this package themselves.
from ._manager import _autoinstall  # noqa: E402

_autoinstall()
del _autoinstall
