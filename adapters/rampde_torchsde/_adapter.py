"""Install/uninstall of the rampde methods in torchsde.

What is patched, and why it is the minimum: the module attributes ``torchsde.sdeint`` and
``torchsde.sdeint_adjoint`` (what ``import torchsde; torchsde.sdeint(...)`` looks up on every call)
become dispatchers.  A ``method="rampde_<name>"`` call goes to :func:`rampde_torchsde.sdeint` (the
Wong--Zakai ODE; ``sdeint_adjoint`` with ``adjoint="quadrature"``); every other call goes to torchsde's
own function, untouched.  torchsde has no method table to add names to (its ``METHODS`` is a fixed
enumeration its solvers are looked up in), so the dispatcher is the only entry point -- a
``from torchsde import sdeint`` made before ``import rampde_plugins`` keeps torchsde's function.

``uninstall`` restores both attributes (only where nobody replaced them since).  Capabilities are
checked (the functions and the keywords the dispatch reads), not versions.
"""

from __future__ import annotations

import functools
import importlib
import inspect

from rampde_plugins import HostAdapter, UnsupportedHostError

PREFIX = "rampde_"

# torchsde.sdeint_adjoint keywords and their names in rampde_torchsde.sdeint
_ADJOINT_KEYWORDS = ("adjoint_method", "adjoint_rtol", "adjoint_atol", "adjoint_options", "adjoint_params")
# torchsde keywords a Wong--Zakai solve has no use for: accepted at torchsde's defaults only
_IGNORED_AT_DEFAULT = ("dt_min", "adjoint_adaptive")


class TorchsdeAdapter(HostAdapter):
    """Routes ``torchsde.sdeint``/``sdeint_adjoint`` calls with a rampde method to the Wong--Zakai ODE."""

    name = "torchsde"
    host_module = "torchsde"
    host_distribution = "torchsde"
    supported = ">=0.2.5,<0.3"

    def __init__(self) -> None:
        super().__init__()
        self._table: dict = {}

    def _method_table(self) -> dict:
        # Our own table of the names the dispatchers accept (torchsde has none to add them to).
        return self._table

    def _add_method(self, table: dict, key: str, tableau) -> None:
        self._add_entry(table, key, tableau)

    def install(self, registry) -> None:
        if self.installed:
            return
        try:
            torchsde = importlib.import_module("torchsde")
        except ImportError as exc:
            raise UnsupportedHostError(f"torchsde cannot be imported ({exc})") from None
        originals = {}
        for entry in ("sdeint", "sdeint_adjoint"):
            fn = getattr(torchsde, entry, None)
            if not callable(fn):
                raise UnsupportedHostError(f"torchsde {self.host_version()} has no callable torchsde.{entry}; "
                                           f"supported: {self.supported}")
            params = set(inspect.signature(fn).parameters)
            need = {"sde", "y0", "ts", "bm", "method", "dt", "options", "names"}
            if entry == "sdeint_adjoint":
                need |= set(_ADJOINT_KEYWORDS)
            if not need <= params:
                raise UnsupportedHostError(f"torchsde.{entry} lacks keyword(s) {sorted(need - params)}; "
                                           f"supported: {self.supported}")
            originals[entry] = fn
        for key, tab in ((PREFIX + n, t) for n, t in registry.tableaus.items()):
            self._add_method(self._table, key, tab)
        for entry, fn in originals.items():
            self._patch_attr(torchsde, entry, self._dispatcher(fn, adjoint=entry == "sdeint_adjoint"))
        self.installed = True

    def _dispatcher(self, original, *, adjoint: bool):
        signature = inspect.signature(original)
        adapter = self

        @functools.wraps(original)
        def dispatch(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)  # torchsde says what is wrong with the call
            method = bound.arguments.get("method")
            if not (isinstance(method, str) and adapter.owns(method)):
                return original(*args, **kwargs)
            return adapter._rampde_call(bound, adjoint=adjoint, owner=f"torchsde.{original.__name__}")

        dispatch._rampde_original = original
        return dispatch

    def _rampde_call(self, bound, *, adjoint: bool, owner: str):
        from ._sdeint import sdeint

        given = dict(bound.arguments)
        extra = given.pop("unused_kwargs", {})
        for key in _IGNORED_AT_DEFAULT:
            if key in given and given[key] != bound.signature.parameters[key].default:
                raise ValueError(f"{owner}(method={given['method']!r}): {key}={given[key]!r} does not apply to the "
                                 "Wong--Zakai ODE; leave it at torchsde's default")
            given.pop(key, None)
        kwargs = {**given, **extra}
        if adjoint:
            kwargs["adjoint"] = "quadrature"
        elif any(k in kwargs for k in _ADJOINT_KEYWORDS):
            raise ValueError(f"{owner}: {sorted(k for k in _ADJOINT_KEYWORDS if k in kwargs)} apply to sdeint_adjoint")
        return sdeint(**kwargs)
