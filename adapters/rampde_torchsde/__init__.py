"""rampde plugin for torchsde: train SDEs through their Wong--Zakai ODEs on the rampde engine.

* ``rampde_torchsde.sdeint(sde, y0, ts, method="rampde_rk4", ...)`` -- torchsde's conventions (an
  ``sde`` with ``f``, ``g``, ``noise_type``, ``sde_type``; output ``(len(ts), batch, d)``), solved as the
  ODE ``dy/dt = f + g xi_K(t)`` driven by a ``K``-term Karhunen--Loeve Brownian path;
* once installed (``import rampde_plugins`` does it when torchsde is importable), ``torchsde.sdeint``
  and ``torchsde.sdeint_adjoint`` accept ``method="rampde_<name>"`` too -- the latter with rampde's
  Gauss--Legendre quadrature adjoint.  Every other method is torchsde's own, untouched.

The trained ``sde`` is an ordinary torchsde SDE: sample it with ``torchsde.sdeint(sde, y0, ts,
method="midpoint")`` (or any Stratonovich method) -- the same parameters serve both.

Importing this module does not import torchsde; the adapter does, when it is installed.
"""

from rampde_plugins import HostAdapter, hookimpl

__all__ = ["TorchsdeAdapter", "sdeint", "WONG_ZAKAI_DEFAULT_TERMS"]


def __getattr__(name):  # lazy: the SDE front end is imported only when sdeint is used
    if name in ("sdeint", "WONG_ZAKAI_DEFAULT_TERMS"):
        from . import _sdeint

        return getattr(_sdeint, name)
    if name == "TorchsdeAdapter":
        from ._adapter import TorchsdeAdapter

        return TorchsdeAdapter
    raise AttributeError(name)


@hookimpl
def rampde_register_adapters(registry):
    if not HostAdapter.importable("torchsde"):
        return  # optional extra [sde]: nothing to adapt
    from ._adapter import TorchsdeAdapter

    registry.add_adapter(TorchsdeAdapter())
