"""FFJORD's ``train_toy.py`` runs unchanged with a rampde method (``compat/ffjord.py``), both adjoints.

Needs an FFJORD checkout (``RAMPDE_FFJORD_CHECKOUT``, default where ``fetch github:rtqichen/ffjord``
leaves it) and scikit-learn and matplotlib, which FFJORD imports; skipped without them.  Two
iterations each: the full comparison (100 iterations, every variant) is ``python compat/ffjord.py``
and its table ``compat/ffjord.md``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = Path(os.environ.get("RAMPDE_FFJORD_CHECKOUT", "/work/.mirror/rtqichen+ffjord/repo"))


@pytest.mark.parametrize("variant", ["odeint_adjoint", "odeint"])
def test_train_toy_runs_with_rampde_dopri5(variant, tmp_path):
    if not CHECKOUT.exists():
        pytest.skip(f"no FFJORD checkout at {CHECKOUT} (set RAMPDE_FFJORD_CHECKOUT)")
    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"FFJORD imports {', '.join(missing)}")
    out = tmp_path / "ffjord.md"
    run = subprocess.run([sys.executable, str(ROOT / "compat" / "ffjord.py"), str(CHECKOUT), "--niters", "2",
                          "--variants", variant, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["status"] == "ok" and row["rel_diff"] < 1e-4, row


def test_the_committed_table_is_the_readmes_and_within_its_bounds():
    """The README shows ``compat/ffjord.md`` as generated; every variant ran, the adjoint's loss is
    within 1e-4 of the original's, and bf16 within 2e-4 of the fp32 loss (the README's bound)."""
    table = (ROOT / "compat" / "ffjord.md").read_text().strip()
    assert table in (ROOT / "README.md").read_text()
    rows = {r["variant"]: r for r in json.loads((ROOT / "compat" / "ffjord.json").read_text())}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["odeint_adjoint"]["rel_diff"] < 1e-4
    assert rows["odeint bf16"]["rel_diff"] < 2e-4 and rows["odeint_adjoint bf16"]["rel_diff"] < 2e-4
    # rampde's odeint stays within 1e-5 of both adjoints (torchdiffeq's own odeint is the outlier)
    mine = rows["odeint"]["loss_rampde"]
    for other in (rows["odeint_adjoint"]["loss_torchdiffeq"], rows["odeint_adjoint"]["loss_rampde"]):
        assert abs(mine - other) / abs(other) < 1e-5
    # every schedule gives the same loss as the default: the gradient does not depend on the schedule
    assert len({rows[v]["loss_rampde"] for v in ("odeint", "odeint graphs", "odeint binomial(4)", "odeint budget 64MB")}) == 1
