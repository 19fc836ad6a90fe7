"""Unsupported host releases are refused with a clear error -- without network or installs.

Each scenario puts a minimal fake of an old host release first on ``sys.path`` (a package plus its
``.dist-info``, written to ``tmp_path``; only the module layout and the signatures the adapters look
at are mimicked) and imports ``rampde_plugins`` in a subprocess.  Expected: ``import rampde_plugins``
still works and warns ``RampdeAdapterWarning``; ``rampde_plugins.install(host)`` raises
``UnsupportedHostError``; both messages name what is missing and the supported range.  The version
matrix (compat/) checks the same on the real releases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TD_RANGE = "supported: >=0.2.3,<0.3"
TO_RANGE = "supported: >=0.2.0,<1.1"

PROBE = textwrap.dedent(
    """
    import importlib, importlib.metadata, json, sys, warnings
    host = sys.argv[1]
    for line in sys.argv[2:]:            # "module:attr" -- attributes to delete before the import
        mod, attr = line.split(":")
        delattr(importlib.import_module(mod), attr)
    out = {"version": importlib.metadata.version(host), "file": importlib.import_module(host).__file__}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import rampde_plugins
        except Exception as exc:
            out["import_error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(out)); sys.exit(0)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, rampde_plugins.RampdeAdapterWarning)]
    try:
        rampde_plugins.uninstall(host)
        rampde_plugins.install(host)
        out["raised"] = None
    except Exception as exc:
        out["raised"], out["message"] = type(exc).__name__, str(exc)
    print(json.dumps(out))
    """
)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def _dist_info(name: str, version: str) -> dict[str, str]:
    return {f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}


def _probe(host: str, fake_root: Path | None, delete=()) -> dict:
    env = dict(os.environ)
    env.pop("RAMPDE_PLUGINS_DISABLE_AUTOLOAD", None)
    if fake_root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake_root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, host, *delete], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- torchdiffeq 0.1.1: SOLVERS and _check_inputs exist, but f reaches the solver without the ---------
# _PerturbFunc wrapper that the rampde solver unwraps (0.2.0+), and _check_inputs takes no event_fn.
# On the real 0.1.1 the adapter installs and a decreasing t is then solved wrongly (compat/README.md).
FAKE_TORCHDIFFEQ_0_1_1 = {
    **_dist_info("torchdiffeq", "0.1.1"),
    "torchdiffeq/__init__.py": """
        from ._impl import odeint, odeint_adjoint
        __version__ = "0.1.1"
    """,
    "torchdiffeq/_impl/__init__.py": """
        from .odeint import odeint
        from .adjoint import odeint_adjoint
    """,
    "torchdiffeq/_impl/misc.py": """
        # 0.1.1's input normalisation: no event_fn parameter, and f is wrapped only for tuple
        # states and decreasing time (both wrappers expose base_func); there is no _PerturbFunc.
        class _TupleFunc:
            def __init__(self, base_func, shapes):
                self.base_func, self.shapes = base_func, shapes

        class _ReverseFunc:
            def __init__(self, base_func):
                self.base_func = base_func

        def _check_inputs(func, y0, t, rtol, atol, method, options, SOLVERS):
            raise NotImplementedError("fake torchdiffeq 0.1.1: layout only")
    """,
    "torchdiffeq/_impl/solvers.py": """
        class FixedGridODESolver:
            def __init__(self, func, y0, step_size=None, grid_constructor=None, **unused):
                self.func, self.y0 = func, y0

            def integrate(self, t):
                raise NotImplementedError("fake torchdiffeq 0.1.1: layout only")
    """,
    "torchdiffeq/_impl/fixed_grid.py": """
        from .solvers import FixedGridODESolver

        class Euler(FixedGridODESolver):
            order = 1

        class Midpoint(FixedGridODESolver):
            order = 2

        class RK4(FixedGridODESolver):
            order = 4
    """,
    "torchdiffeq/_impl/odeint.py": """
        from .fixed_grid import Euler, Midpoint, RK4
        from .misc import _check_inputs

        SOLVERS = {"euler": Euler, "midpoint": Midpoint, "rk4": RK4}

        def odeint(func, y0, t, rtol=1e-7, atol=1e-9, method=None, options=None):
            _check_inputs(func, y0, t, rtol, atol, method, options, SOLVERS)
    """,
    "torchdiffeq/_impl/adjoint.py": """
        from .misc import _check_inputs
        from .odeint import SOLVERS

        def odeint_adjoint(func, y0, t, rtol=1e-7, atol=1e-9, method=None, options=None,
                           adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None):
            _check_inputs(func, y0, t, rtol, atol, method, options, SOLVERS)
    """,
}

# The 0.0.1 releases of both hosts on PyPI are placeholders: a package with __version__ only.
FAKE_TORCHDIFFEQ_0_0_1 = {**_dist_info("torchdiffeq", "0.0.1"), "torchdiffeq/__init__.py": '__version__ = "0.0.1"\n'}
FAKE_TORCHODE_0_0_1 = {**_dist_info("torchode", "0.0.1"), "torchode/__init__.py": '"""placeholder"""\n__version__ = "0.0.1"\n'}


@pytest.fixture(scope="module")
def torchdiffeq_0_1_1(tmp_path_factory):
    root = _write(tmp_path_factory.mktemp("torchdiffeq-0.1.1"), FAKE_TORCHDIFFEQ_0_1_1)
    return root, _probe("torchdiffeq", root)


@pytest.fixture(scope="module")
def torchdiffeq_0_0_1(tmp_path_factory):
    root = _write(tmp_path_factory.mktemp("torchdiffeq-0.0.1"), FAKE_TORCHDIFFEQ_0_0_1)
    return root, _probe("torchdiffeq", root)


@pytest.fixture(scope="module")
def torchode_0_0_1(tmp_path_factory):
    root = _write(tmp_path_factory.mktemp("torchode-0.0.1"), FAKE_TORCHODE_0_0_1)
    return root, _probe("torchode", root)


@pytest.fixture(scope="module")
def torchode_without_status_constants():
    # torchode < 0.1.6: torchode.status_codes has the Status enum only, not the int constants that
    # RampdeAdjoint uses.  Mimicked by deleting them from the installed torchode before the import.
    names = ("SUCCESS", "GENERAL_ERROR", "REACHED_DT_MIN", "REACHED_MAX_STEPS", "INFINITE_NORM")
    return _probe("torchode", None, delete=[f"torchode.status_codes:{n}" for n in names])


def _assert_refused(out: dict, host: str, *needles: str) -> None:
    assert "import_error" not in out, f"import rampde_plugins failed instead of warning: {out['import_error']}"
    assert out["raised"] == "UnsupportedHostError", f"install({host!r}) did not refuse the host: {out}"
    for needle in needles:
        assert needle in out["message"], (needle, out["message"])
    assert any(host in w and all(n in w for n in needles) for w in out["warnings"]), out["warnings"]


@pytest.mark.parametrize("scenario", ["torchdiffeq_0_1_1", "torchdiffeq_0_0_1", "torchode_0_0_1"])
def test_the_fake_release_is_what_gets_imported(scenario, request):
    root, out = request.getfixturevalue(scenario)
    assert out["version"] == scenario.split("_", 1)[1].replace("_", ".")
    assert Path(out["file"]).is_relative_to(root)


def test_torchdiffeq_0_1_1_is_refused_naming_perturbfunc_and_the_range(torchdiffeq_0_1_1):
    _, out = torchdiffeq_0_1_1
    _assert_refused(out, "torchdiffeq", "0.1.1", "_PerturbFunc", TD_RANGE)


def test_torchdiffeq_placeholder_is_refused_naming_the_module_and_the_range(torchdiffeq_0_0_1):
    _, out = torchdiffeq_0_0_1
    _assert_refused(out, "torchdiffeq", "torchdiffeq._impl.odeint", TD_RANGE)


def test_torchode_placeholder_is_refused_naming_the_module_and_the_range(torchode_0_0_1):
    _, out = torchode_0_0_1
    _assert_refused(out, "torchode", "torchode.interface", TO_RANGE)


def test_torchode_without_status_constants_is_refused(torchode_without_status_constants):
    _assert_refused(torchode_without_status_constants, "torchode", "status_codes", TO_RANGE)


def test_matrix_data_is_consistent():
    """compat/matrix.toml: the diagonal lies in the product; unsupported entries lie outside the declared ranges."""
    import importlib.util

    from packaging.specifiers import SpecifierSet
    from rampde_torchdiffeq import TorchdiffeqAdapter
    from rampde_torchode import TorchodeAdapter

    spec = importlib.util.spec_from_file_location("rampde_compat_matrix", ROOT / "compat" / "_matrix.py")
    _matrix = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(_matrix)
    data = _matrix.load(ROOT / "compat" / "matrix.toml")
    ranges = {"torchdiffeq": SpecifierSet(TorchdiffeqAdapter.supported), "torchode": SpecifierSet(TorchodeAdapter.supported)}
    hosts = data["hosts"]
    for d in data["tags"]["diagonal"]:
        assert d["torchdiffeq"] in hosts["torchdiffeq"] and d["torchode"] in hosts["torchode"]
    assert {hosts["torchdiffeq"][0], hosts["torchdiffeq"][-1]} == {d["torchdiffeq"] for d in data["tags"]["diagonal"]}
    for entry in data["unsupported"]:
        assert entry["version"] not in ranges[entry["host"]], entry
    cells = _matrix.cells(data)
    product = [c for c in cells if c.unsupported is None]
    assert len(product) == len(hosts["torch"]) * len(hosts["torchdiffeq"]) * len(hosts["torchode"])
    assert len({c.id for c in cells}) == len(cells)
