"""rampde plugin for torchdiffeq: every registered tableau as ``odeint(..., method="rampde_<name>")``.

Loaded through the ``rampde_plugins`` entry-point group like any third-party plugin; it registers one
:class:`TorchdiffeqAdapter`, which ``import rampde_plugins`` installs when torchdiffeq is importable.
"""

from rampde_plugins import HostAdapter, hookimpl

from ._adapter import TorchdiffeqAdapter, host_tableaus, validate_call
from ._solver import OPTIONS, RampdeFixedGridSolver, parse_options

__all__ = ["OPTIONS", "RampdeFixedGridSolver", "TorchdiffeqAdapter", "parse_options", "validate_call"]


@hookimpl
def rampde_register_adapters(registry):
    registry.add_adapter(TorchdiffeqAdapter())


@hookimpl
def rampde_register_tableaus(registry):
    if not HostAdapter.importable("torchdiffeq"):
        return
    try:
        tableaus = host_tableaus()
    except ImportError:
        return  # a torchdiffeq that cannot be imported: installing the adapter reports it
    for tableau in tableaus:
        registry.add_tableau(tableau, shared=True)
