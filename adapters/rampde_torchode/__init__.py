"""rampde plugin for torchode: the rampde engine behind torchode's API.

* ``torchode.solve_ivp(f, y0, t_eval, method="rampde_<name>", dt0=h)`` for every registered tableau;
* :class:`RampdeAdjoint` -- use it where ``torchode.AutoDiffAdjoint`` is used, with torchode's own step
  methods (``Euler``, ``Heun``, ``Dopri5``, ``Tsit5``) and a ``precision=`` argument;
* :class:`QuadratureAdjoint` -- use it where torchode's ``BacksolveAdjoint`` is used (or say
  ``solve_ivp(..., method="rampde_<name>", adjoint="quadrature")``): the Gauss--Legendre quadrature
  adjoint, memory flat in the number of steps;
* torchode's Dopri5 and Tsit5 tableaus registered as ``dopri5``/``tsit5`` (one method per name across
  hosts: a second registration with the same coefficients is merged).

Importing this module does not import torchode; the hooks do, when it is installed.
"""


from rampde_plugins import HostAdapter, hookimpl

__all__ = ["QuadratureAdjoint", "RampdeAdjoint", "RampdeStepMethod", "TorchodeAdapter"]


def __getattr__(name):  # lazy: torchode is imported only when these are used
    if name in ("RampdeAdjoint", "RampdeStepMethod", "fixed_step_grid", "tableau_of"):
        from . import _adjoint

        return getattr(_adjoint, name)
    if name == "QuadratureAdjoint":
        from ._quadrature import QuadratureAdjoint

        return QuadratureAdjoint
    if name == "TorchodeAdapter":
        from ._adapter import TorchodeAdapter

        return TorchodeAdapter
    raise AttributeError(name)


def _torchode_available() -> bool:
    return HostAdapter.importable("torchode")


@hookimpl
def rampde_register_adapters(registry):
    from ._adapter import TorchodeAdapter

    registry.add_adapter(TorchodeAdapter())


@hookimpl
def rampde_register_tableaus(registry):
    if not _torchode_available():
        return
    from ._adapter import host_tableaus

    try:
        tableaus = host_tableaus()
    except (ImportError, AttributeError, TypeError):
        return  # a torchode without Dopri5/Tsit5 tableaus: installing the adapter says what it lacks
    for tableau in tableaus:
        registry.add_tableau(tableau, shared=True)
