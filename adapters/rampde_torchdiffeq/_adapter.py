"""Install/uninstall of the rampde methods in torchdiffeq.

What is patched, and why it is the minimum:

* ``torchdiffeq._impl.odeint.SOLVERS`` (the dict ``odeint`` and ``odeint_adjoint`` both read) gets one
  entry ``rampde_<name>`` per registered tableau -- that is how torchdiffeq finds any method.
* the module global ``_check_inputs`` of ``torchdiffeq._impl.odeint`` and ``torchdiffeq._impl.adjoint``
  is wrapped: for rampde method names only, it first validates the call with clear ``ValueError``\\ s
  (torchdiffeq's own checks are ``assert``\\ s).  Every other method goes straight to torchdiffeq's function.
* the module global ``OdeintAdjointMethod`` of ``torchdiffeq._impl.adjoint`` (what ``odeint_adjoint``
  calls ``.apply`` on) becomes an :class:`AdjointDispatch`: rampde methods run the Gauss--Legendre
  quadrature adjoint (``_quadrature``), every other method torchdiffeq's own Function.  A torchdiffeq
  without that Function keeps ``odeint_adjoint`` refused for rampde methods, with advice.

``uninstall`` removes exactly those entries and restores the wrapped functions (only if nobody
replaced them since).  Capabilities are checked, not version strings.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys

import torch

from rampde_plugins import HostAdapter, UnsupportedHostError, resolve_policy

from ._quadrature import AdjointDispatch
from ._solver import RampdeFixedGridSolver, make_solver_class, parse_options

PREFIX = "rampde_"

_ADJOINT_MESSAGE = (
    "odeint_adjoint(method={method!r}) needs torchdiffeq's OdeintAdjointMethod in torchdiffeq._impl.adjoint, "
    "which this torchdiffeq lacks, to run rampde's quadrature adjoint; without it odeint_adjoint would integrate "
    "torchdiffeq's continuous adjoint around a rampde forward. Call torchdiffeq.odeint(func, y0, t, "
    "method={method!r}, options=...) instead: its backward is rampde's exact discrete adjoint."
)
_ADJOINT_METHOD_MESSAGE = (
    "adjoint_method={method!r}: rampde methods are not integrators for torchdiffeq's continuous adjoint; "
    "use torchdiffeq.odeint(..., method={method!r}), whose backward is rampde's discrete adjoint, or a "
    "torchdiffeq method as adjoint_method."
)


def _first_bad_index(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0])


def validate_call(method: str, y0, t, options) -> None:
    """Clear errors for bad input of a rampde method, before torchdiffeq touches anything."""
    parts = y0 if isinstance(y0, tuple) else (y0,)
    for i, y in enumerate(parts):
        name = "y0" if not isinstance(y0, tuple) else f"y0[{i}]"
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"odeint(method={method!r}): {name} must be a torch.Tensor or a tuple of them, got {type(y).__name__}")
        if not torch.is_floating_point(y):
            raise TypeError(f"odeint(method={method!r}): {name} must be floating point, got {y.dtype}")
        finite = torch.isfinite(y)
        if not bool(finite.all()):
            raise ValueError(
                f"odeint(method={method!r}): {name} contains NaN or inf (first at flat index {_first_bad_index(~finite)})"
            )
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"odeint(method={method!r}): t must be a 1-D torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"odeint(method={method!r}): t has dtype {t.dtype}; use float32 or float64 (half-precision time "
            "cannot resolve small steps: 1000.3 rounds to 1000.0 in fp16). The state may still be low precision."
        )
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"odeint(method={method!r}): t must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    tc = t.detach().cpu()
    if not bool(torch.isfinite(tc).all()):
        raise ValueError(f"odeint(method={method!r}): t contains NaN or inf (first at index {_first_bad_index(~torch.isfinite(tc))})")
    if tc.shape[0] > 1:
        d = tc[1:] - tc[:-1]
        inc = d > 0
        if not (bool(inc.all()) or bool((d < 0).all())):
            bad = _first_bad_index(~inc if bool(inc[0]) else ~(d < 0))
            raise ValueError(
                f"odeint(method={method!r}): t must be strictly increasing or strictly decreasing; "
                f"t[{bad}]={tc[bad].item()!r}, t[{bad + 1}]={tc[bad + 1].item()!r}"
            )
    opts = parse_options(method, options)
    resolve_policy(opts["precision"], device_type=parts[0].device.type, state_dtype=parts[0].dtype)


def _adjoint_function(adjoint_mod):
    """torchdiffeq's adjoint Function, if odeint_adjoint reaches it as ``OdeintAdjointMethod.apply``
    with the argument list the dispatch forwards (0.2.x: 14 leading arguments, then the parameters)."""
    fn = getattr(adjoint_mod, "OdeintAdjointMethod", None)
    if isinstance(fn, AdjointDispatch):
        fn = fn.original
    if not (isinstance(fn, type) and issubclass(fn, torch.autograd.Function)):
        return None
    try:
        params = list(inspect.signature(fn.forward).parameters)
    except (TypeError, ValueError):
        return None
    expected = ["ctx", "shapes", "func", "y0", "t", "rtol", "atol", "method", "options", "event_fn", "adjoint_rtol",
                "adjoint_atol", "adjoint_method", "adjoint_options", "t_requires_grad"]
    return fn if params[: len(expected)] == expected else None


def _code_of(module_name: str, qualname: str):
    obj = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return getattr(obj, "__code__", None)


class TorchdiffeqAdapter(HostAdapter):
    """Puts every registered tableau into torchdiffeq as ``rampde_<name>``."""

    name = "torchdiffeq"
    host_module = "torchdiffeq"
    host_distribution = "torchdiffeq"
    supported = ">=0.2.3,<0.3"

    def __init__(self) -> None:
        super().__init__()
        self._adjoint_backward_code = None

    # -- capability checks ---------------------------------------------------------------------
    def _host_modules(self):
        try:
            odeint_mod = importlib.import_module("torchdiffeq._impl.odeint")
        except ImportError as exc:
            raise UnsupportedHostError(f"torchdiffeq has no module torchdiffeq._impl.odeint ({exc}); supported: {self.supported}") from None
        solvers = getattr(odeint_mod, "SOLVERS", None)
        if not isinstance(solvers, dict):
            raise UnsupportedHostError(
                f"torchdiffeq {self.host_version()} has no SOLVERS dict in torchdiffeq._impl.odeint; supported: {self.supported}"
            )
        check = getattr(odeint_mod, "_check_inputs", None)
        if not callable(check) or not {"y0", "t", "method", "options"} <= set(inspect.signature(check).parameters):
            raise UnsupportedHostError(
                f"torchdiffeq {self.host_version()}: _check_inputs(func, y0, t, ..., method, options, ...) not found; "
                f"supported: {self.supported}"
            )
        if not all(hasattr(cls, "integrate") for cls in solvers.values()):
            raise UnsupportedHostError(f"torchdiffeq {self.host_version()}: solver classes have no integrate(t)")
        # The rampde solver calls f beneath torchdiffeq's outermost wrapper _PerturbFunc (0.2.0+); a
        # torchdiffeq without it (0.1.x) hands over f wrapped only for tuple states / decreasing time,
        # and unwrapping that would solve a decreasing t silently wrong.
        missing = []
        try:
            misc = importlib.import_module("torchdiffeq._impl.misc")
        except ImportError:
            misc = None
        if not isinstance(getattr(misc, "_PerturbFunc", None), type):
            missing.append("torchdiffeq._impl.misc._PerturbFunc")
        if "event_fn" not in inspect.signature(check).parameters:
            missing.append("_check_inputs(..., event_fn, ...)")
        if missing:
            raise UnsupportedHostError(
                f"torchdiffeq {self.host_version()} lacks {' and '.join(missing)} (torchdiffeq >= 0.2.0); "
                f"supported: {self.supported}"
            )
        try:
            adjoint_mod = importlib.import_module("torchdiffeq._impl.adjoint")
        except ImportError:
            adjoint_mod = None
        return odeint_mod, solvers, adjoint_mod

    # -- method entries ------------------------------------------------------------------------
    def _method_table(self) -> dict:
        return self._host_modules()[1]

    def _add_method(self, table, key, tableau) -> None:
        self._add_entry(table, key, make_solver_class(tableau))

    # -- lifecycle -----------------------------------------------------------------------------
    def install(self, registry) -> None:
        if self.installed:
            return
        odeint_mod, solvers, adjoint_mod = self._host_modules()
        wanted = {PREFIX + name: tab for name, tab in registry.tableaus.items()}
        clash = [k for k in wanted if k in solvers and not getattr(solvers[k], "_rampde", False)]
        if clash:
            raise UnsupportedHostError(f"torchdiffeq already defines method(s) {clash}; rampde will not replace them")
        for key, tab in wanted.items():
            self._add_method(solvers, key, tab)
        self._patch(odeint_mod, "_check_inputs", in_adjoint=False)
        if adjoint_mod is not None and callable(getattr(adjoint_mod, "_check_inputs", None)):
            # odeint_adjoint calls the module global OdeintAdjointMethod.apply: where it exists, rampde
            # methods get the quadrature adjoint there (capability, not version); else they are refused.
            dispatch = _adjoint_function(adjoint_mod)
            if dispatch is not None:
                self._patch_attr(adjoint_mod, "OdeintAdjointMethod", AdjointDispatch(dispatch, self))
            self._patch(adjoint_mod, "_check_inputs", in_adjoint=dispatch is None)
        self._adjoint_backward_code = _code_of("torchdiffeq._impl.adjoint", "OdeintAdjointMethod.backward")
        self.installed = True

    def _patch(self, module, attr: str, in_adjoint: bool) -> None:
        original = getattr(module, attr)
        signature = inspect.signature(original)
        adapter = self

        @functools.wraps(original)
        def _check_inputs(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            method = bound.get("method")
            if isinstance(method, str) and adapter.owns(method):
                if in_adjoint:
                    raise ValueError(_ADJOINT_MESSAGE.format(method=method))
                if adapter._inside_adjoint_backward():
                    raise ValueError(_ADJOINT_METHOD_MESSAGE.format(method=method))
                validate_call(method, bound.get("y0"), bound.get("t"), bound.get("options"))
                event_fn = bound.get("event_fn")
                if event_fn is not None and not callable(event_fn):
                    # torchdiffeq would fail inside its own event plumbing with a message that does not name it
                    raise TypeError(f"odeint(method={method!r}): event_fn must be callable (t, y) -> tensor, got "
                                    f"{type(event_fn).__name__}")
            return original(*args, **kwargs)

        self._patch_attr(module, attr, _check_inputs)

    def _inside_adjoint_backward(self) -> bool:
        code = self._adjoint_backward_code
        if code is None:
            return False
        frame = sys._getframe(2)
        for _ in range(12):
            if frame is None:
                return False
            if frame.f_code is code:
                return True
            frame = frame.f_back
        return False


__all__ = ["TorchdiffeqAdapter", "RampdeFixedGridSolver", "validate_call"]


# torchdiffeq's embedded Runge-Kutta pairs, read from its own solver classes (capability: a
# `tableau` with alpha/beta/c_sol/c_error and an `order`).  Registered as shared names so that a
# method both hosts define (dopri5) is one method whose coefficients are checked to agree.
_HOST_TABLEAUS = {
    "dopri5": ("torchdiffeq._impl.dopri5", "Dopri5Solver"),
    "bosh3": ("torchdiffeq._impl.bosh3", "Bosh3Solver"),
    "fehlberg2": ("torchdiffeq._impl.fehlberg2", "Fehlberg2"),
    "adaptive_heun": ("torchdiffeq._impl.adaptive_heun", "AdaptiveHeunSolver"),
    "dopri8": ("torchdiffeq._impl.dopri8", "Dopri8Solver"),
}


def host_tableaus():
    """torchdiffeq's embedded pairs as rampde tableaus (those this torchdiffeq version has)."""
    from rampde_plugins import ButcherTableau

    out = []
    for name, (module, cls_name) in _HOST_TABLEAUS.items():
        try:
            cls = getattr(importlib.import_module(module), cls_name)
            tab = cls.tableau
        except (ImportError, AttributeError):
            continue
        c = [0.0] + [float(x) for x in tab.alpha]
        a = [[]] + [[float(x) for x in row] for row in tab.beta]
        out.append(ButcherTableau(
            name, c=c, a=a, b=[float(x) for x in tab.c_sol], order=int(cls.order),
            b_err=[float(x) for x in tab.c_error], description=f"{cls_name} (torchdiffeq's coefficients)",
        ))
    return out
