"""Stiff problems: rampde's implicit pairs against SciPy's Radau and BDF and against rampde_dopri5 (issue 12, item 5).

    python benchmarks/stiff.py                 # all problems, rtol 1e-6 (about 2-4 minutes here)
    python benchmarks/stiff.py --rtol 1e-8 --problems robertson40 hires

Each problem runs in fp64 through torchdiffeq's ``odeint`` (the rampde methods) and through
``scipy.integrate.solve_ivp`` (Radau, BDF, each with the analytic-free finite-difference Jacobian it
builds itself), side by side in one process.  The reference is SciPy's Radau at rtol 1e-12.  The
error is measured per component in units of the tolerance, ``|y - ref| / (rtol |ref| + atol)`` (its
max over the components), and as the max relative error.  ``rampde_dopri5`` gets a step cap: on
these problems it needs orders of magnitude more steps, and the row says where it stopped.
Writes ``benchmarks/results/stiff-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

F64 = torch.float64


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2], dim=-1)


def van_der_pol(mu):
    def f(t, y):
        y1, y2 = y.unbind(-1)
        return torch.stack([y2, mu * (1 - y1 * y1) * y2 - y1], dim=-1)
    return f


def hires(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    return torch.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ], dim=-1)


PROBLEMS = {
    # name: (f, y0, t_end, atol)
    "robertson40": (robertson, [1.0, 0.0, 0.0], 40.0, 1e-10),
    "robertson1e5": (robertson, [1.0, 0.0, 0.0], 1e5, 1e-10),
    "vdpol1000": (van_der_pol(1000.0), [2.0, 0.0], 500.0, 1e-8),
    "hires": (hires, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057], 321.8122, 1e-10),
}


def _scipy(f, y0, t_end, method, rtol, atol):
    from scipy.integrate import solve_ivp

    fun = lambda t, y: f(t, torch.from_numpy(y)).numpy()  # noqa: E731
    t0 = time.perf_counter()
    sol = solve_ivp(fun, (0.0, t_end), y0, method=method, rtol=rtol, atol=atol)
    return {"time_s": time.perf_counter() - t0, "y": sol.y[:, -1].tolist(), "steps": int(sol.t.shape[0] - 1),
            "nfe": int(sol.nfev), "ok": bool(sol.success), "note": "" if sol.success else sol.message}


def _rampde(f, y0, t_end, method, rtol, atol, max_steps):
    from torchdiffeq import odeint

    import rampde_plugins

    opts = {"max_num_steps": max_steps} if max_steps else {}
    t0 = time.perf_counter()
    note, ok = "", True
    try:
        with rampde_plugins.collect_stats() as stats:
            y = odeint(f, torch.tensor(y0, dtype=F64), torch.tensor([0.0, t_end], dtype=F64), method=method,
                       rtol=rtol, atol=atol, options=opts)[-1].tolist()
        rec = stats.last
        steps, nfe = rec.n_steps, rec.forward_nfe
    except (AssertionError, RuntimeError) as exc:  # torchdiffeq's max_num_steps is an AssertionError
        y, steps, nfe, ok, note = [math.nan] * len(y0), max_steps, None, False, f"stopped: {str(exc)[:60]}"
    return {"time_s": time.perf_counter() - t0, "y": y, "steps": steps, "nfe": nfe, "ok": ok, "note": note}


def _errors(y, ref, rtol, atol):
    y, ref = np.asarray(y, dtype=float), np.asarray(ref, dtype=float)
    if not np.all(np.isfinite(y)):
        return math.nan, math.nan
    units = np.abs(y - ref) / (rtol * np.abs(ref) + atol)
    rel = np.abs(y - ref) / np.maximum(np.abs(ref), 1e-300)
    return float(units.max()), float(rel.max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--dopri5-max-steps", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where the results files go")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small states: threads only add overhead
    load = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, load average {load[0]:.2f}; rtol {args.rtol}", flush=True)
    rows = []
    for name in args.problems:
        f, y0, t_end, atol = PROBLEMS[name]
        ref = _scipy(f, y0, t_end, "Radau", 1e-12, atol * 1e-6)["y"]
        runs = {
            "rampde_kvaerno5": _rampde(f, y0, t_end, "rampde_kvaerno5", args.rtol, atol, None),
            "rampde_kvaerno3": _rampde(f, y0, t_end, "rampde_kvaerno3", args.rtol, atol, None),
            "rampde_trbdf2": _rampde(f, y0, t_end, "rampde_trbdf2", args.rtol, atol, None),
            "scipy Radau": _scipy(f, y0, t_end, "Radau", args.rtol, atol),
            "scipy BDF": _scipy(f, y0, t_end, "BDF", args.rtol, atol),
            "rampde_dopri5": _rampde(f, y0, t_end, "rampde_dopri5", args.rtol, atol, args.dopri5_max_steps),
        }
        for method, r in runs.items():
            units, rel = _errors(r["y"], ref, args.rtol, atol)
            row = {"problem": name, "method": method, "rtol": args.rtol, "atol": atol, **r,
                   "err_in_tol_units": units, "max_rel_err": rel}
            rows.append(row)
            print(f"{name:13s} {method:16s} steps {str(r['steps']):>6s}  nfe {str(r['nfe']):>7s}  "
                  f"{r['time_s']:7.2f} s  error {units:8.3g} x tol, max rel {rel:8.3g}  {r['note']}", flush=True)
    md = [f"rtol {args.rtol}; error = max over components of |y - ref| / (rtol |ref| + atol); reference: SciPy "
          f"Radau at rtol 1e-12. threads {torch.get_num_threads()}, load average {load[0]:.2f}.", "",
          "| problem | method | steps | f evals | time s | error (x tol) | max rel error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['problem']} | {r['method']} | {r['steps']} | {r['nfe']} | {r['time_s']:.2f} | "
                  f"{r['err_in_tol_units']:.3g} | {r['max_rel_err']:.3g} |" + (f" {r['note']}" if r["note"] else ""))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from _common import machine_info

    (out / "stiff-cpu.json").write_text(json.dumps({"machine": machine_info(torch.device("cpu")), "load_average": load,
                                                    "rows": rows}, indent=2))
    (out / "stiff-cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
