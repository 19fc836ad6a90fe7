"""``benchmarks/rss_floor.py`` (what the CPU peak RSS of one rampde iteration is made of) runs end to
end at smoke sizes, and its account is computed from the rows it measured.

Only the plumbing and the account's logic are checked: no memory number is asserted beyond being
positive (the smoke sizes are tiny; the real numbers come from the full run).
"""

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rss_floor  # noqa: E402

SMOKE_ROWS = ["td_fp32", "bf16", "bf16_loop", "vjp_bf16"]


def _table(text: str) -> dict:
    """The Markdown table's rows: title -> cells after the title."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| row |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_row_selection():
    # one torchdiffeq solve, one rampde solve, one loop and one field-VJP row
    assert rss_floor.select_rows(True, None) == SMOKE_ROWS
    kinds = [(rss_floor.ROWS[k].kind, rss_floor.ROWS[k].method) for k in SMOKE_ROWS]
    assert kinds == [("solve", "rk4"), ("solve", "rampde_rk4"), ("loop", "rampde_rk4"), ("vjp", "")]
    full = rss_floor.select_rows(False, None)
    assert full == list(rss_floor.ROWS) and "bf16_c20_cold_nodynamo" in full and "step_bf16" in full
    # --only: the torchdiffeq base comes first; an unknown key is an error, not a silent skip
    assert rss_floor.select_rows(False, "bf16_c20,step_bf16") == ["td_fp32", "bf16_c20", "step_bf16"]
    with pytest.raises(SystemExit):
        rss_floor.select_rows(False, "bf16,no_such_row")


def _row(peak_mb, where="backward", **kw):
    return {"peak": peak_mb * 1e6, "where": where, "phases": kw.pop("phases", {where: peak_mb * 1e6}), **kw}


def test_account_is_computed_from_the_rows():
    R = {
        "td_fp32": _row(1000.0),
        "bf16": _row(30.0, stored_bytes=20e6, checkpoints=400,
                     phases={"overflow check": 22e6, "backward": 30e6}, entry={"overflow check": 21e6}),
        "bf16_c20": _row(5.0, stored_bytes=1e6, checkpoints=20),
        "step_bf16": _row(2.0),
        "bf16_loop": _row(75.0, "iteration 3", stored_bytes=20e6, retained_each=[20e6, 40e6, 60e6], after_gc=1e6),
        "td_fp32_loop": _row(1000.0, "iteration 1"),
        "bf16_c20_cold": _row(60.0), "bf16_c20_cold_nodynamo": _row(25.0, modules=27),
        "bf16_c20_cold_optim": _row(24.0), "import_dynamo": _row(39.0, "import", modules=333),
        "vjp_bf16": _row(1.0), "vjp_bf16_cold": _row(14.0), "td_fp32_cold": _row(1008.0),
    }
    args = types.SimpleNamespace(batch=256, loop=3, steps=400)
    text = "\n".join(rss_floor.account(R, args))
    assert "default schedule 0.0300x (target 0.02x: not met)" in text
    assert "checkpoint=20 0.0050x (target 0.01x: met)" in text
    # default = states + one step + the rest: 30 = 20 + 2 + 8
    assert "(a) stored states 20.0 MB" in text and "one RK4 step's bf16 forward + VJP 2.0 MB" in text
    assert "(c) the rest 8.0 MB" in text
    # checkpoint=20: 5 = 1 + 2 + 2
    assert "(c) the rest 2.0 MB" in text
    assert "0.0750x torchdiffeq fp32's loop (1000.0 MB)" in text and "outlive the iteration" in text
    # first iteration: 60 - 5 = 55 more; dynamo 60 - 25 = 35; oneDNN 14 - 1 = 13; rampde's own 7
    assert "costs 55.0 MB more than a warm one" in text
    assert "35.0 MB: importing `torch._dynamo`" in text and "13.0 MB: kernel and oneDNN" in text
    assert "the remaining 7.0 MB" in text
    assert "proposed" not in text.lower()

    # the same rows with a smaller peak: the verdict follows the numbers
    R["bf16"] = _row(15.0, stored_bytes=12e6, checkpoints=400)
    R["bf16_loop"] = _row(16.0, "iteration 3", stored_bytes=12e6, retained_each=[1e6, 1e6, 1e6], after_gc=1e6)
    text = "\n".join(rss_floor.account(R, args))
    assert "default schedule 0.0150x (target 0.02x: met)" in text
    assert "no iteration's states outlive its backward" in text
    assert rss_floor.account({}, args) == ["(the torchdiffeq fp32 row is missing: no account)"]


def test_smoke_run(tmp_path):
    out = tmp_path / "x.md"
    text = rss_floor.main(["--smoke", "--out", str(out)])
    assert out.read_text() == text

    rows = _table(text)
    titles = [rss_floor.ROWS[k].title.format(loop=2) for k in SMOKE_ROWS]
    assert list(rows) == titles
    for title, cells in rows.items():
        peak, live, ratio, retained, where, seconds = cells
        assert float(peak) > 0, (title, cells)
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, (title, cells)
        assert live == "-" or float(live) > 0, (title, cells)
        assert where and float(seconds) >= 0, (title, cells)
    assert rows[titles[0]][2] == "1.0000x"

    account = text.split("## Account", 1)[1]
    assert re.search(r"default schedule \d+\.\d{4}x \(target 0\.02x: (met|not met)\)", account)
    assert "target 0.01x" in account
    assert "Training loop (2 iterations" in account
    assert "proposed" not in text.lower()
