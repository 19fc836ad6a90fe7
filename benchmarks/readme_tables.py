"""The README's benchmark tables, rendered from the committed result files (never typed by hand).

    python benchmarks/readme_tables.py            # prints every table; paste them into README.md

``tests/test_readme_numbers.py`` checks that the README contains exactly these renderings, so a rerun
of a benchmark without updating the README (or a number edited by hand) fails the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: README label -> (problem, configuration key in results-cpu.json)
SUITE_ROWS = {
    "a": ("(a) MLP 64-512-64, batch 1024, 50 RK4 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"),
        ("torchdiffeq under bf16 autocast", "torchdiffeq autocast bf16"),
        ("torchdiffeq `odeint_adjoint` fp32", "torchdiffeq adjoint fp32"),
        ("torchode fp32", "torchode fp32"),
        ("**rampde_rk4 fp32**", "rampde_rk4 fp32"),
        ("**rampde_rk4 bf16**", "rampde_rk4 bf16"),
        ("**rampde_rk4 bf16 through torchode**", "rampde_rk4 bf16 (torchode)"),
    ]),
    "b": ("(b) tiny field 2-50-2, batch 16, 1000 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"),
        ("torchdiffeq under bf16 autocast", "torchdiffeq autocast bf16"),
        ("torchdiffeq `odeint_adjoint` fp32", "torchdiffeq adjoint fp32"),
        ("**rampde_rk4 fp32**", "rampde_rk4 fp32"),
        ("**rampde_rk4 fp16**", "rampde_rk4 fp16"),
    ]),
    "c": ("(c) conv block 64x32x32, batch 32, 8 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"),
        ("torchdiffeq under bf16 autocast", "torchdiffeq autocast bf16"),
        ("**rampde_rk4 bf16**", "rampde_rk4 bf16"),
    ]),
    "d": ("(d) CNF, exact trace, batch 512, 20 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"),
        ("**rampde_rk4 bf16**", "rampde_rk4 bf16"),
    ]),
}


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def suite_table(results: dict | None = None) -> str:
    """The suite's headline table (a subset of ``results-cpu.md``) and the suite's own targets."""
    results = results or _load("results-cpu.json")
    m, load = results["machine"], results["load_average"]
    probe = results["matmul_probe_ms"]
    lines = [f"Run of {results['wall_s']:.0f} s: torch {m['torch']}, torchdiffeq {m['torchdiffeq']}, torchode "
             f"{m['torchode']}, Python {m['python']}, {m['threads']} threads; load average {load['start'][0]:.2f} at "
             f"the start and {load['end'][0]:.2f} at the end; matmul 1024x512 @ 512x64 on 1 thread: fp32 "
             f"{probe['fp32']:.2f} ms, bf16 {probe['bf16']:.2f} ms, fp16 {probe['fp16']:.1f} ms.", "",
             "| problem | config | ms/iter | vs torchdiffeq fp32 | peak MiB | grad err |",
             "|---|---|---|---|---|---|"]
    for key, (title, rows) in SUITE_ROWS.items():
        configs = results["problems"][key]["configs"]
        base = configs["torchdiffeq fp32"]["time_ms"]["median"]
        for i, (label, config) in enumerate(rows):
            r = configs[config]
            if r.get("status") != "ok":
                lines.append(f"| {title if i == 0 else ''} | {label} | - | - | - | {r.get('status')} |")
                continue
            t = r["time_ms"]["median"]
            lines.append(f"| {title if i == 0 else ''} | {label} | {t:.0f} | {t / base:.2f}x | "
                         f"{r['memory']['peak_growth_bytes'] / 2**20:.1f} | {r['grad_rel_err']:.1e} |")
    lines += ["", "The suite's targets (this run):", ""]
    for t in results["targets"]:
        lines.append(f"- ({t['problem']}) {t['target']}: {t['value']:.3g} -- {'met' if t['met'] else 'not met'}")
    return "\n".join(lines) + "\n"


#: the schedules study's README rows: problem -> (title, [(label, configuration key)])
SCHEDULE_ROWS = {
    "a": ("(a) MLP 64-512-64, batch 1024, 50 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"), ("torchdiffeq bf16 autocast", "torchdiffeq autocast bf16"),
        ("rampde fp32 steps", "rampde fp32 steps"), ("rampde fp32 graphs", "rampde fp32 graphs"),
        ("rampde bf16 steps", "rampde bf16 steps"), ("rampde bf16 graphs", "rampde bf16 graphs"),
        ("rampde bf16 c=sqrt(N)", "rampde bf16 c=sqrt(N)"),
        ("rampde bf16 c=sqrt(N), stages", "rampde bf16 c=sqrt(N) stages"),
    ]),
    "a400": ("(a) at 400 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"), ("torchdiffeq bf16 autocast", "torchdiffeq autocast bf16"),
        ("rampde fp32 steps", "rampde fp32 steps"), ("rampde bf16 steps", "rampde bf16 steps"),
        ("rampde bf16 graphs", "rampde bf16 graphs"), ("rampde bf16 c=sqrt(N)", "rampde bf16 c=sqrt(N)"),
        ("rampde bf16 c=sqrt(N), stages", "rampde bf16 c=sqrt(N) stages"),
    ]),
    "b": ("(b) tiny 2-50-2, batch 16, 1000 steps", [
        ("torchdiffeq fp32", "torchdiffeq fp32"), ("rampde fp32 steps", "rampde fp32 steps"),
        ("rampde fp32 graphs", "rampde fp32 graphs"), ("rampde fp32 segments(16)", "rampde fp32 segments(16)"),
    ]),
}


def _schedule_of(r: dict) -> str:
    stats = (r.get("rampde_stats") or [None])[0]
    if not stats:
        return "-"
    name = stats["schedule"]
    if name == "binomial":
        name += f"({stats['checkpoints']})"
    elif stats.get("segment_steps"):
        name += f"({stats['segment_steps']} a VJP)"
    if stats.get("stage_vjp"):
        name += ", stages"
    return f"{name} ({stats['recomputed_steps']})"


def schedules_table(results: dict | None = None) -> str:
    """The schedules study: times from its interleaved phase (fresh-process medians where a row was not
    interleaved, marked), memory and gradient error from fresh processes, the budget ladder, targets."""
    results = results or _load("schedules-cpu.json")
    m, load = results["machine"], results["load_average"]
    lines = [f"Run of {results['wall_s']:.0f} s: torch {m['torch']}, {m['threads']} threads; load average "
             f"{load['start'][0]:.2f} at the start and {load['end'][0]:.2f} at the end.", "",
             "| problem | config | ms/iter (interleaved) | vs torchdiffeq fp32 | vs bf16 autocast | peak MiB | "
             "vs torchdiffeq fp32 | grad err | schedule (recomputed steps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, (title, rows) in SCHEDULE_ROWS.items():
        prob = results["schedules"][key]
        configs, inter = prob["configs"], (prob.get("interleaved") or {}).get("configs", {})
        base_mem = configs["torchdiffeq fp32"]["memory"]["peak_growth_bytes"]
        base_t = configs["torchdiffeq fp32"]["time_ms"]["median"]
        for i, (label, name) in enumerate(rows):
            r = configs[name]
            if name in inter and inter[name].get("status") == "ok":
                iv = inter[name]
                t, vs, vs_ac = f"{iv['median_ms']:.0f}", f"{iv['vs']['torchdiffeq fp32']:.2f}x", \
                    f"{iv['vs']['torchdiffeq autocast bf16']:.2f}x"
            else:
                t, vs, vs_ac = f"{r['time_ms']['median']:.0f} (fresh)", f"{r['time_ms']['median'] / base_t:.2f}x (fresh)", ""
            mem = r["memory"]["peak_growth_bytes"]
            lines.append(f"| {title if i == 0 else ''} | {label} | {t} | {vs} | {vs_ac} | {mem / 2**20:.1f} | "
                         f"{mem / base_mem:.3f}x | {r['grad_rel_err']:.1e} | {_schedule_of(r)} |")
    ladder = [(name, r) for name, r in results["schedules"]["a"]["configs"].items() if "budget" in name
              and r.get("status") == "ok"]
    if ladder:
        lines += ["", "Budget ladder on (a), fp32, fresh processes:", "",
                  "| memory_budget | budget MiB | predicted MiB | measured peak of what the schedule held MiB | "
                  "schedule | ms/iter |", "|---|---|---|---|---|---|"]
        for name, r in ladder:
            st = r["rampde_stats"][0]
            lines.append(f"| {name.split('budget ', 1)[1]} | {st['memory_budget'] / 2**20:.2f} | "
                         f"{st['predicted_bytes'] / 2**20:.2f} | {st['peak_bytes'] / 2**20:.2f} | {_schedule_of(r)} | "
                         f"{r['time_ms']['median']:.0f} |")
    lines += ["", "The study's targets (this run):", ""]
    for t in results["targets"]:
        lines.append(f"- ({t['problem']}) {t['target']}: {t['value']:.3g} -- {'met' if t['met'] else 'not met'}")
    return "\n".join(lines) + "\n"


def _file(name: str) -> str:
    return (RESULTS / name).read_text()


def tables() -> dict[str, str]:
    """Every block the README shows verbatim, by the result file it comes from."""
    return {
        "results-cpu.json": suite_table(),
        "schedules-cpu.json": schedules_table(),
        "train-cpu.md": _file("train-cpu.md"),
        "contention-cpu.md": _table_of(_file("contention-cpu.md")) + "\n" + _line_starting(
            _file("contention-cpu.md"), "The main job (") + "\n",
        "targets-cpu.md": _file("targets-cpu.md"),
        "rss-floor-cpu.md": _table_of(_file("rss-floor-cpu.md")),
    }


def _line_starting(markdown: str, prefix: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(prefix))


def _table_of(markdown: str) -> str:
    """The first Markdown table of a result file."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


if __name__ == "__main__":
    for name, text in tables().items():
        print(f"<!-- from benchmarks/results/{name} -->\n{text}")
