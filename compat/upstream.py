"""Run torchdiffeq's own test suite with rampde methods in place of torchdiffeq's.

    python compat/upstream.py PATH [--checkpoint SCHEDULE] [--stages] [TEST ...]

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

``--checkpoint`` puts ``options["checkpoint"]`` (``graphs``, ``steps``, an integer for binomial
checkpointing) into every rampde solve that does not choose one; ``--stages`` makes that schedule
(default ``steps``) reverse each step stage by stage (``stages=True``) for the explicit methods; the
implicit ones, which refuse ``stages=True`` by design (a ``ValueError`` at set-up), get the schedule
without it.
"""

from __future__ import annotations

import argparse
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


def export_tests(src: Path, dest: Path, folder: str = "tests") -> None:
    """The ``.py`` files of ``folder`` in a torchdiffeq checkout (work tree or git directory) into ``dest``."""
    if (src / folder).is_dir():
        for p in (src / folder).glob("*.py"):
            (dest / p.name).write_text(p.read_text())
        return
    names = subprocess.run(["git", "--git-dir", str(src), "ls-tree", "--name-only", "HEAD", f"{folder}/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "--git-dir", str(src), "show", f"HEAD:{name}"], capture_output=True,
                                  text=True, check=True).stdout
            (dest / Path(name).name).write_text(text)


def route(registry_names, options=None, entries=("odeint", "odeint_adjoint")) -> None:
    """Make ``torchdiffeq.<entry>`` run every method rampde has as ``rampde_<name>`` (no method:
    torchdiffeq's default ``dopri5``); ``options(entry, method)`` -> a dict of options merged under
    the call's own (the call's win), for the rampde methods only."""
    import torchdiffeq

    def mapped(name):
        if name is None:
            name = "dopri5"
        if isinstance(name, str) and not name.startswith("rampde_") and name in registry_names:
            return "rampde_" + name
        return name

    for entry in entries:
        original = getattr(torchdiffeq, entry)

        @functools.wraps(original)
        def call(*args, _original=original, _entry=entry, **kwargs):
            kwargs["method"] = mapped(kwargs.get("method"))
            if "adjoint_method" in kwargs:
                kwargs["adjoint_method"] = mapped(kwargs["adjoint_method"])
            method = str(kwargs["method"])
            extra = options(_entry, method[len("rampde_"):]) if options and method.startswith("rampde_") else None
            if extra:
                kwargs["options"] = {**extra, **(kwargs.get("options") or {})}
            return _original(*args, **kwargs)

        setattr(torchdiffeq, entry, call)


def swap(registry_names, rename: bool = False, checkpoint=None, implicit=(), implicit_checkpoint=None) -> None:
    """Route the tests' solves to rampde (see the module docstring); ``rename=True`` puts the
    ``rampde_<name>`` names into ``problems.py``'s tuples instead (the tests' name checks then miss);
    ``checkpoint`` (a schedule) goes into the options of every rampde solve that names none
    (``implicit_checkpoint`` for the methods named in ``implicit``)."""
    import problems

    def ours(name):
        return "rampde_" + name if name in registry_names else None

    for attr in ("FIXED_EXPLICIT_METHODS", "FIXED_IMPLICIT_METHODS", "FIXED_METHODS", "ADAMS_METHODS",
                 "ADAPTIVE_METHODS", "SCIPY_METHODS", "IMPLICIT_METHODS", "METHODS"):
        if hasattr(problems, attr):
            kept = [m for m in getattr(problems, attr) if ours(m)]
            setattr(problems, attr, tuple(ours(m) for m in kept) if rename else tuple(kept))

    def options(entry, method):
        chosen = implicit_checkpoint if method in implicit else checkpoint
        return None if chosen is None else {"checkpoint": chosen}

    route(registry_names, options if checkpoint is not None else None)


def schedule(checkpoint: str | None, stages: bool):
    """The ``--checkpoint``/``--stages`` pair as an ``options["checkpoint"]`` value (None: the default)."""
    import rampde_plugins

    if checkpoint is not None and not (checkpoint in ("graphs", "steps") or checkpoint.isdigit()):
        raise SystemExit(f"--checkpoint {checkpoint!r}: expected 'graphs', 'steps' or an integer c >= 1")
    value = int(checkpoint) if checkpoint is not None and checkpoint.isdigit() else checkpoint
    if not stages:
        return value
    if value == "graphs":
        raise SystemExit("--stages reverses rebuilt steps stage by stage: 'graphs' rebuilds none")
    if isinstance(value, int):
        return rampde_plugins.BinomialSchedule(value, stages=True)
    return rampde_plugins.StepsSchedule(stages=True)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a torchdiffeq checkout (work tree or git directory)")
    parser.add_argument("tests", nargs="*", help="module or module.Class[.method] (default: DEFAULT)")
    parser.add_argument("--checkpoint", default=None, help="graphs, steps or an integer c (binomial)")
    parser.add_argument("--stages", action="store_true", help="reverse each rebuilt step stage by stage")
    args = parser.parse_args(argv)
    src, selected = args.path, args.tests or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        export_tests(src, Path(tmp))
        sys.path.insert(0, tmp)
        import rampde_plugins

        tableaus = rampde_plugins.get_registry().tableaus
        swap(set(tableaus), checkpoint=schedule(args.checkpoint, args.stages),
             implicit={name for name, tab in tableaus.items() if tab.implicit},
             implicit_checkpoint=schedule(args.checkpoint, False))
        suite = unittest.defaultTestLoader.loadTestsFromNames(selected)
        result = unittest.TestResult()
        result.failfast = False
        suite.run(result)
    bad = [(str(t), tb.strip().splitlines()[-1]) for t, tb in result.failures + result.errors]
    for name, last in bad:
        print(f"FAIL {name}: {last}")
    print(json.dumps({"run": result.testsRun, "failed": len(bad), "skipped": len(result.skipped), "selected": selected,
                      "checkpoint": args.checkpoint, "stages": args.stages}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
