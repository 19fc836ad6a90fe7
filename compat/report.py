"""Aggregate the cells' results into a report: compat/.work/results.{md,json}, or the committed
compat/results.{md,json} when published on purpose.

    python compat/report.py            (what `nox -f compat/noxfile.py -s report` runs)
    COMPAT_PUBLISH=1 nox -f compat/noxfile.py -t full     # regenerate the committed report

A run (CI's quick diagonal included) never rewrites tracked files unless COMPAT_PUBLISH is set.

Inputs: compat/.work/cells/*.json, one per cell run (written by the `cell` sessions), merged over the
cells already in compat/results.json -- so running one cell and then the report updates that cell
and keeps the others (each cell says when it was measured).  Explanations of red cells come from
the [[explain]] and [[unsupported]] entries of compat/matrix.toml.  Standard library only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _matrix  # noqa: E402

HERE, ROOT, WORK = _matrix.HERE, _matrix.ROOT, _matrix.WORK
RESULTS_JSON = HERE / "results.json"  # the committed report (also the base that new cells merge over)
RESULTS_MD = HERE / "results.md"
PUBLISH = os.environ.get("COMPAT_PUBLISH", "").strip().lower() not in ("", "0", "false", "no", "off")
GREEN = ("pass", "unsupported-ok")


def _adapter_ranges() -> dict:
    """The `supported = "..."` ranges the adapters declare (read from source: no torch import)."""
    out = {}
    for host in ("torchdiffeq", "torchode"):
        src = (ROOT / "adapters" / f"rampde_{host}" / "_adapter.py").read_text()
        m = re.search(r'^\s*supported\s*=\s*"([^"]*)"', src, re.M)
        out[host] = m.group(1) if m else None
    return out


def _load_cells(data: dict) -> list[dict]:
    by_id: dict[str, dict] = {}
    if RESULTS_JSON.exists():
        for c in json.loads(RESULTS_JSON.read_text()).get("cells", []):
            if c.get("status") != "not run":
                by_id[c["id"]] = c
    for path in sorted((WORK / "cells").glob("*.json")):
        if path.name.endswith((".versions.json", ".unsupported.json")):  # parts of a cell
            continue
        c = json.loads(path.read_text())
        old = by_id.get(c["id"])
        if old is None or c.get("finished", "") >= old.get("finished", ""):
            by_id[c["id"]] = c
    out = []
    for cell in _matrix.cells(data):
        c = by_id.get(cell.id) or {
            "id": cell.id,
            "session": cell.session,
            "tags": list(cell.tags),
            "requested": {"torch": cell.torch, "torchdiffeq": cell.torchdiffeq, "torchode": cell.torchode},
            "expected": "unsupported" if cell.unsupported else "supported",
            "status": "not run",
        }
        c["tags"] = list(cell.tags)
        if cell.unsupported:
            c["unsupported_entry"] = cell.unsupported
        c["failures"] = [  # slim: node id and first error line (the full text is in .work/logs)
            {"nodeid": f["nodeid"], "kind": f["kind"],
             "error": (f.get("first_line") or f.get("error") or f.get("last_line") or f.get("message") or "")[:240]}
            for f in c.get("failures", [])
        ]
        for f in c["failures"]:  # indexes into results.json "explanations"
            f["explained_by"] = [
                data["explain"].index(e) for e in _matrix.explanations_for(c["requested"], f["nodeid"], data)
            ]
        out.append(c)
    return out


def _summary(c: dict) -> str:
    s = c.get("status")
    if s == "not run":
        return "not run"
    if c.get("expected") == "unsupported":
        return "clear error (as expected)" if s == "unsupported-ok" else "**RED: no clear error**" if s == "fail" else f"**{s}**"
    if "counts" not in c:
        return f"**{s}**: {c.get('error', '')}"
    n = c["counts"]
    parts = [f"{n['passed']} passed"]
    if n["failed"]:
        parts.insert(0, f"{n['failed']} failed")
    if n["errors"]:
        parts.insert(0, f"{n['errors']} errors")
    if n["skipped"]:
        parts.append(f"{n['skipped']} skipped")
    if n["xfailed"]:
        parts.append(f"{n['xfailed']} xfailed")
    return ("pass: " if s == "pass" else "**RED**: ") + ", ".join(parts)


def _explanations(data: dict) -> list[dict]:
    return [{"kind": e.get("kind", ""), "when": e.get("when", {}), "tests": e.get("tests", []),
             "cause": " ".join(e["cause"].split())} for e in data.get("explain", [])]


def _md(report: dict, data: dict) -> str:
    env = report["environment"]
    explain = report["explanations"]
    cells = report["cells"]
    hosts = data["hosts"]
    lines = [
        "# Version matrix: results",
        "",
        f"Generated {report['generated']} by `nox -f compat/noxfile.py -s report` (`python compat/report.py`) "
        "from the cells' results; the matrix is `compat/matrix.toml`, how to run it is in `compat/README.md`.",
        "",
        f"- Python {env['python']} ({env['implementation']}), {env['platform']}",
        f"- torch reused from the interpreter: {env.get('system_torch')} (no cell downloaded torch)" if all(
            c.get("reuses_system_torch", True) for c in cells) else f"- system torch: {env.get('system_torch')}",
        f"- adapters' declared ranges: torchdiffeq `{report['adapter_ranges']['torchdiffeq']}`, "
        f"torchode `{report['adapter_ranges']['torchode']}`",
        "- each cell: `python -m pytest -n auto -q -p no:cacheprovider` (2 workers on this machine); counts from its junit XML",
    ]
    trees = {}
    for c in cells:
        tree = c.get("tree")
        if tree:
            key = (tree.get("commit"), tuple(tree.get("uncommitted", [])))
            trees.setdefault(key, []).append(c["id"])
    for (commit, dirty), ids in trees.items():
        what = f"commit `{commit}`" + (f" plus uncommitted `{'`, `'.join(p.strip() for p in dirty)}`" if dirty else " (clean)")
        lines.append(f"- checkout tested: {what}" + ("" if len(trees) == 1 else f" ({len(ids)} cell(s))"))
    lines.append("")
    product = [c for c in cells if c.get("expected") == "supported"]
    for tv in hosts["torch"]:
        lines += [f"## torch {tv}: torchdiffeq (rows) x torchode (columns)", ""]
        lines.append("| torchdiffeq \\ torchode | " + " | ".join(hosts["torchode"]) + " |")
        lines.append("|---|" + "---|" * len(hosts["torchode"]))
        for td in hosts["torchdiffeq"]:
            row = []
            for to in hosts["torchode"]:
                c = next((c for c in product if c["requested"] == {"torch": tv, "torchdiffeq": td, "torchode": to}), None)
                row.append(_summary(c) if c else "-")
            lines.append(f"| **{td}** | " + " | ".join(row) + " |")
        lines.append("")

    lines += ["## Every cell", "",
              "| cell (nox session id) | result | passed | failed | errors | skipped | xfailed | installed torch / torchdiffeq / torchode | pytest header shows them | wall (setup + tests) | measured |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        n = c.get("counts", {})
        inst = c.get("installed", {})
        iv = " / ".join(str(inst.get(h, "-")) for h in ("torch", "torchdiffeq", "torchode")) if inst else "-"
        t = c.get("timings_s", {})
        wall = f"{t.get('total', '-')} s ({t.get('setup', '-')} + {t.get('tests', t.get('check', '-'))})" if t else "-"
        header = "-" if c.get("expected") == "unsupported" or "header_ok" not in c else ("yes" if c["header_ok"] else "**NO**")
        result = c.get("status", "not run")
        lines.append(
            f"| `{c['id']}` | {result if result in GREEN or result == 'not run' else '**' + result + '**'} | "
            + " | ".join(str(n.get(k, "-")) for k in ("passed", "failed", "errors", "skipped", "xfailed"))
            + f" | {iv} | {header} | {wall} | {c.get('finished', '-')} |"
        )
    lines.append("")

    unsupported = [c for c in cells if c.get("expected") == "unsupported"]
    if unsupported:
        lines += ["## Deliberately unsupported releases", "",
                  "Each installs the release and checks, instead of running the suite, that `import rampde_plugins` warns "
                  "`RampdeAdapterWarning` and `rampde_plugins.install(host)` raises `UnsupportedHostError`, with a message "
                  "naming what is missing and the supported range.", ""]
        for c in unsupported:
            e = c.get("unsupported_entry", {})
            chk = c.get("unsupported_check", {})
            lines.append(f"### {e.get('host')} {e.get('version')}: {_summary(c)}")
            lines.append("")
            lines.append("Why it is unsupported: " + " ".join(str(e.get("why", "")).split()))
            lines.append("")
            if chk:
                for name, ok in chk.get("checks", {}).items():
                    lines.append(f"- [{'x' if ok else ' '}] {name}")
                if chk.get("import_error"):
                    lines.append(f"- observed: `import rampde_plugins` raised `{chk['import_error']}`")
                elif chk.get("install"):
                    inst = chk["install"]
                    lines.append(f"- observed: install -> {inst['raised'] or 'no exception'}: {inst['message']}")
                    for w in chk.get("warnings", []):
                        lines.append(f"- observed warning: {w['message']}")
                if not chk.get("ok"):
                    lines.append("- fix: the adapter change in compat/README.md, \"Recommended adapter changes\"")
            elif c.get("error"):
                lines.append(f"- {c['error']}")
            lines.append("")

    red = [c for c in cells if c.get("expected") == "supported" and c.get("status") not in GREEN + ("not run",)]
    lines += ["## Red cells explained", ""]
    if not red:
        lines += ["None.", ""]
    # Cells failing the same tests for the same reasons are described once.
    groups: dict[tuple, list[dict]] = {}
    for c in red:
        key = (c.get("error"), c.get("header_ok", True), tuple(sorted(f["nodeid"] for f in c.get("failures", []))))
        groups.setdefault(key, []).append(c)
    for (error, header_ok, _), members in groups.items():
        c = members[0]
        lines.append("### " + ", ".join(f"`{m['id']}`" for m in members) + f": {_summary(c)}")
        lines.append("")
        if error:
            lines += [f"Error: {error}", ""]
        if not header_ok:
            lines += [f"pytest header does not show the cell's versions: `{c.get('pytest_header')}`", ""]
        causes: dict[str, list[dict]] = {}
        for f in c.get("failures", []):
            key = explain[f["explained_by"][0]]["cause"] if f.get("explained_by") else "UNEXPLAINED"
            causes.setdefault(key, []).append(f)
        for cause, fails in causes.items():
            ids = sorted(f["nodeid"] for f in fails)
            kind = explain[fails[0]["explained_by"][0]]["kind"] if fails[0].get("explained_by") else ""
            lines.append(f"- **{len(fails)} test(s)**{' (' + kind + ')' if kind else ''}: "
                         + (cause if cause != "UNEXPLAINED" else "**UNEXPLAINED**"))
            shown = ids if len(ids) <= 6 else ids[:5] + [f"... {len(ids) - 5} more"]
            lines.append("  - " + ", ".join(f"`{i}`" if not i.startswith("...") else i for i in shown))
            observed = sorted({f["error"] for f in fails})
            for o in observed[:3]:
                lines.append(f"  - observed: `{o[:220]}{'...' if len(o) > 220 else ''}`")
        lines.append("")

    skips: dict[str, int] = {}
    for c in cells:
        for reason, k in c.get("skip_reasons", {}).items():
            skips[reason] = skips.get(reason, 0) + k
    if skips:
        lines += ["## Skips (all cells together)", ""]
        for reason, k in sorted(skips.items(), key=lambda kv: -kv[1]):
            lines.append(f"- {k} x {reason}")
        lines.append("")

    run = [c for c in cells if c.get("timings_s", {}).get("total")]
    if run:
        tot = sum(c["timings_s"]["total"] for c in run)
        diag = sum(c["timings_s"]["total"] for c in run if "diagonal" in c["tags"])
        full = sum(c["timings_s"]["total"] for c in run if "full" in c["tags"])
        uns = sum(c["timings_s"]["total"] for c in run if "unsupported" in c["tags"])
        lines += ["## Time", "",
                  f"Sum of the cells' wall times (venv + installs + suite; sessions run one after another): "
                  f"diagonal {diag / 60:.1f} min, full product {full / 60:.1f} min, unsupported checks {uns / 60:.1f} min, "
                  f"all {tot / 60:.1f} min.  Load average when the report was written: "
                  f"{report['environment'].get('load_average', 'n/a')}.", ""]
    return "\n".join(lines)


def main() -> int:
    data = _matrix.load()
    cells = _load_cells(data)
    first = next((c for c in cells if c.get("python")), {})
    report = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "matrix_file": str(_matrix.MATRIX_FILE.relative_to(ROOT)) if _matrix.MATRIX_FILE.is_relative_to(ROOT) else str(_matrix.MATRIX_FILE),
        "environment": {
            "python": first.get("python", platform.python_version()),
            "implementation": platform.python_implementation(),
            "platform": first.get("platform", platform.platform()),
            "machine": platform.machine(),
            "system_torch": _matrix.installed_torch_version(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        },
        "adapter_ranges": _adapter_ranges(),
        "summary": {s: sum(1 for c in cells if c.get("status") == s) for s in sorted({c.get("status") for c in cells})},
        "explanations": _explanations(data),
        "cells": cells,
    }
    out_json, out_md = (RESULTS_JSON, RESULTS_MD) if PUBLISH else (WORK / "results.json", WORK / "results.md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    out_md.write_text(_md(report, data) + "\n")
    print(f"wrote {out_md.relative_to(ROOT)} and {out_json.relative_to(ROOT)}: {report['summary']}"
          + ("" if PUBLISH else " (set COMPAT_PUBLISH=1 to regenerate the committed compat/results.*)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
