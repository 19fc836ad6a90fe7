"""Hook specifications of rampde-plugins.

A plugin is any module or object with functions marked ``@rampde_plugins.hookimpl`` whose names are
the hooks below.  Third-party plugins are found through the ``rampde_plugins`` entry-point group --
the same way this project's own host adapters are::

    # pyproject.toml of your package
    [project.entry-points.rampde_plugins]
    my_policies = "my_package.rampde_plugin"

    # my_package/rampde_plugin.py
    import torch, rampde_plugins
    from rampde_plugins import PrecisionPolicy, hookimpl

    @hookimpl
    def rampde_register_precision_policies(registry):
        registry.add_policy(PrecisionPolicy("bf16_store16", torch.bfloat16, torch.float32,
                                            storage_dtype=torch.float16))

Objects can also be registered at run time with :func:`rampde_plugins.register_plugin`.  Setting
``RAMPDE_PLUGINS_DISABLE_AUTOLOAD=1`` skips entry-point loading (built-ins are always registered).

Registration hooks receive a *registrar* that knows which plugin is calling, so a name registered
twice is reported with both plugins' names.  The built-in implementations are ``trylast``.
"""

import pluggy

PROJECT_NAME = "rampde_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def rampde_register_precision_policies(registry):
    """Register precision policies.

    Call ``registry.add_policy(policy)`` with a :class:`rampde_plugins.PrecisionPolicy` for each
    policy.  Policies are selected by name with ``options={"precision": name}`` in every host
    library.  A name that another plugin already registered raises ``ValueError`` naming both.

    :param registry: the registrar for the calling plugin.
    """


@hookspec
def rampde_register_tableaus(registry):
    """Register Runge--Kutta methods.

    Call ``registry.add_tableau(tableau)`` with a :class:`rampde_plugins.ButcherTableau` for each
    method.  Every installed host adapter exposes it as ``rampde_<name>`` (torchdiffeq:
    ``odeint(..., method="rampde_<name>")``).  Duplicate names raise ``ValueError`` naming both
    plugins.

    :param registry: the registrar for the calling plugin.
    """


@hookspec
def rampde_register_adapters(registry):
    """Register host-library adapters.

    Call ``registry.add_adapter(adapter)`` with a :class:`rampde_plugins.HostAdapter`.  Adapters
    whose host library is importable are installed when ``rampde_plugins`` is imported (unless
    autoloading is disabled) and can be removed with :func:`rampde_plugins.uninstall`.

    :param registry: the registrar for the calling plugin.
    """


@hookspec(firstresult=True)
def rampde_default_policy(device_type, autocast_dtype, state_dtype):
    """Choose the precision policy of a solve that did not name one.

    Called once per solve without ``options["precision"]``.  Return a policy name, a
    :class:`rampde_plugins.PrecisionPolicy`, or ``None`` to let the next plugin decide; the first
    non-``None`` answer wins.  The built-in answer (``trylast``) is the active autocast dtype's
    policy (``"fp16"``/``"bf16"``) or, without autocast, the full-precision policy of the state dtype
    (``"fp64"``/``"fp32"``).

    :param device_type: ``y0.device.type``, e.g. ``"cpu"`` or ``"cuda"``.
    :param autocast_dtype: the dtype of the active ``torch.autocast`` on that device, or ``None``.
    :param state_dtype: the dtype of ``y0``.
    """
