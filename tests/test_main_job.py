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


def test_the_main_job_chooses_its_threads_from_the_free_cores(monkeypatch):
    """Threads = cores minus the load other processes put on them, at least 1 (oversubscribed OpenMP
    threads slow any torch program tenfold); the main job puts torch's setting back when it ends."""
    import os

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import choose_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, expected in ((0.0, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert choose_threads("auto")[0] == expected
    assert choose_threads(3)[0] == 3
    import pytest

    with pytest.raises(ValueError, match="--threads 0"):
        choose_threads(0)
