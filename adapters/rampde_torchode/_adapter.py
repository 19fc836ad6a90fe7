"""Install/uninstall of the rampde methods in torchode.

What is patched, and why it is the minimum:

* ``torchode.interface.METHODS`` gets ``rampde_<name>`` for every registered tableau (through
  torchode's own ``register_method``), so ``solve_ivp(method="rampde_rk4")`` finds them.
* ``torchode.interface.AutoDiffAdjoint`` -- the name ``solve_ivp`` looks up on every call -- becomes a
  dispatcher: a ``rampde_<name>`` step method gets :class:`RampdeAdjoint`, every other method gets
  torchode's own ``AutoDiffAdjoint`` unchanged.  This works whatever the import order of the user's
  ``from torchode import solve_ivp``.
* ``torchode.solve_ivp`` / ``torchode.interface.solve_ivp`` are wrapped only to give rampde methods a
  sensible default controller: a method without an error estimate (``rampde_rk4``) has no use for
  torchode's default PID controller, so ``controller=None`` means ``FixedStepController()`` for it;
  embedded methods (``rampde_dopri5``) keep torchode's default adaptive controller.  The wrapper
  also takes rampde's own keywords (for rampde methods only: ``checkpoint=``, ``memory_budget=``,
  ``linear_solver=``, ``newton=``, and ``adjoint="quadrature"`` with ``adjoint_options=`` for the
  Gauss--Legendre quadrature adjoint) and hands them to the ``RampdeAdjoint`` (or
  ``QuadratureAdjoint``) that torchode builds inside (a ``from torchode import solve_ivp`` done before
  ``import rampde_plugins`` holds torchode's original function, which has no such keyword).

``uninstall`` restores all of it (and only where nobody replaced it since).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect

import torch

from rampde_plugins import HostAdapter, UnsupportedHostError, checkpoint_schedule, get_registry, quadrature_options

PREFIX = "rampde_"

# Keywords of rampde's own that solve_ivp accepts for rampde methods, passed on to RampdeAdjoint.
_RAMPDE_SOLVE_OPTIONS = ("checkpoint", "memory_budget", "linear_solver", "newton", "adjoint", "adjoint_options")
_ADJOINTS = ("discrete", "quadrature")
_SOLVE_OPTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("rampde_solve_options", default={})

# Tableaus torchode defines: registered by this plugin (shared with other hosts by name) and solved
# with torchode's own dense output when called through torchode.
HOST_METHODS: dict = {}


def host_tableaus():
    """torchode's Dopri5 and Tsit5 as rampde tableaus (shared names: torchdiffeq has a dopri5 too)."""
    from torchode import Dopri5, Heun, Tsit5

    from ._adjoint import _tableau_of_class
    from rampde_plugins import ButcherTableau

    out = []
    # Every method torchode registers by name (heun, dopri5, tsit5) is reachable as rampde_<name>.
    for name, cls, order in (("heun", Heun, 2), ("dopri5", Dopri5, 5), ("tsit5", Tsit5, 5)):
        t = _tableau_of_class(cls, order)
        out.append(ButcherTableau(name, c=t.c, a=t.a, b=t.b, order=order, b_err=t.b_err,
                                  description=f"{cls.__name__} (torchode's coefficients)"))
        HOST_METHODS[name] = cls
    return out


class TorchodeAdapter(HostAdapter):
    """Puts every registered tableau into torchode as ``rampde_<name>``."""

    name = "torchode"
    host_module = "torchode"
    host_distribution = "torchode"
    supported = ">=0.2.0,<1.1"

    def _host(self):
        try:
            interface = importlib.import_module("torchode.interface")
            torchode = importlib.import_module("torchode")
            runge_kutta = importlib.import_module("torchode.single_step_methods.runge_kutta")
            status_codes = importlib.import_module("torchode.status_codes")
        except ImportError as exc:
            raise UnsupportedHostError(f"cannot import torchode ({exc}); supported: {self.supported}") from None
        needs = {
            "METHODS dict": isinstance(getattr(interface, "METHODS", None), dict),
            "register_method": callable(getattr(interface, "register_method", None)),
            "solve_ivp": callable(getattr(interface, "solve_ivp", None)),
            "AutoDiffAdjoint": isinstance(getattr(interface, "AutoDiffAdjoint", None), type),
            "FixedStepController": hasattr(torchode, "FixedStepController"),
            "ExplicitRungeKutta": hasattr(runge_kutta, "ERKInterpolationData"),
            # RampdeAdjoint reports statuses with the int constants (torchode >= 0.1.6; before: the enum only)
            "status_codes.SUCCESS/REACHED_MAX_STEPS": all(
                isinstance(getattr(status_codes, n, None), int) for n in ("SUCCESS", "REACHED_MAX_STEPS")
            ),
        }
        missing = [k for k, ok in needs.items() if not ok]
        if missing:
            raise UnsupportedHostError(
                f"torchode {self.host_version()} lacks {', '.join(missing)}; supported: {self.supported}"
            )
        return interface, torchode

    def _method_table(self) -> dict:
        return importlib.import_module("torchode.interface").METHODS

    def _add_method(self, table, key, tableau) -> None:
        from ._adjoint import RampdeStepMethod

        interface = importlib.import_module("torchode.interface")
        interface.register_method(key, functools.partial(RampdeStepMethod, tableau.name))
        self._add_entry(table, key, table[key], set_it=False)

    def install(self, registry) -> None:
        if self.installed:
            return
        interface, torchode = self._host()
        from ._adjoint import RampdeAdjoint, RampdeStepMethod

        clash = [PREFIX + n for n in registry.tableaus if PREFIX + n in interface.METHODS]
        if clash:
            raise UnsupportedHostError(f"torchode already defines method(s) {clash}; rampde will not replace them")
        for name in registry.tableaus:
            self._add_method(interface.METHODS, PREFIX + name, registry.tableau(name))

        original_adjoint = interface.AutoDiffAdjoint

        def AutoDiffAdjoint(step_method, step_size_controller, **kwargs):  # noqa: N802 (torchode's name)
            if isinstance(step_method, RampdeStepMethod):
                for key, value in _SOLVE_OPTIONS.get().items():  # solve_ivp(..., checkpoint=...)
                    kwargs.setdefault(key, value)
                if _is_default_pid(step_size_controller) and get_registry().tableau(step_method.tableau_name).b_err is None:
                    # solve_ivp(controller=None) builds this PID controller before it gets here (a
                    # caller holding torchode's original solve_ivp, imported before rampde_plugins,
                    # bypasses the wrapper below): for a method without an error estimate it means
                    # "no controller given", i.e. fixed steps of dt0.
                    step_size_controller = torchode.FixedStepController()
                if kwargs.pop("adjoint", "discrete") == "quadrature":
                    from ._quadrature import QuadratureAdjoint

                    return QuadratureAdjoint(None, step_method, step_size_controller,
                                             **kwargs.pop("adjoint_options", None) or {}, **kwargs)
                kwargs.pop("adjoint_options", None)
                return RampdeAdjoint(step_method, step_size_controller, **kwargs)
            return original_adjoint(step_method, step_size_controller, **kwargs)

        AutoDiffAdjoint.__doc__ = f"Dispatch: rampde_* methods -> RampdeAdjoint, others -> {original_adjoint!r}."
        self._patch_attr(interface, "AutoDiffAdjoint", AutoDiffAdjoint)

        original_solve = interface.solve_ivp
        signature = inspect.signature(original_solve)
        adapter = self

        @functools.wraps(original_solve)
        def solve_ivp(*args, **kwargs):
            extra = {k: kwargs.pop(k) for k in _RAMPDE_SOLVE_OPTIONS if k in kwargs}
            bound = signature.bind(*args, **kwargs)
            method = bound.arguments.get("method")
            if extra and not adapter.owns(method):
                raise TypeError(f"solve_ivp(method={method!r}): {', '.join(extra)} applies to rampde_* methods only")
            y0 = bound.arguments.get("y0")
            if adapter.owns(method) and isinstance(y0, torch.Tensor) and y0.ndim != 2:
                raise ValueError(
                    f"solve_ivp(method={method!r}): y0 must be (batch, features) as in torchode, got shape "
                    f"{tuple(y0.shape)}; add a batch dimension (y0[None]) or flatten the features"
                )
            if adapter.owns(method) and bound.arguments.get("controller") is None:
                name = method[len(PREFIX):]
                current = get_registry()  # not the install-time registry: refresh keeps this wrapper
                tableau = current.tableau(name) if name in current.tableaus else None
                if tableau is not None and tableau.b_err is None:
                    # No error estimate: fixed steps are this method's only mode (torchode's default
                    # PID controller would fail on it).  Embedded methods keep torchode's default.
                    bound.arguments["controller"] = torchode.FixedStepController()
            adjoint = extra.get("adjoint", "discrete")
            if adjoint not in _ADJOINTS:
                raise ValueError(f"solve_ivp(method={method!r}, adjoint={adjoint!r}): valid adjoints are "
                                 f"{', '.join(map(repr, _ADJOINTS))}")
            if adjoint == "quadrature":
                given = [k for k in ("checkpoint", "memory_budget") if extra.get(k) is not None]
                if given:
                    raise ValueError(
                        f"solve_ivp(method={method!r}, adjoint='quadrature'): {', '.join(given)} configure the discrete "
                        "adjoint's checkpointing; the quadrature adjoint stores only the outputs. Drop them, or use "
                        "adjoint='discrete'"
                    )
                options = extra.get("adjoint_options") or {}
                if not isinstance(options, dict):
                    raise TypeError(f"solve_ivp(adjoint_options=...) must be a dict, got {type(options).__name__}")
                quadrature_options(options, owner=f"solve_ivp(method={method!r}, adjoint='quadrature'): adjoint_options")
            elif extra.get("adjoint_options") is not None:
                raise ValueError(f"solve_ivp(method={method!r}): adjoint_options apply to adjoint='quadrature' "
                                 f"(the quadrature node rule); adjoint={adjoint!r}")
            if extra:  # validated here, before anything runs
                checkpoint_schedule(extra.get("checkpoint"), memory_budget=extra.get("memory_budget"),
                                    owner=f"solve_ivp(method={method!r}, checkpoint=...)",
                                    budget_owner=f"solve_ivp(method={method!r}, memory_budget=...)")
            token = _SOLVE_OPTIONS.set(extra)
            try:
                return original_solve(*bound.args, **bound.kwargs)
            finally:
                _SOLVE_OPTIONS.reset(token)

        self._patch_attr(interface, "solve_ivp", solve_ivp)
        if getattr(torchode, "solve_ivp", None) is original_solve:
            self._patch_attr(torchode, "solve_ivp", solve_ivp)
        self.installed = True


def _is_default_pid(controller) -> bool:
    """torchode's solve_ivp default: PIDController(atol=1e-7, rtol=1e-7, pcoeff=0.2, icoeff=0.5, dcoeff=0.0)."""
    if type(controller).__name__ != "PIDController":
        return False
    try:
        return (abs(float(controller.atol) - 1e-7) < 1e-12 and abs(float(controller.rtol) - 1e-7) < 1e-12
                and controller.pcoeff == 0.2
                and controller.icoeff == 0.5 and controller.dcoeff == 0.0)
    except (AttributeError, TypeError, RuntimeError):
        return False


__all__ = ["TorchodeAdapter", "HOST_METHODS", "host_tableaus"]
