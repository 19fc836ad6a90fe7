"""The version matrix: one nox session per cell of compat/matrix.toml, plus `report`.

    nox -f compat/noxfile.py                    # the quick diagonal + report (default tags)
    nox -f compat/noxfile.py -t full            # torch x torchdiffeq x torchode + report
    nox -f compat/noxfile.py -t unsupported     # the expected-unsupported releases + report
    nox -f compat/noxfile.py -s "cell(torchdiffeq='0.2.4', torchode='1.0.0')"    # one cell
    nox -f compat/noxfile.py -s report          # regenerate the report (compat/.work/; COMPAT_PUBLISH=1: the committed one)
    nox -f compat/noxfile.py -l                 # list the cells and their tags

Arguments after `--` go to pytest (e.g. `-- -x tests/test_values.py`).  See compat/README.md.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _matrix  # noqa: E402  (next to this file)

DATA = _matrix.load()
CELLS = _matrix.cells(DATA)
BY_KEY = {(c.torch, c.torchdiffeq, c.torchode): c for c in CELLS}
HERE, ROOT, WORK = _matrix.HERE, _matrix.ROOT, _matrix.WORK
SYSTEM_TORCH = _matrix.installed_torch_version()

nox.options.tags = ["diagonal"]
nox.options.default_venv_backend = "virtualenv"

PYTEST = ["python", "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider"]
HEADER = re.compile(r"^torch (\S+), torchdiffeq (\S+), torchode (\S+)\s*$", re.M)


def _tree() -> dict:
    """The checkout the cell tested: commit and uncommitted paths (other work may be in progress)."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": git("status", "--porcelain").splitlines()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _host_install(session, host: str, version: str, constraints: Path) -> None:
    spec = f"{host}=={version}"
    install = DATA.get("install", {})
    if spec in install.get("no_deps", []):
        session.install("--no-deps", spec)
        deps = install.get("deps", {}).get(host, [])
        if deps:
            session.install("-c", str(constraints), *deps)
    else:
        session.install("-c", str(constraints), spec)


def parse_junit(path: Path) -> dict:
    """Per-test outcomes of a pytest --junitxml file (junit_family=xunit1, which names the file)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("file") or ""
        classname, name = case.get("classname", ""), case.get("name", "")
        module = file[:-3].replace("/", ".") if file.endswith(".py") else ""
        cls = classname[len(module) + 1:] if module and classname.startswith(module + ".") else ""
        nodeid = "::".join(p for p in (file or classname, cls, name) if p)
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            el = failure if failure is not None else error
            counts["failed" if failure is not None else "errors"] += 1
            text = (el.text or "").strip().splitlines()
            errors = [ln for ln in text if ln.startswith("E ")]
            failures.append({
                "nodeid": nodeid,
                "kind": "failed" if failure is not None else "error",
                "message": (el.get("message") or "").strip()[:400],
                "first_line": (errors[0][1:] if errors else "").strip()[:400],
                "last_line": (errors[-1][1:] if errors else text[-1] if text else "").strip()[:400],
            })
        elif skipped is not None:
            if skipped.get("type") == "pytest.xfail":
                counts["xfailed"] += 1
            else:
                counts["skipped"] += 1
                reason = (skipped.get("message") or "").strip()
                skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    return {"counts": counts, "failures": failures, "skip_reasons": skips}


def _paths(cell) -> dict:
    out = {k: WORK / k for k in ("cells", "junit", "logs")}
    for p in out.values():
        p.mkdir(parents=True, exist_ok=True)
    return {
        "json": out["cells"] / f"{cell.slug}.json",
        "junit": out["junit"] / f"{cell.slug}.xml",
        "log": out["logs"] / f"{cell.slug}.log",
        "versions": out["cells"] / f"{cell.slug}.versions.json",
        "unsupported": out["cells"] / f"{cell.slug}.unsupported.json",
    }


def _see_outer_site_packages(session) -> None:
    """Run from inside a virtualenv, ``--system-site-packages`` shows the cell the *base*
    interpreter's packages, not the virtualenv's torch; a .pth file in the cell's site-packages adds
    the outer environment's, so the cell reuses that torch as it does outside a virtualenv."""
    import site

    if sys.prefix == sys.base_prefix:
        return
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    cell_site = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                            silent=True).strip().splitlines()[-1]
    (Path(cell_site) / "_rampde_outer_env.pth").write_text("\n".join(outer) + "\n")
    session.log(f"outer virtualenv {sys.prefix}: its site-packages are visible to the cell ({', '.join(outer)})")


def _run_cell(session, cell, paths: dict, result: dict) -> None:
    timings = result["timings_s"]
    t = time.monotonic()
    tmp = Path(session.create_tmp()).resolve()  # (nox makes it absolute against the cwd: before chdir)
    session.chdir(str(ROOT))
    constraints = tmp / "constraints.txt"
    _see_outer_site_packages(session)
    if cell.system_torch:
        # Never a second torch: pip may only keep the interpreter's build.
        constraints.write_text(f"torch=={SYSTEM_TORCH}\n")
    else:
        index = DATA["hosts"].get("torch_index_url") or ""
        session.install(f"torch=={cell.torch}", *(["--index-url", index] if index else []))
        constraints.write_text(f"torch=={cell.torch}\n")
    _host_install(session, "torchdiffeq", cell.torchdiffeq, constraints)
    _host_install(session, "torchode", cell.torchode, constraints)
    session.install("--no-deps", "-e", str(ROOT))
    session.install("-c", str(constraints), *DATA.get("install", {}).get("test_deps", []))
    timings["setup"] = round(time.monotonic() - t, 1)

    expected = {"torch": cell.torch, "torchdiffeq": cell.torchdiffeq, "torchode": cell.torchode}
    versions_ok = True
    try:
        session.run("python", str(HERE / "_cell.py"), "versions", "--expect", json.dumps(expected),
                    "--system-torch", SYSTEM_TORCH if cell.system_torch else "", "--root", str(ROOT),
                    "--out", str(paths["versions"]))
    except Exception:  # noqa: BLE001 - recorded below; the cell is red
        versions_ok = False
    if paths["versions"].exists():
        info = json.loads(paths["versions"].read_text())
        result["installed"] = {k: v.get("version") for k, v in info["packages"].items()}
        result["locations"] = {k: ("venv" if v.get("dist_in_venv") else "system") for k, v in info["packages"].items() if v.get("version")}
        result["python"], result["platform"] = info["python"], info["platform"]
        result["version_problems"] = info["problems"]
    result["versions_ok"] = versions_ok
    if not versions_ok:
        result["status"] = "error"
        result["error"] = "installed versions differ from the cell's: " + "; ".join(result.get("version_problems", []))
        return

    if cell.unsupported is not None:
        t = time.monotonic()
        entry = cell.unsupported
        args = ["python", str(HERE / "_cell.py"), "unsupported", "--host", entry["host"], "--out", str(paths["unsupported"])]
        for pattern in entry.get("message", []):
            args += ["--message", pattern]
        session.run(*args, success_codes=[0, 1])
        check = json.loads(paths["unsupported"].read_text())
        result["unsupported_check"] = check
        result["status"] = "unsupported-ok" if check["ok"] else "fail"
        timings["check"] = round(time.monotonic() - t, 1)
        return

    # pytest -q prints no report header: read it from a collection-only run without -q.
    out = session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "--co", "tests/test_compat.py",
                      silent=True, success_codes=[0, 1, 2, 5])
    m = HEADER.search(out or "")
    header = m.group(0).strip() if m else None
    want = (SYSTEM_TORCH if cell.system_torch else result.get("installed", {}).get("torch"), cell.torchdiffeq, cell.torchode)
    result["pytest_header"] = header
    result["header_ok"] = bool(m) and m.groups() == want
    session.log(f"pytest report header: {header!r} ({'matches' if result['header_ok'] else 'DOES NOT MATCH'} the cell)")

    t = time.monotonic()
    args = PYTEST + [f"--junitxml={paths['junit']}", "-o", "junit_family=xunit1", *session.posargs]
    result["pytest_command"] = " ".join(args)
    out = session.run(*args, silent=True, success_codes=[0, 1, 2, 3, 4, 5])
    timings["tests"] = round(time.monotonic() - t, 1)
    paths["log"].write_text(out or "")
    tail = (out or "").strip().splitlines()[-12:]
    session.log("pytest: ..." + "\n".join([""] + tail))
    if not paths["junit"].exists():
        result["status"] = "error"
        result["error"] = "pytest wrote no junit XML: " + " / ".join(tail[-3:])
        return
    result.update(parse_junit(paths["junit"]))
    c = result["counts"]
    green = c["failed"] == 0 and c["errors"] == 0 and c["total"] > 0 and result["header_ok"]
    result["status"] = "pass" if green else "fail"


@nox.session(venv_backend="virtualenv", venv_params=["--system-site-packages"])
@nox.parametrize(
    ("torch", "torchdiffeq", "torchode"),
    [nox.param(c.torch, c.torchdiffeq, c.torchode, id=c.id, tags=list(c.tags)) for c in CELLS],
)
def cell(session, torch, torchdiffeq, torchode):
    """One cell: venv reusing the installed torch, the cell's host releases, the suite (or the unsupported check)."""
    c = BY_KEY[(torch, torchdiffeq, torchode)]
    paths = _paths(c)
    for p in paths.values():
        p.unlink(missing_ok=True)
    result = {
        "id": c.id,
        "session": c.session,
        "tags": list(c.tags),
        "requested": {"torch": torch, "torchdiffeq": torchdiffeq, "torchode": torchode},
        "reuses_system_torch": c.system_torch,
        "expected": "unsupported" if c.unsupported else "supported",
        "started": _now(),
        "tree": _tree(),
        "timings_s": {},
        "status": "error",
    }
    t0 = time.monotonic()
    try:
        _run_cell(session, c, paths, result)
    except BaseException as exc:  # noqa: BLE001 - a setup failure is a result too
        result["status"] = "error"
        result.setdefault("error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        result["timings_s"]["total"] = round(time.monotonic() - t0, 1)
        result["finished"] = _now()
        paths["json"].write_text(json.dumps(result, indent=2))
    if result["status"] not in ("pass", "unsupported-ok"):
        session.error(f"cell is red ({result['status']}): see {paths['json'].relative_to(ROOT)}"
                      + (f" and {paths['log'].relative_to(ROOT)}" if paths["log"].exists() else ""))


@nox.session(python=False, tags=["diagonal", "full", "unsupported", "all"])
def report(session):
    """Aggregate the cells' JSON into compat/results.md and compat/results.json."""
    session.run(sys.executable, str(HERE / "report.py"), external=True)
