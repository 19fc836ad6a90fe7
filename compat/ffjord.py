"""Run FFJORD's ``train_toy.py`` with rampde methods in place of torchdiffeq's, next to the original.

    python compat/ffjord.py PATH [--niters 100] [--data 8gaussians] [--variants NAME[,NAME...]] [--out FILE]

PATH is an FFJORD checkout (a work tree, or the git directory ``fetch github:rtqichen/ffjord`` leaves); it
is exported to a temporary directory and ``train_toy.py`` runs there as written, in fresh processes with
the same seeds (``random``, ``numpy``, ``torch``: 0), once with torchdiffeq's solver and once with the
same method's rampde version.  FFJORD calls ``odeint_adjoint`` (``lib/layers/cnf.py``); the
``odeint`` variants route that name to ``torchdiffeq.odeint`` in *both* runs (torchdiffeq's backprop
against rampde's discrete adjoint).  The method swap is done at the call (``compat/upstream.py::route``:
``dopri5`` becomes ``rampde_dopri5``), with ``precision`` or ``checkpoint``/``memory_budget`` added to
the rampde solves' options for the variants that name one.  Two things around the program are fixed
so that the runs can be compared and finish: FFJORD's toy-data generator draws from an OS-seeded
``numpy.random.RandomState`` when given none -- both runs get one seeded with 0 -- and the trajectory
plots drawn after training are skipped (``--viz_freq`` beyond the last iteration, and
``save_trajectory``/``trajectory_to_video`` replaced by no-ops).  Needs scikit-learn and matplotlib
(FFJORD imports them).  Nothing of FFJORD's is copied into this repository.

The table: the loss at the last iteration of each run and their relative difference, the mean time
per iteration (FFJORD's own meter) and the peak RSS of each process (``MALLOC_MMAP_THRESHOLD_=65536``,
so that freed memory is returned to the OS), as ratios rampde / torchdiffeq.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOAT = r"(-?[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?)"
LOG = re.compile(rf"^Iter (\d+) \| Time {FLOAT}\({FLOAT}\) \| Loss {FLOAT}\({FLOAT}\)")

#: name -> (entry FFJORD's odeint_adjoint is routed to, extra options of the rampde solves)
VARIANTS = {
    "odeint_adjoint": ("odeint_adjoint", {}),
    "odeint": ("odeint", {}),
    "odeint bf16": ("odeint", {"precision": "bf16"}),
    "odeint_adjoint bf16": ("odeint_adjoint", {"precision": "bf16"}),
    "odeint graphs": ("odeint", {"checkpoint": "graphs"}),
    "odeint binomial(4)": ("odeint", {"checkpoint": 4}),
    "odeint budget 64MB": ("odeint", {"memory_budget": "64MB"}),
}

_BOOT = r"""
import random, resource, runpy, sys
import numpy, torch
sys.path.insert(0, {here!r})
sys.path.insert(0, {folder!r})
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)
torch.set_num_threads({threads!r})
import torchdiffeq
if {entry!r} == "odeint":
    torchdiffeq.odeint_adjoint = torchdiffeq.odeint  # (both runs: FFJORD imports the name from torchdiffeq)
if {swap!r}:
    import rampde_plugins
    from upstream import route
    extra = {extra!r}
    route(set(rampde_plugins.get_registry().tableaus), lambda entry, method: dict(extra),
          entries=("odeint", "odeint_adjoint"))
import lib.toy_data as toy_data
_gen, _rng = toy_data.inf_train_gen, numpy.random.RandomState(0)
toy_data.inf_train_gen = lambda data, rng=None, batch_size=200: _gen(data, _rng if rng is None else rng, batch_size)
import diagnostics.viz_toy as viz_toy
viz_toy.save_trajectory = lambda *a, **k: None
viz_toy.trajectory_to_video = lambda *a, **k: None
sys.argv = ["train_toy.py", *{argv!r}]
try:
    runpy.run_path("train_toy.py", run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def export(src: Path, dest: Path) -> None:
    """The files of an FFJORD checkout (work tree or git directory) into ``dest``."""
    if (src / "train_toy.py").is_file():
        subprocess.run(["cp", "-r", f"{src}/.", str(dest)], check=True)
        return
    archive = subprocess.run(["git", "--git-dir", str(src), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run(folder: Path, variant: str, swap: bool, args) -> dict:
    entry, extra = VARIANTS[variant]
    argv = ["--data", args.data, "--niters", str(args.niters), "--solver", args.solver,
            "--viz_freq", str(10 * args.niters + 1), "--val_freq", str(10 * args.niters + 1),
            "--save", str(folder / "experiments" / f"{'rampde' if swap else 'torchdiffeq'}-{variant.replace(' ', '_')}")]
    code = _BOOT.format(here=str(HERE), folder=str(folder), entry=entry, swap=swap, extra=extra, argv=argv,
                        threads=args.threads)
    env = {**os.environ, "MPLBACKEND": "Agg", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, env=env,
                          timeout=args.timeout)
    losses, times = {}, []
    for line in proc.stderr.splitlines():
        m = LOG.match(line.strip())
        if m:
            losses[int(m.group(1))] = float(m.group(4))
            times.append(float(m.group(2)))
    peak = re.findall(r"PEAK_RSS_KB (\d+)", proc.stderr)
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"rc": proc.returncode, "losses": losses, "time_per_iter_s": sum(times[1:]) / max(1, len(times) - 1),
            "peak_rss_mb": int(peak[-1]) / 1024 if peak else None,
            "error": "" if proc.returncode == 0 else next((ln for ln in reversed(proc.stderr.splitlines())
                                                          if "Error" in ln), tail)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="an FFJORD checkout (work tree or git directory)")
    p.add_argument("--data", default="8gaussians")
    p.add_argument("--niters", type=int, default=100)
    p.add_argument("--solver", default="dopri5", help="FFJORD's --solver (its rampde version runs in the swapped run)")
    p.add_argument("--variants", default=None, help="comma-separated (default: all): " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1: no oversubscription)")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) and the JSON here")
    args = p.parse_args(argv)
    chosen = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"FFJORD train_toy.py --data {args.data} --niters {args.niters} --solver {args.solver}; "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
    rows, refs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export(args.path, folder)
        for variant in chosen:
            entry = VARIANTS[variant][0]
            if entry not in refs:  # torchdiffeq's own run, fp32, once per entry (the options are rampde's)
                refs[entry] = run(folder, entry, False, args)
            ref = refs[entry]
            got = run(folder, variant, True, args)
            last = args.niters
            a, b = ref["losses"].get(last), got["losses"].get(last)
            if got["rc"] != 0 or b is None:
                status, diff = f"FAIL: {got['error'][:160]}", None
            elif ref["rc"] != 0 or a is None:
                status, diff = f"n/a: torchdiffeq's own run fails ({ref['error'][:120]})", None
            else:
                status, diff = "ok", abs(b - a) / abs(a)
            row = {"variant": variant, "status": status, "loss_torchdiffeq": a, "loss_rampde": b, "rel_diff": diff,
                   "time_ratio": got["time_per_iter_s"] / ref["time_per_iter_s"] if ref["time_per_iter_s"] else None,
                   "time_per_iter_s": (ref["time_per_iter_s"], got["time_per_iter_s"]),
                   "peak_rss_mb": (ref["peak_rss_mb"], got["peak_rss_mb"]),
                   "rss_ratio": (got["peak_rss_mb"] / ref["peak_rss_mb"]) if ref["peak_rss_mb"] and got["peak_rss_mb"] else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"FFJORD `train_toy.py --data {args.data} --niters {args.niters} --solver {args.solver}`, "
             f"{args.threads} thread(s); rampde runs `rampde_{args.solver}`.", "",
             "| variant | status | loss at the last iteration (torchdiffeq / rampde) | rel. diff | time / iter (s) | "
             "time ratio | peak RSS (MB) | RSS ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(x, spec):
            return "-" if x is None else format(x, spec)
        lines.append(f"| {r['variant']} | {r['status']} | {f(r['loss_torchdiffeq'], '.6f')} / {f(r['loss_rampde'], '.6f')} | "
                     f"{f(r['rel_diff'], '.2e')} | {f(r['time_per_iter_s'][0], '.3f')} / {f(r['time_per_iter_s'][1], '.3f')} | "
                     f"{f(r['time_ratio'], '.2f')} | {f(r['peak_rss_mb'][0], '.0f')} / {f(r['peak_rss_mb'][1], '.0f')} | "
                     f"{f(r['rss_ratio'], '.2f')} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["status"].startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
