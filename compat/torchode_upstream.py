"""Run torchode's own adjoint tests with rampde's adjoints in place of torchode's.

    python compat/torchode_upstream.py PATH [--checkpoint SCHEDULE] [--stages] [PYTEST ARGS ...]

PATH is a torchode checkout: a work tree, or the git directory that ``fetch github:martenlienen/torchode``
leaves (its ``tests/`` are read from HEAD).  Nothing of torchode's is copied into this repository: its
test files are exported to a temporary directory, with a ``conftest.py`` written there that swaps, before
the tests import them:

* ``torchode.BacksolveAdjoint`` and ``torchode.JointBacksolveAdjoint`` (continuous adjoints, signature
  ``(term, step_method, controller)``) -> ``rampde_torchode.QuadratureAdjoint``;
* ``torchode.AutoDiffAdjoint`` (backprop through the solver) -> ``rampde_torchode.RampdeAdjoint`` (the
  discrete adjoint) -- for torchode's own methods and controllers; the tests' stub step methods and
  stub controllers (which probe torchode's internal loop) stay on torchode's own class.

``--checkpoint`` runs the discrete adjoint with that checkpoint schedule (``graphs``, ``steps``, an integer
for binomial checkpointing) instead of the default; ``--stages`` makes that schedule (default ``steps``)
reverse each step stage by stage (``stages=True``).

Default selection: ``adjoint_test.py`` (gradcheck of every adjoint with and without ``t_eval``,
per-sample spans, fixed steps with ``backward_dt0``).  Exit status: pytest's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

CONFTEST = '''
import torchode
import rampde_plugins  # installs the adapters
from rampde_torchode import QuadratureAdjoint, RampdeAdjoint
from torchode.single_step_methods import Euler
from torchode.single_step_methods.runge_kutta import ExplicitRungeKutta

_autodiff = torchode.AutoDiffAdjoint
_checkpoint = {checkpoint}


def _discrete(step_method, step_size_controller, **kwargs):
    ours = type(step_size_controller).__module__.startswith("torchode.")  # not the tests' stubs
    if ours and isinstance(step_method, (Euler, ExplicitRungeKutta)):
        kwargs.pop("backprop_through_step_size_control", None)  # the discrete adjoint differentiates what ran
        if _checkpoint is not None:
            kwargs.setdefault("checkpoint", _checkpoint)
        return RampdeAdjoint(step_method, step_size_controller, **kwargs)
    return _autodiff(step_method, step_size_controller, **kwargs)


torchode.AutoDiffAdjoint = _discrete
torchode.BacksolveAdjoint = QuadratureAdjoint
torchode.JointBacksolveAdjoint = QuadratureAdjoint
'''


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


def main(argv) -> int:
    src, rest = Path(argv[0]), list(argv[1:])
    checkpoint = None
    if "--checkpoint" in rest:
        i = rest.index("--checkpoint")
        if i + 1 >= len(rest):
            raise SystemExit("--checkpoint needs a schedule: graphs, steps or an integer")
        value = rest.pop(i + 1)
        rest.pop(i)
        checkpoint = int(value) if value.isdigit() else value
    expr = repr(checkpoint)
    if "--stages" in rest:
        rest.remove("--stages")
        if checkpoint == "graphs":
            raise SystemExit("--stages reverses rebuilt steps stage by stage: 'graphs' rebuilds none")
        expr = (f"rampde_plugins.BinomialSchedule({checkpoint}, stages=True)" if isinstance(checkpoint, int)
                else "rampde_plugins.StepsSchedule(stages=True)")
    args = rest or ["adjoint_test.py"]
    with tempfile.TemporaryDirectory() as tmp:
        export_tests(src, Path(tmp))
        (Path(tmp) / "conftest.py").write_text(CONFTEST.replace("{checkpoint}", expr))
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp,
                               *args], cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
