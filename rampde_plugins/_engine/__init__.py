"""The engine: Runge--Kutta on a time grid with an exact discrete adjoint (host-library independent).

Forward (no autograd graph):
    ``k_i = f(t_n + c_i h, y_n + h * sum_j a_ij k_j)`` with ``f`` evaluated under the policy's autocast
    dtype, stage inputs and the increment ``h * sum_i b_i k_i`` formed in the state dtype, and
    ``y_n`` stored in the storage dtype -- one state per step is all the backward keeps.

Backward (discretise-then-optimise):
    for n = N-1 ... 0, rebuild step n from the stored ``y_n`` with a graph and take one VJP of
    ``[y_{n+1}, outputs inside the step]`` against ``[a_{n+1}, dL/d outputs]``.  That gives the adjoint
    ``a_n`` and the step's share of the parameter and time gradients, which are summed in the
    accumulation dtype.  The step's graph is dropped before the next one is built, so memory is the
    stored states plus one step's activations.

The gradient is that of the computation the forward actually ran (up to the rounding of the stored
states to the storage dtype), not of the continuous ODE: with the fp64 policy it passes gradcheck.

Two time layouts share this machinery: one grid for the whole state (torchdiffeq: ``grid`` of shape
``(N+1,)``, ``f`` gets a 0-d time) and one grid per sample (torchode: ``grid`` of shape ``(N+1, B)``,
``f`` gets time of shape ``(B,)``; samples with fewer steps are padded with zero-length steps, which
leave their state unchanged exactly).  Where outputs fall and how they are interpolated is an
*output plan* (:class:`_SharedTimeOutputs`, :class:`BatchedOutputs`), built on the host once per solve.

Modules, one job each: ``_steppers`` (the stepper protocol, the explicit stepper and its kernels), ``_times`` (grids and stage-time
tables), ``_outputs`` (output plans), ``_problem`` (the record a solve's forward and backward share),
``_drivers`` (fixed-grid and adaptive forward loops), ``_schedules`` (what the forward keeps for the
backward: checkpoint schedules), ``_budget`` (memory budgets: measure one step, choose a schedule), ``_implicit`` (the DIRK stepper:
Newton per stage and the stage's transposed solve for the adjoint), ``_linear`` (its linear solves:
GMRES, dense LU or matrix-free Newton matrices), ``_scaling`` (adjoint scaling),
``_adjoint`` (the reverse sweep and the autograd Function), ``_quadrature`` (the Gauss--Legendre
quadrature adjoint: a backward that re-integrates ``[x, a]`` through the host), ``_api`` (the entry points below).
"""

from ._api import solve_adaptive, solve_batched, solve_batched_adaptive, solve_grid
from ._drivers import BatchedStepController, StepController
from ._controller import RmsController, rms_norm
from ._outputs import INTERPOLATIONS, BatchedOutputs, StageInterpolation
from ._budget import MemoryBudget, checkpoint_schedule, parse_memory_budget
from ._candidates import StepMeasure, budget_candidates, register_budget_candidate, unregister_budget_candidate
from ._schedules import BinomialSchedule, CheckpointSchedule, GraphsSchedule, SegmentsSchedule, StepsSchedule
from ._steppers import ExplicitStepper, StepData, Stepper, register_stepper, unregister_stepper
from ._implicit import LINEAR_SOLVERS, NewtonFailure, NewtonOptions, newton_options
from ._quadrature import QUADRATURE_OPTIONS, QuadratureOptions, QuadratureProblem, quadrature_options, solve_quadrature

__all__ = [
    "solve_grid", "solve_batched", "solve_adaptive", "solve_batched_adaptive", "StepController", "RmsController", "rms_norm",
    "BatchedStepController", "BatchedOutputs", "StepData", "Stepper", "ExplicitStepper", "register_stepper", "unregister_stepper", "INTERPOLATIONS", "CheckpointSchedule",
    "StepsSchedule", "GraphsSchedule", "SegmentsSchedule", "BinomialSchedule", "checkpoint_schedule",
    "MemoryBudget", "parse_memory_budget", "StepMeasure", "budget_candidates", "register_budget_candidate",
    "unregister_budget_candidate", "NewtonOptions", "NewtonFailure", "StageInterpolation", "newton_options", "LINEAR_SOLVERS",
    "QUADRATURE_OPTIONS", "QuadratureOptions", "QuadratureProblem", "quadrature_options", "solve_quadrature",
]
