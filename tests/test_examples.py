"""torchdiffeq's own examples with rampde methods swapped in (``compat/examples.py``): code nobody
here wrote, run as its users run it.  Needs a torchdiffeq checkout (``fetch github:rtqichen/torchdiffeq``;
``RAMPDE_TORCHDIFFEQ_MIRROR``); skipped without one.

Reference: the same example with torchdiffeq's own solvers, same seeds, in a fresh process.  In fp64
the two runs' logged losses agree to the print precision (the gradients agree to ~1e-11); in fp32
roundoff differences grow along the training (RMSprop normalises tiny gradient components), which
is why the fp64 run is the one with a tight bound.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("RAMPDE_TORCHDIFFEQ_MIRROR", "/work/.mirror/rtqichen+torchdiffeq/repo"))


def _examples(tmp_path, *args):
    if not MIRROR.exists():
        pytest.skip(f"no torchdiffeq checkout at {MIRROR} (set RAMPDE_TORCHDIFFEQ_MIRROR)")
    out = tmp_path / "examples.md"
    run = subprocess.run([sys.executable, str(ROOT / "compat" / "examples.py"), str(MIRROR), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert out.exists(), run.stderr[-2000:]
    return run.returncode, json.loads(out.with_suffix(".json").read_text())["results"]


def test_ode_demo_in_fp64_logs_torchdiffeqs_losses(tmp_path):
    rc, results = _examples(tmp_path, "--only", "ode_demo,learn_physics", "--dtype", "float64")
    assert rc == 0
    for name, r in results.items():
        assert r["status"] == "ok" and len(r["rampde"]["values"]) >= 3, (name, r)
        assert r["max_rel_diff"] <= 1e-6, (name, r["max_rel_diff"])  # learn_physics prints full floats


@pytest.mark.slow
@pytest.mark.parametrize("args", [(), ("--precision", "bf16"), ("--checkpoint", "3", "--stages")],
                         ids=["default", "bf16", "binomial-stages"])
def test_every_example_runs_with_rampde(tmp_path, args):
    rc, results = _examples(tmp_path, *args)
    bad = {name: r["status"] for name, r in results.items() if r["status"] != "ok"}
    assert rc == 0 and not bad, bad
