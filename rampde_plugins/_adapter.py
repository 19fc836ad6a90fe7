"""Base class of host-library adapters (the OpenTelemetry-instrumentor pattern).

An adapter patches one host library minimally and reversibly: ``install`` is idempotent and records
exactly what it changed; ``uninstall`` restores that and nothing else.  It checks capabilities of the
installed host (attributes, signatures) rather than version strings, and raises
:class:`UnsupportedHostError` with the reason when a capability is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

__all__ = ["HostAdapter", "UnsupportedHostError"]


class UnsupportedHostError(RuntimeError):
    """The installed host library lacks a capability the adapter needs."""


class HostAdapter:
    """One host library's adapter.  Subclasses set the class attributes and implement the hooks.

    Attributes:
        name: adapter name (``"torchdiffeq"``).
        host_module: the module to import (``"torchdiffeq"``).
        host_distribution: the distribution whose version is reported.
        supported: the version range the adapter is written and tested against (informational; the
            checks themselves are capability checks).
    """

    name: str = ""
    host_module: str = ""
    host_distribution: str = ""
    supported: str = ""

    def __init__(self) -> None:
        self.installed = False
        self._patches: list[tuple[object, str, object, object]] = []
        self._entries: list[tuple[dict, str, object]] = []
        self._added: set[str] = set()  # method names this adapter put into its host

    # -- reversible patching (used by install/uninstall) ---------------------------------------
    def _patch_attr(self, owner, name: str, replacement) -> object:
        """Set ``owner.name = replacement``, remembering the original; returns the original."""
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        self._patches.append((owner, name, original, replacement))
        return original

    def _add_entry(self, table: dict, key: str, value, *, set_it: bool = True) -> None:
        """Add ``table[key] = value`` (a method table of the host), remembering it as our method.

        ``set_it=False`` records an entry the host's own registration function already made.
        """
        if set_it:
            table[key] = value
        self._entries.append((table, key, value))
        self._added.add(key)

    def _undo(self) -> None:
        """Restore what ``_patch_attr``/``_add_entry`` changed -- only where nobody changed it since."""
        for table, key, value in reversed(self._entries):
            if table.get(key) is value:
                del table[key]
        for owner, name, original, replacement in reversed(self._patches):
            if getattr(owner, name, None) is replacement:
                setattr(owner, name, original)
        self._entries.clear()
        self._patches.clear()
        self._added.clear()

    def host_available(self) -> bool:
        return self.importable(self.host_module)

    @staticmethod
    def importable(module: str) -> bool:
        """Can ``module`` be found?  False also when looking raises -- an import hook that refuses it,
        or ``sys.modules[module] = None`` -- so that a host nobody can import is "not installed"."""
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    def host_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.host_distribution or self.host_module)
        except importlib.metadata.PackageNotFoundError:
            return None

    def install(self, registry) -> None:  # pragma: no cover - interface
        """Expose every tableau of ``registry`` in the host library (idempotent)."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Undo everything ``install`` did (idempotent)."""
        if self.installed:
            self._undo()
            self.installed = False

    def owns(self, method) -> bool:
        """Is ``method`` a name this adapter put into its host?"""
        return isinstance(method, str) and method in self._added

    # -- method entries (refresh adds and removes only what changed) ---------------------------
    prefix = "rampde_"

    def _method_table(self) -> dict:  # pragma: no cover - interface
        """The host's dict of method names (torchdiffeq's SOLVERS, torchode's METHODS)."""
        raise NotImplementedError

    def _add_method(self, table: dict, key: str, tableau) -> None:  # pragma: no cover - interface
        """Put one registered tableau into ``table`` as ``key`` (through ``_add_entry``)."""
        raise NotImplementedError

    def refresh_clashes(self, registry) -> list[str]:
        """Method names a refresh to ``registry`` would add but the host already defines itself."""
        if not self.installed:
            return []
        table = self._method_table()
        return sorted(self.prefix + n for n in registry.tableaus
                      if self.prefix + n not in self._added and self.prefix + n in table)

    def refresh(self, registry) -> None:
        """Re-sync the exposed methods after plugins were registered or unregistered.

        Only the difference is applied, each entry with one dict operation: a method that stays
        registered never leaves the host's table, not even for an instant, so solves running in other
        threads are not disturbed.
        """
        if not self.installed:
            return
        table = self._method_table()
        wanted = {self.prefix + n: n for n in registry.tableaus}
        keep = []
        for entry in self._entries:
            tbl, key, value = entry
            if tbl is table and key not in wanted:
                if tbl.get(key) is value:
                    del tbl[key]
                self._added.discard(key)
            else:
                keep.append(entry)
        self._entries[:] = keep
        for key, name in wanted.items():
            if key not in self._added:
                self._add_method(table, key, registry.tableau(name))

    def methods(self) -> list[str]:
        """Names this adapter has put into its host library."""
        return sorted(self._added)
