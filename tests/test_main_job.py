"""The main job runs end to end on a tiny size (so it cannot rot) and writes its plot and summary."""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_tiny(tmp_path, monkeypatch):
    out = tmp_path / "train"
    monkeypatch.setattr(sys, "argv", ["train.py", "--iters", "6", "--hidden", "8", "--batch", "4", "--rounds", "1",
                                      "--steps", "4", "--seg", "5", "--out", str(out), "--no-progress"])
    runpy.run_path(str(ROOT / "benchmarks" / "train.py"), run_name="__main__")
    assert (out / "spiral_fit.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["machine"]["device"] == "cpu"
    assert summary["machine"]["threads"] >= 1 and "load average" in summary["machine"]["threads_why"]
    ours, host = summary["results"].values()
    for r in (ours, host):
        assert r["final_loss"] > 0 and r["time_per_iter_ms"] > 0
        assert 0 <= r["grad_rel_error_vs_fp64_init"] < 0.1
    # Where rampde wins: every configuration timed and measured both ways (RSS in a child process
    # returning freed memory, live tensors), as ratios to torchdiffeq fp32, with a verdict.
    side = summary["where_rampde_wins"]
    assert list(side)[0] == "torchdiffeq rk4 fp32" and side["torchdiffeq rk4 fp32"]["verdict"] == "baseline"
    assert {"rampde_rk4 bf16 (default)", "rampde_rk4 bf16 graphs"} <= set(side)
    for label, r in side.items():
        assert r["ms_per_iter_median"] > 0 and r["rss_peak_bytes"] >= 0 and r["live_tensor_peak_bytes"] > 0
        assert set(r["ratios_to_torchdiffeq_fp32"]) == {"time", "rss", "live"}
    # one state per step instead of every activation: fewer live bytes even at this toy size
    assert side["rampde_rk4 bf16 (default)"]["live_tensor_peak_bytes"] < side["torchdiffeq rk4 fp32"]["live_tensor_peak_bytes"]


def test_verdicts_say_what_wins():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train import verdict

    assert verdict(0.8, [0.2, 0.3]) == "wins time and memory"
    assert verdict(1.2, [0.2, 0.3]).startswith("wins memory, not time")
    assert verdict(0.8, [0.2, 1.3]) == "wins time, not memory"
    assert verdict(1.1, [1.2]) == "wins neither"


def test_bad_sizes_are_refused_by_name(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train import parse_args
    import pytest

    with pytest.raises(SystemExit):
        parse_args(["--iters", "0"])
    assert "--iters 0" in capsys.readouterr().err


def test_contention_benchmark_starts_and_stops_its_load(tmp_path):
    """The competing processes run while the loaded rounds are timed and are gone afterwards."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import contention

    with contention.CompetingLoad(2, 1, 32) as load:
        procs = list(load.procs)
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)
    result = contention.main(["--smoke", "--out", str(tmp_path)])
    rows = result["rows"]
    assert {r["config"] for r in rows} == set(contention.CONFIGS)
    for r in rows:
        assert r["quiet_ms"] > 0 and r["loaded_ms"] > 0 and r["slowdown"] > 0
    assert result["main_job_under_load"] is None  # (--smoke runs no main job)


def test_the_main_job_chooses_its_threads_from_the_free_cores(monkeypatch):
    """Threads = cores minus the load other processes put on them, at least 1 (oversubscribed OpenMP
    threads slow any torch program tenfold); the main job puts torch's setting back when it ends."""
    import os

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import choose_threads

    import _common

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(_common, "runnable_others", lambda: 0.0)
    for load, expected in ((0.0, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert choose_threads("auto")[0] == expected
    # A load that has just started (the 1-minute average has not seen it yet) counts as well.
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(_common, "runnable_others", lambda: 4.0)
    assert choose_threads("auto")[0] == 1
    assert choose_threads(3)[0] == 3
    import pytest

    with pytest.raises(ValueError, match="--threads 0"):
        choose_threads(0)


def test_runnable_others_reads_the_kernels_running_count():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import runnable_others

    n = runnable_others(samples=3, interval=0.0)
    assert isinstance(n, float) and 0.0 <= n < 10_000
