"""The plugin manager, the registry it fills, and the adapters' lifecycle.

One cached factory (pytest/tox style): add hookspecs -> honour the disable variable -> load the
entry points -> register the built-ins -> ``check_pending()``.  The registry is derived from the
plugins and rebuilt whenever a plugin is registered or unregistered at run time; installed adapters
are then re-synced so a new tableau appears in every host library at once.
"""

from __future__ import annotations

import os
import threading
import warnings
from types import MappingProxyType

import pluggy
import torch

from . import _builtin, _hookspecs
from ._adapter import HostAdapter, UnsupportedHostError
from ._policy import PrecisionPolicy
from ._tableau import ButcherTableau

ENTRY_POINT_GROUP = "rampde_plugins"
DISABLE_AUTOLOAD_ENV = "RAMPDE_PLUGINS_DISABLE_AUTOLOAD"
BUILTIN_PLUGIN_NAME = "rampde_plugins.builtin"


class RampdeAdapterWarning(UserWarning):
    """An adapter could not be installed automatically (the message says why)."""


class RampdePluginWarning(UserWarning):
    """A broken entry-point plugin was skipped (the message names it, its distribution and why)."""


class RampdePluginError(ValueError):
    """A plugin's registration failed; ``plugin`` is the name of the plugin at fault."""

    def __init__(self, message: str, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


def _truthy(value: str | None) -> bool:
    """The usual environment-switch convention: unset, "", "0", "false", "no", "off" are false."""
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def autoload_disabled() -> bool:
    """Whether ``RAMPDE_PLUGINS_DISABLE_AUTOLOAD`` is set to a true value ("1", "true", "yes", "on")."""
    return _truthy(os.environ.get(DISABLE_AUTOLOAD_ENV))


class Registry:
    """Policies, tableaus and adapters registered by the plugins, each with the plugin that did it."""

    def __init__(self) -> None:
        self._policies: dict[str, tuple[PrecisionPolicy, str]] = {}
        self._tableaus: dict[str, tuple[ButcherTableau, str]] = {}
        self._adapters: dict[str, tuple[HostAdapter, str]] = {}
        self._shared: dict[str, bool] = {}

    # read-only views
    @property
    def policies(self) -> MappingProxyType:
        return MappingProxyType({k: v for k, (v, _) in self._policies.items()})

    @property
    def tableaus(self) -> MappingProxyType:
        return MappingProxyType({k: v for k, (v, _) in self._tableaus.items()})

    @property
    def adapters(self) -> MappingProxyType:
        return MappingProxyType({k: v for k, (v, _) in self._adapters.items()})

    def provider(self, kind: str, name: str) -> str:
        """The plugin that registered ``name`` (kind: ``"policy"``, ``"tableau"`` or ``"adapter"``)."""
        table = {"policy": self._policies, "tableau": self._tableaus, "adapter": self._adapters}[kind]
        return table[name][1]

    def policy(self, name: str) -> PrecisionPolicy:
        """The policy called ``name``; ``ValueError`` listing the registered ones otherwise."""
        try:
            return self._policies[name][0]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown precision policy {name!r}; registered policies: {', '.join(sorted(self._policies))}"
            ) from None

    def tableau(self, name: str) -> ButcherTableau:
        try:
            return self._tableaus[name][0]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown method {name!r}; registered methods: {', '.join(sorted(self._tableaus))}"
            ) from None

    def _add(self, table, what, key, value, plugin):
        if key in table:
            raise RampdePluginError(
                f"{what} {key!r} is registered twice: by plugin {table[key][1]!r} and by plugin {plugin!r}",
                _culprit(table[key][1], plugin),
            )
        table[key] = (value, plugin)


class _Registrar:
    """What a registration hook receives: adds entries on behalf of one named plugin."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry, self.plugin = registry, plugin

    def add_policy(self, policy: PrecisionPolicy) -> None:
        if not isinstance(policy, PrecisionPolicy):
            raise TypeError(f"add_policy expects a PrecisionPolicy, got {type(policy).__name__} from plugin {self.plugin!r}")
        self._registry._add(self._registry._policies, "precision policy", policy.name, policy, self.plugin)

    def add_tableau(self, tableau: ButcherTableau, *, shared: bool = False) -> None:
        """Register a method.

        ``shared=True`` marks a well-known method that other plugins may register too (e.g.
        Dormand--Prince ``dopri5``, defined by both torchdiffeq and torchode): a second shared
        registration with the same coefficients is merged into one method (the providers are
        recorded); different coefficients under the same name raise a ``ValueError``.
        """
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"add_tableau expects a ButcherTableau, got {type(tableau).__name__} from plugin {self.plugin!r}")
        table = self._registry._tableaus
        existing = table.get(tableau.name)
        if shared and existing is not None and self._registry._shared.get(tableau.name):
            if not existing[0].same_coefficients(tableau, tol=1e-12):
                raise RampdePluginError(
                    f"method {tableau.name!r} is registered by plugin {existing[1]!r} and by plugin {self.plugin!r} "
                    "with different coefficients (c, A, b, error weights b_err or order differ); rename one of them",
                    _culprit(existing[1].split(", ")[0], self.plugin),
                )
            table[tableau.name] = (existing[0], f"{existing[1]}, {self.plugin}")
            return
        self._registry._add(table, "method", tableau.name, tableau, self.plugin)
        self._registry._shared[tableau.name] = shared

    def add_adapter(self, adapter: HostAdapter) -> None:
        if not isinstance(adapter, HostAdapter):
            raise TypeError(f"add_adapter expects a HostAdapter, got {type(adapter).__name__} from plugin {self.plugin!r}")
        self._registry._add(self._registry._adapters, "adapter", adapter.name, adapter, self.plugin)


def _culprit(existing: str, new: str) -> str:
    """Which of two clashing plugins is at fault: the third-party one when the other is our own."""
    own = own_plugins()
    return existing if new in own and existing not in own else new


def _entry_points(with_dist: bool = False):
    """(distribution name and version, entry point) of the rampde_plugins group, in discovery order;
    ``with_dist``: (distribution name, its name and version, entry point)."""
    import importlib.metadata

    found = []
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                label = f"{dist.metadata['name']} {dist.version}"
                found.append((dist.metadata["name"], label, ep) if with_dist else (label, ep))
    return found


def _normalized(name) -> str:
    return str(name or "").replace("_", "-").replace(".", "-").lower()


def _own_distributions() -> frozenset:
    """The distribution(s) this package is installed from, read from the installed metadata."""
    import importlib.metadata

    try:
        names = importlib.metadata.packages_distributions().get(__name__.split(".")[0], [])
    except Exception:  # noqa: BLE001 -- unreadable metadata: no distribution is ours
        names = []
    return frozenset(_normalized(n) for n in names)


def own_plugins() -> frozenset:
    """The plugins shipped with rampde-plugins: the built-ins and the entry points of the
    ``rampde_plugins`` group that the distribution installing this package declares (found there, as
    any third party's are, never from a list kept here).  A clash between one of these and a
    third-party plugin is blamed on the third-party plugin, which is the one skipped."""
    own = _own_distributions()
    return frozenset({BUILTIN_PLUGIN_NAME} | {ep.name for dist, _, ep in _entry_points(with_dist=True)
                                              if _normalized(dist) in own})


def _skip(pm, name: str, where: str, exc: BaseException) -> None:
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)
    pm.set_blocked(name)  # a later load (or a rebuild) does not pick it up again
    warnings.warn(
        f"rampde_plugins: plugin {name!r} ({where}) is broken and was skipped: {type(exc).__name__}: {exc}",
        RampdePluginWarning, stacklevel=4,
    )


def make_plugin_manager(autoload: bool | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager (tests use this to avoid the cached one).

    Each entry point is loaded on its own: one that fails to import, misspells a hook (pluggy's
    ``check_pending``) or breaks the registry (a duplicate or invalid entry, a hook that raises) is
    reported in one :class:`RampdePluginWarning` naming it and its distribution, and skipped; the
    built-ins and every other plugin keep working.
    """
    pm = pluggy.PluginManager(_hookspecs.PROJECT_NAME)
    pm.add_hookspecs(_hookspecs)
    pm.register(_builtin, name=BUILTIN_PLUGIN_NAME)
    if autoload is None:
        autoload = not autoload_disabled()
    origin = {}
    if autoload:
        for dist, ep in _entry_points():
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            origin[ep.name] = f"entry point {ep.name!r} of {dist}"
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
                pm.check_pending()
            except Exception as exc:  # noqa: BLE001 -- any failure of third-party code is reported
                _skip(pm, ep.name, origin[ep.name], exc)
    pm.check_pending()
    # A registration that fails is blamed on one plugin: skip it and build again (built-ins never).
    while True:
        try:
            build_registry(pm)
            break
        except (RampdePluginError, TypeError, ValueError) as exc:
            culprit = getattr(exc, "plugin", None)
            if culprit not in origin or culprit in own_plugins():
                raise
            _skip(pm, culprit, origin[culprit], exc)
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call the registration hooks plugin by plugin, so duplicates can name both plugins.

    Raises :class:`RampdePluginError` naming the plugin at fault.
    """
    registry = Registry()
    for hook_name in ("rampde_register_precision_policies", "rampde_register_tableaus", "rampde_register_adapters"):
        hook = getattr(pm.hook, hook_name)
        # get_hookimpls() is in reverse call order; call in pluggy's order (user plugins first,
        # trylast built-ins last) so a clash is reported against the built-in.
        for impl in reversed(hook.get_hookimpls()):
            kwargs = {"registry": _Registrar(registry, impl.plugin_name)}
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except RampdePluginError:
                raise
            except Exception as exc:  # noqa: BLE001 -- say which plugin it was
                if isinstance(exc, (TypeError, ValueError)) and f"plugin {impl.plugin_name!r}" in str(exc):
                    exc.plugin = impl.plugin_name  # the registrar's own check: it names the plugin already
                    raise
                raise RampdePluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}", impl.plugin_name
                ) from exc
    return registry


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pm: pluggy.PluginManager | None = None
        self.registry: Registry | None = None


_state = _State()


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    with _state.lock:
        if _state.pm is None:
            _state.pm = make_plugin_manager()
        return _state.pm


def get_registry() -> Registry:
    """The process-wide registry of policies, tableaus and adapters."""
    with _state.lock:
        if _state.registry is None:
            _state.registry = build_registry(get_plugin_manager())
        return _state.registry


def _swap_registry(mutate, undo) -> Registry:
    """Apply a plugin-set change, rebuild the registry, re-sync adapters; undo on any error."""
    with _state.lock:
        pm = get_plugin_manager()
        old = get_registry()
        mutate(pm)
        try:
            new = build_registry(pm)
        except Exception:
            undo(pm)
            raise
        # Adapter objects are carried over so installed state is not lost.
        for name, (adapter, plugin) in list(new._adapters.items()):
            if name in old._adapters:
                new._adapters[name] = old._adapters[name]
        clashes = {a.name: a.refresh_clashes(new) for a in new.adapters.values()}
        clashes = {k: v for k, v in clashes.items() if v}
        if clashes:
            undo(pm)
            raise ValueError(
                "the host libraries already define method(s) "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in clashes.items()) + "; rampde will not replace them"
            )
        for name, (adapter, _) in old._adapters.items():
            if name not in new._adapters and adapter.installed:
                adapter.uninstall()
        _state.registry = new
        for adapter in new.adapters.values():
            adapter.refresh(new)
        return new


def register_plugin(plugin, name: str | None = None) -> str:
    """Register a plugin object at run time; its tableaus appear in every installed host at once.

    Raises ``ValueError`` (and registers nothing) if one of its names is already taken.
    Returns the plugin's name.
    """
    holder = {}

    def mutate(pm):
        holder["name"] = pm.register(plugin, name=name)
        if holder["name"] is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked or already registered")
        try:
            pm.check_pending()  # a misspelled hook is an error here too
        except pluggy.PluginValidationError as exc:
            pm.unregister(plugin)
            raise RampdePluginError(f"plugin {holder['name']!r}: {exc}", holder["name"]) from None

    _swap_registry(mutate, lambda pm: pm.unregister(plugin))
    return holder["name"]


def unregister_plugin(plugin=None, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin` (by object or by name)."""

    def mutate(pm):
        target = plugin if plugin is not None else pm.get_plugin(name)
        if target is None or not pm.is_registered(target):
            raise ValueError(f"plugin {name or plugin!r} is not registered")
        if pm.get_name(target) == BUILTIN_PLUGIN_NAME:
            raise ValueError("the built-in plugin cannot be unregistered")
        holder["plugin"], holder["name"] = target, pm.get_name(target)
        pm.unregister(target)

    holder = {}
    _swap_registry(mutate, lambda pm: pm.register(holder["plugin"], name=holder["name"]))


def _load_entry_points(names) -> None:
    """With autoload disabled, :func:`install` loads entry points on demand: the named ones (any
    distribution's, found in the ``rampde_plugins`` group as at autoload), or all of this package's own
    when none are named.  An entry point that fails to load or to register is reported by name (a
    ``RampdePluginError`` when it was named, a ``RampdePluginWarning`` otherwise) and nothing of it stays."""
    if not autoload_disabled():
        return
    pm = get_plugin_manager()
    found = _entry_points(with_dist=True)
    if names:
        candidates = [(label, ep) for _, label, ep in found if ep.name in names]
    else:
        own = _own_distributions()
        candidates = [(label, ep) for dist, label, ep in found if _normalized(dist) in own]
    done = set()
    for label, ep in candidates:
        name = ep.name
        if name in done or pm.get_plugin(name) is not None or pm.is_blocked(name):
            continue
        done.add(name)
        where = f"entry point {name!r} of {label}"

        def mutate(pm, name=name):
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
                pm.check_pending()
            except BaseException:
                if pm.get_plugin(name) is not None:
                    pm.unregister(name=name)
                raise

        try:
            _swap_registry(mutate, lambda pm, name=name: pm.get_plugin(name) is not None and pm.unregister(name=name))
        except Exception as exc:  # noqa: BLE001 -- any failure of a plugin's code is reported with its name
            if names:
                raise RampdePluginError(
                    f"rampde_plugins.install({name!r}): plugin {name!r} ({where}) is broken: {type(exc).__name__}: {exc}",
                    name,
                ) from exc
            warnings.warn(
                f"rampde_plugins: plugin {name!r} ({where}) is broken and was not loaded: {type(exc).__name__}: {exc}",
                RampdePluginWarning, stacklevel=4,
            )


def _select_adapters(names):
    registry = get_registry()
    if not names:
        return registry, list(registry.adapters.values())
    chosen = []
    for n in names:
        if n not in registry.adapters:
            entry_points = sorted({ep.name for _, ep in _entry_points()})
            raise ValueError(
                f"unknown adapter {n!r}; registered adapters: {', '.join(sorted(registry.adapters)) or 'none'}; "
                f"entry points in group {ENTRY_POINT_GROUP!r}: {', '.join(entry_points) or 'none'}"
            )
        chosen.append(registry.adapters[n])
    return registry, chosen


def install(*names: str) -> list[str]:
    """Install the named adapters (all whose host is importable, if none are named); idempotent.

    With ``RAMPDE_PLUGINS_DISABLE_AUTOLOAD`` set, this is how adapters are turned on: the entry points
    of the ``rampde_plugins`` group with the given names are loaded first (whichever distribution
    declares them, the project's own ``torchdiffeq``, ``torchode`` and ``torchsde`` or a third party's);
    with no names, those of this project.  Other entry points stay unloaded.

    Raises :class:`rampde_plugins.UnsupportedHostError` if a named adapter's host lacks a
    capability, ``ValueError`` for an unknown name or a host that is not installed, or
    ``RampdePluginError`` (a ``ValueError``) naming a named entry point that fails to load.
    Returns the names installed.
    """
    with _state.lock:
        _load_entry_points(names)
        registry, adapters = _select_adapters(names)
        done = []
        for adapter in adapters:
            if not adapter.host_available():
                if names:
                    raise ValueError(f"adapter {adapter.name!r}: host library {adapter.host_module!r} is not installed")
                continue
            adapter.install(registry)
            done.append(adapter.name)
        return done


def uninstall(*names: str) -> list[str]:
    """Remove the named adapters' patches (all, if none are named); idempotent."""
    with _state.lock:
        _, adapters = _select_adapters(names)
        for adapter in adapters:
            if adapter.installed:
                adapter.uninstall()
        return [a.name for a in adapters]


def _autoinstall() -> None:
    """On import: install every adapter whose host is importable; warn (never fail) on problems."""
    if autoload_disabled():
        return
    registry = get_registry()
    for adapter in registry.adapters.values():
        if not adapter.host_available():
            continue
        try:
            adapter.install(registry)
        except UnsupportedHostError as exc:
            warnings.warn(f"rampde_plugins: adapter {adapter.name!r} not installed: {exc}", RampdeAdapterWarning, stacklevel=3)


def resolve_policy(precision=None, *, device_type: str = "cpu", state_dtype: torch.dtype = torch.float32) -> PrecisionPolicy:
    """The policy of a solve.

    Order: ``precision`` (a registered name or a :class:`PrecisionPolicy`); else the
    ``rampde_default_policy`` hook, which by default follows the active ``torch.autocast`` on
    ``device_type`` and otherwise the state dtype.  The result is checked against the device.
    """
    registry = get_registry()
    if precision is None:
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        precision = get_plugin_manager().hook.rampde_default_policy(
            device_type=device_type, autocast_dtype=autocast_dtype, state_dtype=state_dtype
        )
        if precision is None:
            raise ValueError(
                f"no precision policy for autocast dtype {autocast_dtype} / state dtype {state_dtype} on "
                f"{device_type!r}; pass options={{'precision': name}} with one of {', '.join(sorted(registry.policies))}"
            )
    if isinstance(precision, str):
        policy = registry.policy(precision)
    elif isinstance(precision, PrecisionPolicy):
        policy = precision
    else:
        raise TypeError(
            f"precision must be a policy name or a PrecisionPolicy, got {type(precision).__name__}; "
            f"registered policies: {', '.join(sorted(registry.policies))}"
        )
    policy.check_device(device_type)
    return policy
