"""Memory of the solver's bookkeeping, per step, beyond the stored states (issue 10, item 5).

    python benchmarks/bookkeeping.py            # N = 10^4 and 10^5, fixed grid and adaptive

A 4x4 state, f(t, y) = -y A (so that storage is tiny and overhead shows), rampde_rk4 on a fixed grid
and rampde_dopri5 with a capped step (``max_step``) through torchdiffeq.  Each measurement runs in a fresh
subprocess: peak resident set during the forward (``VmHWM`` after a reset) minus the resident set
before it.  With a graph the solve keeps its stored states (``SolveStats.stored_bytes``); what remains,
divided by N, is the bookkeeping per step.  Under ``no_grad`` nothing is stored and the growth must
not depend on N.  Writes ``benchmarks/results/bookkeeping-cpu.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker(spec):
    sys.path.insert(0, str(HERE))
    import torch
    from torchdiffeq import odeint

    import rampde_plugins
    from _common import current_rss_bytes, peak_rss_bytes, release_free_memory, reset_peak_rss

    torch.set_num_threads(1)
    n = spec["n"]
    a = (-0.5 * torch.eye(4)).requires_grad_(spec["grad"])
    y0 = torch.ones(4, 4)
    t = torch.tensor([0.0, 1.0])
    if spec["method"] == "rampde_rk4":
        opts = {"step_size": 1.0 / n, "precision": "fp32", "adjoint_params": (a,)}
        kw = {}
    else:
        opts = {"max_step": 1.0 / n, "first_step": 1.0 / n, "precision": "fp32", "adjoint_params": (a,)}
        kw = {"rtol": 1e-3, "atol": 1e-3}

    def field(t, y):
        return y @ a

    with torch.set_grad_enabled(spec["grad"]):
        odeint(field, y0, t, method=spec["method"], options={**opts, **({"step_size": 0.25} if "step_size" in opts else
                                                                       {"max_step": 0.25, "first_step": 0.25})}, **kw)
        release_free_memory()
        reset_peak_rss()
        before = current_rss_bytes()
        with rampde_plugins.collect_stats() as stats:
            y = odeint(field, y0, t, method=spec["method"], options=opts, **kw)
        peak, _ = peak_rss_bytes()
    rec = stats.last
    return {"growth_bytes": peak - before, "stored_bytes": rec.stored_bytes, "steps": rec.n_steps,
            "requires_grad": bool(y.requires_grad)}


def marginal(rows) -> str:
    """Bytes per additional step between N = 10^4 and 10^5, beyond the additional stored states: the
    fixed overheads of a solve (allocator arenas, the first chunk) cancel out."""
    out = ["", "| method | graph | marginal bytes per step beyond the stored states (10^4 -> 10^5) |", "|---|---|---|"]
    for method in sorted({r["method"] for r in rows}):
        for grad in (True, False):
            lo, hi = (next(r for r in rows if r["method"] == method and r["grad"] == grad and r["n"] == n)
                      for n in (10_000, 100_000))
            per = ((hi["growth_bytes"] - lo["growth_bytes"]) - (hi["stored_bytes"] - lo["stored_bytes"])) / (hi["steps"] - lo["steps"])
            out.append(f"| {method} | {'yes' if grad else 'no_grad'} | {per:.1f} |")
    return "\n".join(out)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--summarize":
        print(marginal(json.loads((HERE / "results" / "bookkeeping-cpu.json").read_text())["rows"]))
        return
    rows = []
    for method in ("rampde_rk4", "rampde_dopri5"):
        for grad in (True, False):
            for n in (10_000, 100_000):
                spec = {"method": method, "grad": grad, "n": n}
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(spec)
                r["overhead_per_step_bytes"] = (r["growth_bytes"] - r["stored_bytes"]) / r["steps"]
                rows.append(r)
                print(f"{method:14s} grad={grad!s:5s} N={r['steps']:>7d}  RSS growth {r['growth_bytes'] / 2**20:8.2f} MiB  "
                      f"stored {r['stored_bytes'] / 2**20:7.2f} MiB  overhead {r['overhead_per_step_bytes']:7.1f} B/step",
                      file=sys.stderr)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f}; RSS page granularity 4 KiB; glibc may keep freed memory")
    print("| method | graph | N | RSS growth MiB | stored MiB | (growth - stored) / N, bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {'yes' if r['grad'] else 'no_grad'} | {r['steps']} | {r['growth_bytes'] / 2**20:.2f} | "
              f"{r['stored_bytes'] / 2**20:.2f} | {r['overhead_per_step_bytes']:.1f} |")
    print(marginal(rows))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bookkeeping-cpu.json").write_text(json.dumps({"rows": rows, "load_average": load}, indent=2))


if __name__ == "__main__":
    main()
