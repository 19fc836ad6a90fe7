"""Runs INSIDE a cell's virtualenv (``python compat/_cell.py ...``); standard library + the cell's packages.

``versions``     assert that torch / torchdiffeq / torchode resolve to the cell's versions (read with
                 importlib.metadata, and checked to be the distributions that own the importable
                 modules), and that a reused torch is the interpreter's own build, not a copy in the
                 virtualenv; writes them as JSON.
``unsupported``  for an expected-unsupported cell: ``import rampde_plugins`` must warn
                 RampdeAdapterWarning and ``rampde_plugins.install(host)`` must raise
                 UnsupportedHostError, both with a message matching every ``--message`` regex.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import sys
import traceback
import warnings
from pathlib import Path

DISTS = {"torch": "torch", "torchdiffeq": "torchdiffeq", "torchode": "torchode", "rampde-plugins": "rampde_plugins"}
#: the project's packages: they must come from the checkout under test (--root)
PROJECT_MODULES = ("rampde_plugins", "rampde_torchdiffeq", "rampde_torchode")


def _inside(path: str | None, prefix: str) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(Path(prefix).resolve())
        return True
    except ValueError:
        return False


def describe() -> dict:
    """Versions and locations, without importing anything heavy."""
    out = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "venv": sys.prefix,
        "packages": {},
    }
    for dist, module in DISTS.items():
        try:
            d = md.distribution(dist)
            version = d.version
        except md.PackageNotFoundError:
            out["packages"][dist] = {"version": None}
            continue
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        owned = None
        if origin and not dist == "rampde-plugins":  # editable: the module lives in the checkout
            owned = str(Path(str(d.locate_file(f"{module}/__init__.py"))).resolve()) == str(Path(origin).resolve())
        out["packages"][dist] = {
            "version": version,
            "module_file": origin,
            "dist_location": str(d.locate_file("")),
            "module_owned_by_dist": owned,
            "in_venv": _inside(origin, sys.prefix),
            "dist_in_venv": _inside(str(d.locate_file("")), sys.prefix),
        }
    out["project_modules"] = {}
    for module in PROJECT_MODULES:
        spec = importlib.util.find_spec(module)
        out["project_modules"][module] = spec.origin if spec is not None else None
    return out


def cmd_versions(args) -> int:
    info = describe()
    expect = json.loads(args.expect)
    problems = []
    for host, want in expect.items():
        got = info["packages"].get(host, {})
        version = got.get("version")
        if version is None:
            problems.append(f"{host}: not installed (expected {want})")
            continue
        exact = version == want
        same_base = version.split("+", 1)[0] == want.split("+", 1)[0]
        if not (exact or (host == "torch" and same_base)):
            problems.append(f"{host}: importlib.metadata says {version}, expected {want}")
        if got.get("module_owned_by_dist") is False:
            problems.append(f"{host}: `import {host}` would load {got['module_file']}, not the {version} distribution at {got['dist_location']}")
    if args.system_torch:
        torch = info["packages"].get("torch", {})
        if torch.get("in_venv"):
            problems.append(f"torch was installed into the cell's virtualenv ({torch['module_file']}); it must be the reused system build")
        if torch.get("version") != args.system_torch:
            problems.append(f"torch {torch.get('version')} is not the interpreter's build {args.system_torch}")
    if args.root:
        for module, origin in info["project_modules"].items():
            if not _inside(origin, args.root):
                problems.append(f"{module} would be imported from {origin}, not from the checkout under test {args.root}")
    info["expected"] = expect
    info["problems"] = problems
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2))
    for host in ("torch", "torchdiffeq", "torchode", "rampde-plugins"):
        p = info["packages"].get(host, {})
        where = "venv" if p.get("in_venv") else "system site-packages" if p.get("module_file") else "-"
        if host == "rampde-plugins" and p.get("module_file"):
            where = "editable (venv)" if p.get("dist_in_venv") else "editable (system)"
        print(f"  {host:15s} {p.get('version')!s:14s} {where:22s} {p.get('module_file')}")
    if problems:
        print("VERSION CHECK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("versions as expected: " + ", ".join(f"{k} {v}" for k, v in expect.items()))
    return 0


def cmd_unsupported(args) -> int:
    patterns = args.message or []
    result = {"host": args.host, "patterns": patterns, "import_error": None, "warnings": [], "install": None}
    os.environ.pop("RAMPDE_PLUGINS_DISABLE_AUTOLOAD", None)
    raised_ok = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import rampde_plugins
        except BaseException as exc:  # noqa: BLE001 - what matters is that it is reported
            result["import_error"] = f"{type(exc).__name__}: {exc}"
            result["import_traceback"] = traceback.format_exc(limit=6)
            rampde_plugins = None
    if rampde_plugins is not None:
        result["warnings"] = [
            {"category": w.category.__name__, "message": str(w.message)}
            for w in caught
            if issubclass(w.category, rampde_plugins.RampdeAdapterWarning)
        ]
        adapter = rampde_plugins.get_registry().adapters.get(args.host)
        result["installed_on_import"] = bool(adapter and adapter.installed)
        try:
            rampde_plugins.uninstall(args.host)
            rampde_plugins.install(args.host)
            result["install"] = {"raised": None, "message": "installed without error"}
        except BaseException as exc:  # noqa: BLE001
            result["install"] = {"raised": type(exc).__name__, "message": str(exc)}
        raised_ok = (result["install"]["raised"] == "UnsupportedHostError")

    def matches(text):
        return all(re.search(p, text) for p in patterns)

    checks = {
        "import rampde_plugins succeeds": result["import_error"] is None,
        "import warns RampdeAdapterWarning matching the patterns": any(
            args.host in w["message"] and matches(w["message"]) for w in result["warnings"]
        ),
        f"install({args.host!r}) raises UnsupportedHostError": rampde_plugins is not None and raised_ok,
        "the error message matches the patterns": rampde_plugins is not None and raised_ok and matches(result["install"]["message"]),
    }
    result["checks"] = checks
    result["ok"] = all(checks.values())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    if result["import_error"]:
        print(f"  import error: {result['import_error']}")
    if result["install"]:
        print(f"  install: {result['install']['raised']}: {result['install']['message']}")
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compat/_cell.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--expect", required=True, help='JSON: {"torch": "2.13.0", "torchdiffeq": "0.2.4", ...}')
    p.add_argument("--system-torch", default="", help="the reused torch build's exact version")
    p.add_argument("--root", default="", help="the checkout whose rampde packages must be the ones imported")
    p.add_argument("--out")
    p.set_defaults(func=cmd_versions)
    p = sub.add_parser("unsupported")
    p.add_argument("--host", required=True)
    p.add_argument("--message", action="append", help="regex the warning and the error must match")
    p.add_argument("--out")
    p.set_defaults(func=cmd_unsupported)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
