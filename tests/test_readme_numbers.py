"""The README's benchmark numbers are the committed result files' (benchmarks/readme_tables.py)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("name", ["results-cpu.json", "schedules-cpu.json", "train-cpu.md", "contention-cpu.md", "targets-cpu.md",
                                  "rss-floor-cpu.md"])
def test_the_readme_shows_the_result_file(name):
    from readme_tables import tables

    block = tables()[name]
    readme = (ROOT / "README.md").read_text()
    assert block.strip() in readme, f"README.md does not show benchmarks/results/{name} as rendered by readme_tables.py"


def test_the_overhead_targets_script_runs_and_reports_every_target():
    import interleaved

    result = interleaved.targets(2, "1", None)
    assert [(r["problem"], r["config"]) for r in result["targets"]] == [(k, c) for k, c, _, _ in interleaved.TARGETS]
    for r in result["targets"]:
        assert r["fastest_ratio"] > 0 and r["median_ratio"] > 0 and r["met"] == (r["fastest_ratio"] <= r["bound"])
    assert result["floor_b_ratio"] > 0 and "load average" in result["threads_why"]
