"""The matrix of compat/matrix.toml as a list of cells (shared by the noxfile and the report).

Standard library only: the noxfile imports it in nox's own interpreter.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: COMPAT_MATRIX=path/to/other.toml runs another matrix (e.g. with extra torch versions).
MATRIX_FILE = Path(os.environ.get("COMPAT_MATRIX", HERE / "matrix.toml")).resolve()
WORK = HERE / ".work"  # per-cell JSON, junit XML and logs (ignored by git)
HOSTS = ("torch", "torchdiffeq", "torchode")


@dataclasses.dataclass(frozen=True)
class Cell:
    torch: str
    torchdiffeq: str
    torchode: str
    system_torch: bool  # reuse the interpreter's torch build (no download)
    tags: tuple[str, ...]
    unsupported: dict | None = None  # the [[unsupported]] entry of an expected-unsupported cell

    @property
    def id(self) -> str:
        """nox's parameter id: ``torchdiffeq='0.2.4', torchode='1.0.0'`` (torch named only if not the system one)."""
        parts = [] if self.system_torch else [f"torch='{self.torch}'"]
        parts += [f"torchdiffeq='{self.torchdiffeq}'", f"torchode='{self.torchode}'"]
        return ", ".join(parts)

    @property
    def session(self) -> str:
        return f"cell({self.id})"

    @property
    def slug(self) -> str:
        return f"torch-{self.torch}_torchdiffeq-{self.torchdiffeq}_torchode-{self.torchode}"

    def version(self, host: str) -> str:
        return getattr(self, host)


def load(path: Path = MATRIX_FILE) -> dict:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def base_version(v: str) -> str:
    return v.split("+", 1)[0]


def installed_torch_version() -> str | None:
    """The torch version of the interpreter running this (nox's), read from metadata -- no import."""
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def cells(data: dict | None = None) -> list[Cell]:
    data = load() if data is None else data
    hosts = data["hosts"]
    system = installed_torch_version()
    torch_versions = list(hosts["torch"])
    diagonal = {(d["torchdiffeq"], d["torchode"]) for d in data.get("tags", {}).get("diagonal", [])}
    out: list[Cell] = []
    for tv in torch_versions:
        is_system = system is not None and base_version(system) == base_version(tv)
        for td in hosts["torchdiffeq"]:
            for to in hosts["torchode"]:
                tags = ["full", "all", f"torch-{tv}", f"torchdiffeq-{td}", f"torchode-{to}"]
                if (td, to) in diagonal:
                    tags.insert(0, "diagonal")
                out.append(Cell(tv, td, to, is_system, tuple(tags)))
    # Expected-unsupported cells run with the first (system) torch and the other host at `with`.
    tv = torch_versions[0]
    is_system = system is not None and base_version(system) == base_version(tv)
    for entry in data.get("unsupported", []):
        versions = {"torchdiffeq": hosts["torchdiffeq"][-1], "torchode": hosts["torchode"][-1]}
        versions.update(entry.get("with", {}))
        versions[entry["host"]] = entry["version"]
        tags = ("unsupported", "all", f"torchdiffeq-{versions['torchdiffeq']}", f"torchode-{versions['torchode']}")
        out.append(Cell(tv, versions["torchdiffeq"], versions["torchode"], is_system, tags, dict(entry)))
    ids = [c.id for c in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"{MATRIX_FILE}: cells listed twice: {sorted(dup)}")
    return out


def explanations_for(cell_versions: dict, nodeid: str, data: dict) -> list[dict]:
    """The [[explain]] entries of matrix.toml that apply to a failing test of a cell."""
    found = []
    for entry in data.get("explain", []):
        when = entry.get("when", {})
        if any(cell_versions.get(h) not in vs for h, vs in when.items()):
            continue
        if any(fnmatch.fnmatchcase(nodeid, pat) for pat in entry.get("tests", [])):
            found.append(entry)
    return found
