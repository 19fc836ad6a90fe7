"""Run torchdiffeq's own test suite with rampde methods in place of torchdiffeq's.

    python compat/upstream.py PATH [TEST ...]

PATH is a torchdiffeq checkout: a work tree, or the git directory that ``fetch github:rtqichen/torchdiffeq``
leaves (its ``tests/`` are read from HEAD).  TEST selects ``module`` or ``module.Class[.method]`` (default:
the tests that exercise ``odeint_adjoint``, see DEFAULT).  Nothing of torchdiffeq's is copied into this
repository: its test files are exported to a temporary directory and imported there.

The swap: the method tuples of ``problems.py`` keep only the methods rampde also has, under
torchdiffeq's names, and ``torchdiffeq.odeint`` / ``odeint_adjoint`` map every method argument
(``method``, ``adjoint_method``, the default ``dopri5``) to ``rampde_<name>`` -- so every solve in the
tests, reference solves included, runs on the rampde engine.  The names stay torchdiffeq's because the
tests choose tolerances and skips by them (``event_tests``: 5e-3 for ``euler``; ``odeint_tests``: no
``perturb`` check of fp32 ``implicit_euler``); a method called ``euler`` in a failure line ran as
``rampde_euler``.  Prints one line per failing (sub)test and a JSON summary last.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

DEFAULT = [
    "gradient_tests.TestGradient.test_adjoint",
    "gradient_tests.TestGradient.test_adjoint_against_odeint",
    "gradient_tests.TestCompareAdjointGradient",
    "odeint_tests.TestDiscontinuities",
    "odeint_tests.TestGridConstructor",
    "odeint_tests.TestCallbacks",
    "norm_tests.TestNorms.test_adjoint_norm",
    "event_tests",
]


def export_tests(src: Path, dest: Path) -> None:
    if (src / "tests").is_dir():
        for p in (src / "tests").glob("*.py"):
            (dest / p.name).write_text(p.read_text())
        return
    names = subprocess.run(["git", "--git-dir", str(src), "ls-tree", "--name-only", "HEAD", "tests/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "--git-dir", str(src), "show", f"HEAD:{name}"], capture_output=True,
                                  text=True, check=True).stdout
            (dest / Path(name).name).write_text(text)


def swap(registry_names, rename: bool = False) -> None:
    """Route the tests' solves to rampde (see the module docstring); ``rename=True`` puts the
    ``rampde_<name>`` names into ``problems.py``'s tuples instead (the tests' name checks then miss)."""
    import problems
    import torchdiffeq

    def ours(name):
        return "rampde_" + name if name in registry_names else None

    for attr in ("FIXED_EXPLICIT_METHODS", "FIXED_IMPLICIT_METHODS", "FIXED_METHODS", "ADAMS_METHODS",
                 "ADAPTIVE_METHODS", "SCIPY_METHODS", "IMPLICIT_METHODS", "METHODS"):
        if hasattr(problems, attr):
            kept = [m for m in getattr(problems, attr) if ours(m)]
            setattr(problems, attr, tuple(ours(m) for m in kept) if rename else tuple(kept))

    def mapped(name):
        if name is None:
            name = "dopri5"
        if isinstance(name, str) and not name.startswith("rampde_") and ours(name):
            return ours(name)
        return name

    for entry in ("odeint", "odeint_adjoint"):
        original = getattr(torchdiffeq, entry)

        @functools.wraps(original)
        def call(*args, _original=original, **kwargs):
            kwargs["method"] = mapped(kwargs.get("method"))
            if "adjoint_method" in kwargs:
                kwargs["adjoint_method"] = mapped(kwargs["adjoint_method"])
            return _original(*args, **kwargs)

        setattr(torchdiffeq, entry, call)


def main(argv) -> int:
    src = Path(argv[0])
    selected = argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        export_tests(src, Path(tmp))
        sys.path.insert(0, tmp)
        import rampde_plugins

        swap(set(rampde_plugins.get_registry().tableaus))
        suite = unittest.defaultTestLoader.loadTestsFromNames(selected)
        result = unittest.TestResult()
        result.failfast = False
        suite.run(result)
    bad = [(str(t), tb.strip().splitlines()[-1]) for t, tb in result.failures + result.errors]
    for name, last in bad:
        print(f"FAIL {name}: {last}")
    print(json.dumps({"run": result.testsRun, "failed": len(bad), "skipped": len(result.skipped), "selected": selected}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
