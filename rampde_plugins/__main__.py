"""``python -m rampde_plugins``: the loaded plugins, adapters, methods and precision policies."""

from __future__ import annotations

import sys

import torch

import rampde_plugins
from rampde_plugins._manager import BUILTIN_PLUGIN_NAME


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def main(argv=None) -> int:
    pm = rampde_plugins.get_plugin_manager()
    registry = rampde_plugins.get_registry()
    lines = [f"rampde_plugins {rampde_plugins.__version__} (torch {torch.__version__})", "", "plugins:"]
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: str(x[0])):
        if plugin is None:  # blocked: a broken plugin that was skipped (its warning said why)
            rows.append((name, "skipped (broken)", "-"))
            continue
        dist = dists.get(id(plugin))
        origin = f"{dist.project_name} {dist.version}" if dist is not None else ("built in" if name == BUILTIN_PLUGIN_NAME else "registered at run time")
        rows.append((name, origin, getattr(plugin, "__name__", type(plugin).__name__)))
    lines += _table(rows)
    lines += ["", "adapters:"]
    rows = []
    for name, adapter in sorted(registry.adapters.items()):
        state = "installed" if adapter.installed else ("host not installed" if not adapter.host_available() else "not installed")
        rows.append((name, f"{adapter.host_module} {adapter.host_version() or '-'}", f"supported {adapter.supported}", state))
    lines += _table(rows) if rows else ["  (none)"]
    lines += ["", "methods (host libraries see rampde_<name>):"]
    rows = [
        (f"rampde_{n}", f"order {t.order}", f"{t.stages} stage{'s' if t.stages != 1 else ''}",
         "implicit" if t.implicit else "explicit",
         "adaptive" if t.b_err is not None and any(w != 0.0 for w in t.b_err) else "fixed steps",
         registry.provider("tableau", n), t.description)
        for n, t in sorted(registry.tableaus.items())
    ]
    lines += _table(rows)
    lines += ["", "precision policies (options={'precision': name}; * = default for a float32 state on the CPU "
                  "without autocast):"]
    default = rampde_plugins.resolve_policy(None, device_type="cpu", state_dtype=torch.float32).name
    rows = [(("* " if n == default else "  ") + n, registry.provider("policy", n), p.describe())
            for n, p in sorted(registry.policies.items())]
    lines += _table(rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
