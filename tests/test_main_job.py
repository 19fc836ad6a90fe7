"""The main job runs end to end on a tiny size (so it cannot rot) and writes its plot and summary."""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_tiny(tmp_path, monkeypatch):
    out = tmp_path / "train"
    monkeypatch.setattr(sys, "argv", ["train.py", "--iters", "6", "--hidden", "8", "--batch", "4",
                                      "--steps", "4", "--seg", "5", "--out", str(out), "--no-progress"])
    runpy.run_path(str(ROOT / "benchmarks" / "train.py"), run_name="__main__")
    assert (out / "spiral_fit.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["machine"]["device"] == "cpu"
    ours, host = summary["results"].values()
    assert ours["autograd_memory_bytes"] < host["autograd_memory_bytes"]
    for r in (ours, host):
        assert r["final_loss"] > 0 and r["time_per_iter_ms"] > 0
        assert 0 <= r["grad_rel_error_vs_fp64_init"] < 0.1
