"""The benchmark suite runs end to end at tiny sizes (so it cannot rot) and writes all its outputs.

Only the plumbing is checked: every problem and every configuration is present, each either measured
(finite, positive time and memory) or skipped with a reason.  No timing is asserted.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import CONFIGS  # noqa: E402
from _problems import PROBLEMS, SCALING_STEPS_SMOKE  # noqa: E402


def _check(where, r):
    assert r["status"] in ("ok", "skipped"), f"{where}: {r}"
    if r["status"] == "skipped":
        assert r["reason"], where
        return
    t, m = r["time_ms"]["median"], r["memory"]["peak_growth_bytes"]
    assert math.isfinite(t) and t > 0, f"{where}: time {t}"
    # RSS moves in whole pages and a tiny field's discrete adjoint (problem (b): a few KiB) can fit
    # into pages already resident: 0 is a valid reading.  Activation-storing runs must show growth.
    assert math.isfinite(m) and m >= 0, f"{where}: memory {m}"
    if where.endswith("torchdiffeq fp32"):
        assert m > 0, f"{where}: memory {m}"
    assert r["fwd_nfe"] > 0, where


def test_bench_smoke(tmp_path):
    # Warnings are errors here too (as in pytest's own config), in the suite and in its workers.
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]

    results = json.loads((tmp_path / "results-cpu.json").read_text())
    names = [c.name for c in CONFIGS]
    assert set(results["problems"]) == set(PROBLEMS)
    for key, problem in results["problems"].items():
        assert problem["reference"]["status"] == "ok"
        assert list(problem["configs"]) == names
        for name, r in problem["configs"].items():
            _check(f"({key}) {name}", r)
            if r["status"] == "ok":
                assert math.isfinite(r["grad_rel_err"]) and r["grad_rel_err"] >= 0, f"({key}) {name}"
    scaling = results["scaling"]["configs"]
    assert list(scaling) == names
    for name, rows in scaling.items():
        assert set(rows) == {str(n) for n in SCALING_STEPS_SMOKE}
        for n, r in rows.items():
            _check(f"(e) N={n} {name}", r)
    assert {t["problem"] for t in results["targets"]} == {"a", "b"}
    for t in results["targets"]:
        # not measured only where a configuration it needs was skipped (with its reason: bf16 on a
        # CPU that emulates it)
        assert t["met"] in (True, False) or any(
            r["status"] == "skipped" for r in results["problems"][t["problem"]]["configs"].values()), t
    for field in ("torch", "torchdiffeq", "torchode"):
        assert results["machine"][field]

    md = (tmp_path / "results-cpu.md").read_text()
    assert "## (a)" in md and "## (e)" in md and "Targets" in md
    assert md.strip() in proc.stdout
    assert (tmp_path / "scaling-cpu.png").stat().st_size > 10_000


def test_schedules_study_smoke(tmp_path):
    """The schedules study (issue 11's memory/time trade-off) runs end to end at tiny sizes."""
    from bench import BUDGET_CONFIGS, INTERLEAVED_CONFIGS, SCHEDULE_CONFIGS, SCHEDULE_PROBLEMS, SEGMENT_CONFIGS

    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--study", "schedules", "--smoke",
                           "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "schedules-cpu.json").read_text())
    assert set(results["schedules"]) == set(SCHEDULE_PROBLEMS)
    for key, problem in results["schedules"].items():
        expected = [c.name for c in SCHEDULE_CONFIGS] + ([c.name for c in SEGMENT_CONFIGS] if key == "b" else []) + (
            [c.name for c in BUDGET_CONFIGS] if key == "a" else [])
        assert list(problem["configs"]) == expected
        for name, r in problem["configs"].items():
            _check(f"({key}) {name}", r)
            if r["status"] == "ok" and name.startswith("rampde"):
                rec = r["rampde_stats"][0]
                assert rec["backward_done"]
                if "budget" in name:
                    assert rec["peak_bytes"] <= rec["memory_budget"]
        # The interleaved timing phase: one process per problem, one round in --smoke.
        iv = problem["interleaved"]
        assert iv["status"] == "ok" and iv["rounds"] == 1 and iv["threads"] >= 1, (key, iv)
        assert list(iv["configs"]) == INTERLEAVED_CONFIGS + ([c.name for c in SEGMENT_CONFIGS] if key == "b" else [])
        for name, r in iv["configs"].items():
            assert r["status"] in ("ok", "skipped"), (key, name, r)
            if r["status"] == "ok":
                assert len(r["times"]) == 1 and math.isfinite(r["median_ms"]) and r["median_ms"] > 0, (key, name)
                assert r["vs"]["torchdiffeq fp32"] > 0, (key, name)
    # Time targets come from the interleaved medians (the fresh-process ratio kept beside them).
    time_targets = [t for t in results["targets"] if "time <=" in t["target"]]
    assert time_targets and all(t.get("source", "").startswith("interleaved") for t in time_targets
                                if t["met"] is not None), time_targets
    md = (tmp_path / "schedules-cpu.md").read_text()
    assert "## (a)" in md and "## (a400)" in md and "Targets" in md
    for key in SCHEDULE_PROBLEMS:
        assert f"### ({key}) interleaved in one process (median of 1 round)" in md
    assert "fresh processes:" in md


def test_stiff_benchmark_smoke(tmp_path):
    """benchmarks/stiff.py (issue 12's stiff problems) runs end to end on its smallest problem."""
    pytest = __import__("pytest")
    pytest.importorskip("scipy")
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stiff.py"), "--problems", "robertson40",
                           "--dopri5-max-steps", "50", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "stiff-cpu.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"rampde_kvaerno5", "rampde_kvaerno3", "rampde_trbdf2", "scipy Radau", "scipy BDF", "rampde_dopri5"}
    for name in ("rampde_kvaerno5", "rampde_kvaerno3", "rampde_trbdf2"):
        assert by[name]["ok"] and by[name]["err_in_tol_units"] < 100 and by[name]["steps"] < 1000
    assert not by["rampde_dopri5"]["ok"] and "stopped" in by["rampde_dopri5"]["note"]  # 50 steps are not enough
    assert "| robertson40 | scipy Radau |" in (tmp_path / "stiff-cpu.md").read_text()


def test_quadrature_benchmark_smoke(tmp_path):
    """benchmarks/quadrature.py (issue 13's width sweep and memory table) runs end to end at tiny sizes."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quadrature.py"), "--widths", "4,8", "--repeats",
                           "1", "--steps", "10,20", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "quadrature-cpu.json").read_text())
    assert [r["width"] for r in results["sweep"]] == [4, 8]
    for row in results["sweep"]:
        for kind in ("direct", "td_adjoint", "td_adjoint_seminorm", "rampde_discrete", "rampde_quadrature"):
            assert row[kind]["seconds"] > 0 and 0 <= row[kind]["grad_error"] < 1e-2, (row["width"], kind)
        q = row["rampde_quadrature"]
        assert q["quadrature_nodes"] >= 8 and 1 <= q["quadrature_calls"] <= q["quadrature_nodes"]
    assert [r["steps"] for r in results["memory"]] == [10, 20]
    md = (tmp_path / "quadrature-cpu.md").read_text()
    assert "| 8 | " in md and "| 20 | " in md
    assert (tmp_path / "quadrature-cpu.png").stat().st_size > 10_000


def test_sde_training_demo_smoke(tmp_path):
    """benchmarks/sde_train.py (issue 14's training demo) runs every route end to end at tiny sizes."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sde_train.py"), "--iters", "2", "--batch", "8",
                           "--data-paths", "40", "--eval-paths", "40", "--n-terms", "8", "--dt", "0.1", "--threads", "1",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "sde_train-cpu.json").read_text())
    assert list(results["routes"]) == ["rampde fp32", "rampde bf16", "rampde quadrature", "torchsde sdeint",
                                       "torchsde sdeint_adjoint"]
    for name, r in results["routes"].items():
        assert r["ms_per_iter"] > 0 and math.isfinite(r["final_loss"]), name
        assert len(r["mean"]) == len(r["std"]) == 101, name
    assert "| rampde bf16 |" in (tmp_path / "sde_train-cpu.md").read_text()
    assert (tmp_path / "sde_train-cpu.png").stat().st_size > 10_000


def test_wong_zakai_study_smoke(tmp_path):
    """benchmarks/wong_zakai.py (issue 14's convergence table) runs end to end at tiny sizes."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "wong_zakai.py"), "--paths", "2000", "--chunk",
                           "1000", "--ks", "5,10", "--dt", "0.1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "wong_zakai-cpu.json").read_text())
    for name in ("GBM", "OU"):
        rows = results["processes"][name]["rows"]
        assert [r["k"] for r in rows] == [5, 10] and all(r["n"] == 2000 and r["var_se"] > 0 for r in rows)
    assert "| torchsde midpoint, dt = 0.1 |" in (tmp_path / "wong_zakai-cpu.md").read_text()


def test_live_tensor_meter_counts_storages_while_they_live():
    import torch
    from live_memory import LiveTensorMeter

    meter = LiveTensorMeter()
    with meter:
        a = torch.ones(2**18)  # 1 MiB
        view = a[:10]  # same storage: not counted again
        b = a * 2  # 1 MiB more
        del a, view, b
        c = torch.zeros(2**17)  # 0.5 MiB, after the first two were freed
    assert meter.peak == 2 * 2**20
    assert meter.current == 2**19
    del c
    assert meter.current == 0


def test_live_memory_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "live_memory.py"), "--smoke", "--steps", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in proc.stdout.splitlines()
             if line.startswith(("| rampde", "| torchdiffeq", "| floor"))}
    assert len(peaks) == 8 and all(v > 0 for v in peaks.values())
    # The floors are lower bounds: every configuration holds at least the solution, its cotangent and
    # one field VJP, and the c=sqrt(N) schedules also their c states (a floor above a measured
    # configuration would be a wrong floor, and the README's argument with it).
    floor, floor_c = (peaks[k] for k in peaks if k.startswith("floor"))
    assert floor < floor_c
    assert all(floor <= v for k, v in peaks.items() if not k.startswith("floor"))
    assert all(floor_c <= v for k, v in peaks.items() if "c=sqrt(N)" in k and not k.startswith("floor"))


def test_the_gpu_script_runs_its_steps_and_falls_back_to_the_cpu(tmp_path):
    """``benchmarks/gpu.py`` is ready for a lent GPU: here (no CUDA) it says so and runs the gpu tests
    (skipped) and the benchmark at smoke sizes on the CPU, writing its summary beside the tables."""
    import subprocess
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real thing")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = (tmp_path / "gpu-summary.md").read_text()
    assert "no CUDA device: CPU fallback" in summary and "gpu tests: exit 0" in summary
    assert "benchmark: exit 0" in summary and (tmp_path / "results-cpu.md").exists()
