"""Run torchdiffeq's own examples with rampde methods in place of torchdiffeq's, next to the originals.

    python compat/examples.py PATH [--only NAME[,NAME...]] [--precision POLICY] [--checkpoint SCHEDULE]
                                   [--stages] [--out FILE]

PATH is a torchdiffeq checkout (a work tree, or the git directory ``fetch github:rtqichen/torchdiffeq``
leaves); its ``examples/`` are exported to a temporary directory and run there, unchanged, as
``python examples/<name>.py <short arguments>``, each twice in fresh processes with the same seeds
(``random``, ``numpy``, ``torch``: 0): once as written (torchdiffeq's solvers) and once with every
``odeint``/``odeint_adjoint``/``odeint_event`` call routed to ``rampde_<method>`` (torchdiffeq's
method names are kept in the examples' code; ``compat/upstream.py::route`` does the swap).
``--dtype float64`` makes fp64 torch's default dtype in both runs (the examples create their
tensors and modules with it).  ``--precision`` and ``--checkpoint``/``--stages`` go into the options of the rampde solves
(``odeint_adjoint`` gets the precision only: it runs rampde's quadrature adjoint, which has no
schedule).  Nothing of torchdiffeq's is copied into this repository.

Each example prints its training loss every few iterations; the table compares those numbers
(``max rel diff``: the largest relative difference between the two runs' logged values; in fp32
both start from the same parameters and data, so it measures how far the two gradients' roundoff
carries the training apart).  A run passes when it exits with 0 and logs as many finite values as
torchdiffeq's; where torchdiffeq's own run fails the row says so (``n/a``) and does not count.  ``cnf`` needs scikit-learn (``make_circles``); without it it is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from upstream import export_tests, schedule  # noqa: E402

FLOAT = r"(-?[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?)"


@dataclass(frozen=True)
class Example:
    script: str
    args: tuple[str, ...]
    pattern: str  # one logged value per matching line (group 1)
    needs: tuple[str, ...] = ()
    fp64: bool = False  # builds its model in float64 (``torch.set_default_dtype``) whatever --dtype says


EXAMPLES = {
    "ode_demo": Example("ode_demo", ("--niters", "60", "--test_freq", "10"), rf"^Iter \d+ \| Total Loss {FLOAT}"),
    "ode_demo --adjoint": Example("ode_demo", ("--niters", "60", "--test_freq", "10", "--adjoint"),
                                  rf"^Iter \d+ \| Total Loss {FLOAT}"),
    "latent_ode": Example("latent_ode", ("--niters", "4"), rf"^Iter: \d+, running avg elbo: {FLOAT}"),
    "latent_ode --adjoint": Example("latent_ode", ("--niters", "4", "--adjoint", "True"),
                                    rf"^Iter: \d+, running avg elbo: {FLOAT}"),
    "cnf": Example("cnf", ("--niters", "8", "--num_samples", "256"), rf"^Iter: \d+, running avg loss: {FLOAT}",
                   needs=("sklearn",)),
    "cnf --adjoint": Example("cnf", ("--niters", "8", "--num_samples", "256", "--adjoint"),
                             rf"^Iter: \d+, running avg loss: {FLOAT}", needs=("sklearn",)),
    "bouncing_ball": Example("bouncing_ball", ("4",), r"^(Gradient check passed)", fp64=True),
    "bouncing_ball --adjoint": Example("bouncing_ball", ("4", "--adjoint"), r"^(Gradient check passed)", fp64=True),
    "learn_physics": Example("learn_physics", ("--num_iterations", "21", "--save", "figs"),
                             rf"^\d+ {FLOAT} \d+$", fp64=True),
}

# Runs in the example's process before the example: seeds, then (rampde runs) the swap.
_BOOT = r"""
import random, runpy, sys
import numpy, torch
sys.path.insert(0, {here!r})
sys.path.insert(0, {folder!r})
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)
if {dtype!r}:
    torch.set_default_dtype(getattr(torch, {dtype!r}))
if {swap!r}:
    import rampde_plugins
    from upstream import route, schedule
    tableaus = rampde_plugins.get_registry().tableaus
    explicit_schedule = schedule({checkpoint!r}, {stages!r})
    plain_schedule = schedule({checkpoint!r}, False)

    def options(entry, method):
        extra = {{}} if {precision!r} is None else {{"precision": {precision!r}}}
        chosen = plain_schedule if tableaus[method].implicit else explicit_schedule
        if entry != "odeint_adjoint" and chosen is not None:
            extra["checkpoint"] = chosen
        return extra

    route(set(tableaus), options, entries=("odeint", "odeint_adjoint", "odeint_event"))
sys.argv = [{script!r}, *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def run(folder: Path, ex: Example, swap: bool, cfg: dict, cwd: Path) -> dict:
    script = str(folder / f"{ex.script}.py")
    code = _BOOT.format(here=str(HERE), folder=str(folder), swap=swap, script=script, argv=list(ex.args), **cfg)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=1800)
    wall = time.perf_counter() - start
    out = proc.stdout.splitlines()
    values = [m.group(1) for line in out if (m := re.match(ex.pattern, line.strip()))]
    values = [float(v) if re.fullmatch(FLOAT, v) else v for v in values]
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    warned = sorted(set(re.findall(r"(Rampde\w*Warning)", proc.stderr)))
    return {"rc": proc.returncode, "values": values, "wall_s": round(wall, 1), "error": tail if proc.returncode else "",
            "warnings": warned}


def compare(ref: dict, got: dict) -> tuple[str, float | None]:
    if ref["rc"] != 0:  # the example itself does not run so (e.g. cnf casts its times to fp32 under --dtype float64)
        mark = "also fails" if got["rc"] != 0 else "runs"
        return f"n/a: torchdiffeq's own run fails ({ref['error'][:160]}); rampde's {mark}", None
    if got["rc"] != 0:
        return f"FAIL: {got['error'][:200]}", None
    if len(got["values"]) != len(ref["values"]) or not got["values"]:
        return f"FAIL: logged {len(got['values'])} values, torchdiffeq {len(ref['values'])}", None
    nums = [(a, b) for a, b in zip(ref["values"], got["values"]) if isinstance(a, float)]
    if any(not math.isfinite(b) for _, b in nums):
        return "FAIL: a non-finite loss", None
    diff = max((abs(b - a) / max(abs(a), 1e-30) for a, b in nums), default=None)
    return "ok", diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="a torchdiffeq checkout (work tree or git directory)")
    p.add_argument("--only", default=None, help="comma-separated example names (default: all): " + ", ".join(EXAMPLES))
    p.add_argument("--precision", default=None, help="options['precision'] of the rampde solves (default: the "
                                                     "policy of the inputs' dtype)")
    p.add_argument("--dtype", default=None, choices=["float64"],
                   help="torch's default dtype in both runs (float64: the examples' tensors and modules in fp64)")
    p.add_argument("--checkpoint", default=None, help="graphs, steps or an integer c (binomial)")
    p.add_argument("--stages", action="store_true", help="reverse each rebuilt step stage by stage")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) and the JSON here")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(EXAMPLES)
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        p.error(f"--only: unknown example(s) {unknown}; choose from {list(EXAMPLES)}")
    schedule(args.checkpoint, args.stages)  # a bad --checkpoint/--stages stops here, not in every example's process
    cfg = {"precision": args.precision, "checkpoint": args.checkpoint, "stages": args.stages, "dtype": args.dtype}
    import torch
    import torchdiffeq

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "examples"
        folder.mkdir()
        export_tests(args.path, folder, folder="examples")
        for name in names:
            ex = EXAMPLES[name]
            missing = [m for m in ex.needs if subprocess.run([sys.executable, "-c", f"import {m}"],
                                                             capture_output=True).returncode]
            if missing:
                rows.append(f"| {name} | skipped (needs {', '.join(missing)}) | | | | | |")
                continue
            if ex.fp64 and args.precision not in (None, "fp64"):
                rows.append(f"| {name} | n/a: an fp64 model; --precision {args.precision} (fp32 state) refuses fp64 "
                            "models with a ValueError, by design | | | | | |")
                continue
            work = Path(tmp) / name.replace(" ", "_")
            work.mkdir()
            ref = run(folder, ex, False, cfg, work)
            got = run(folder, ex, True, cfg, work)
            status, diff = compare(ref, got)
            results[name] = {"torchdiffeq": ref, "rampde": got, "status": status, "max_rel_diff": diff}
            last = lambda r: (f"{r['values'][-1]:.6g}" if r["values"] and isinstance(r["values"][-1], float)  # noqa: E731
                              else (r["values"][-1] if r["values"] else "-"))
            rows.append(f"| {name} | {status} | {last(ref)} | {last(got)} | "
                        f"{'-' if diff is None else f'{diff:.1e}'} | {ref['wall_s']} / {got['wall_s']} | "
                        f"{', '.join(got['warnings']) or '-'} |")
            print(rows[-1], flush=True)
    head = [f"# torchdiffeq's examples with rampde methods ({', '.join(f'{k}={v}' for k, v in cfg.items() if v) or 'defaults'})",
            "",
            f"torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, python {sys.version.split()[0]}; "
            f"load average {os.getloadavg()[0]:.2f}. `python compat/examples.py <torchdiffeq checkout>"
            + "".join(f" --{k} {v}" if v is not True else f" --{k}" for k, v in cfg.items() if v) + "`.",
            "",
            "| example | rampde run | torchdiffeq last logged | rampde last logged | max rel diff | wall s (td / rampde) "
            "| rampde's warnings |",
            "|---|---|---|---|---|---|---|"]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"config": cfg, "results": results}, indent=1) + "\n")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("n/a") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
