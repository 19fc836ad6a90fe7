"""The quadrature adjoint side by side with its peers: the Gauss--Legendre paper's width sweep, and
memory against the number of steps.

    python benchmarks/quadrature.py [--widths 50,200,1000,2000] [--repeats 3] [--steps 100,1000,10000] [--out DIR]

Sweep (Norcliffe & Deisenroth's setting): state 2, batch 16, ``dz/dt = MLP(z)`` with two hidden layers
of width W (4M parameters at W = 2000), t in [0, 1], dopri5 at rtol = atol = 1e-5, fp32, loss = mean
squared distance of z(1) to a fixed target.  Per width, in one process: time per forward+backward of
torchdiffeq's direct backprop, torchdiffeq ``odeint_adjoint`` (with and without the seminorm),
rampde's discrete adjoint (``odeint(method="rampde_dopri5")``) and rampde's quadrature adjoint
(``odeint_adjoint(method="rampde_dopri5")``), each with its parameter-gradient error relative to an fp64
direct backprop at rtol = 1e-9.

Memory: rk4 on a fixed grid of N steps (W = 50): the peak bytes autograd keeps saved
(``SavedTensorMeter``, unique storages, parameters excluded) over forward and backward.

Writes quadrature-cpu.{md,json,png} to benchmarks/results (or --out); prints the thread count and
load average (absolute times on a shared machine are noise: read the ratios).  The methods of one width
are timed round by round (each repeat runs every method once), so a change in the machine's load
falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchdiffeq

import rampde_plugins
from rampde_plugins import collect_stats
from rampde_plugins._stats import SavedTensorMeter

OUT = Path(__file__).resolve().parent / "results"
METHODS = ("direct", "td_adjoint", "td_adjoint_seminorm", "rampde_discrete", "rampde_quadrature")


class Field(torch.nn.Module):
    def __init__(self, width: int, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(width)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                       torch.nn.Tanh(), torch.nn.Linear(width, 2))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) / max(p.shape[-1], 1) ** 0.5)
        self.to(dtype)

    def forward(self, t, z):
        return self.net(z)


def run_once(kind: str, f: Field, z0, target, rtol, atol):
    t = torch.tensor([0.0, 1.0], dtype=z0.dtype)
    for p in f.parameters():
        p.grad = None
    if kind == "direct":
        z = torchdiffeq.odeint(f, z0, t, method="dopri5", rtol=rtol, atol=atol)
    elif kind == "td_adjoint":
        z = torchdiffeq.odeint_adjoint(f, z0, t, method="dopri5", rtol=rtol, atol=atol)
    elif kind == "td_adjoint_seminorm":
        z = torchdiffeq.odeint_adjoint(f, z0, t, method="dopri5", rtol=rtol, atol=atol, adjoint_options=dict(norm="seminorm"))
    elif kind == "rampde_discrete":
        z = torchdiffeq.odeint(f, z0, t, method="rampde_dopri5", rtol=rtol, atol=atol)
    else:
        z = torchdiffeq.odeint_adjoint(f, z0, t, method="rampde_dopri5", rtol=rtol, atol=atol)
    ((z[-1] - target) ** 2).mean().backward()
    return torch.cat([p.grad.reshape(-1).double() for p in f.parameters()])


def sweep(widths, repeats, rtol=1e-5):
    rows = []
    for w in widths:
        g = torch.Generator().manual_seed(1)
        z0 = torch.randn(16, 2, generator=g)
        target = torch.randn(16, 2, generator=g)
        f64 = Field(w, torch.float64)
        ref = run_once("direct", f64, z0.double(), target.double(), 1e-9, 1e-9)
        f = Field(w)
        row = {"width": w, "params": sum(p.numel() for p in f.parameters())}
        times = {kind: [] for kind in METHODS}
        for _ in range(repeats):
            for kind in METHODS:
                with collect_stats() as st:
                    t0 = time.perf_counter()
                    grad = run_once(kind, f, z0, target, rtol, rtol)
                    times[kind].append(time.perf_counter() - t0)
                row[kind] = {"grad_error": float((grad - ref).norm() / ref.norm())}
                if st.records:
                    r = st.records[0]
                    row[kind].update(forward_nfe=r.forward_nfe, backward_nfe=r.backward_nfe,
                                     quadrature_nodes=r.quadrature_nodes, quadrature_calls=r.quadrature_calls)
        for kind in METHODS:
            row[kind]["seconds"] = statistics.median(times[kind])
            row[kind]["all_seconds"] = times[kind]
            nfe = (f"  NFE fwd {row[kind]['forward_nfe']} bwd {row[kind]['backward_nfe']}"
                   if "forward_nfe" in row[kind] else "")
            print(f"W={w:5d} {kind:22s} {row[kind]['seconds']:8.3f} s  rel. grad error {row[kind]['grad_error']:.2e}{nfe}",
                  flush=True)
        rows.append(row)
    return rows


def plot(rows, path: Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    params = [r["params"] for r in rows]
    for kind in METHODS:
        ax.plot(params, [r[kind]["seconds"] for r in rows], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (MLP 2-W-W-2, W = " + ", ".join(str(r["width"]) for r in rows) + ")")
    ax.set_ylabel("seconds per forward + backward (median)")
    ax.set_title(f"dopri5, rtol = atol = 1e-5, batch 16, fp32; {machine['cpu']}, {machine['threads']} threads",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory(steps_list, width=50):
    rows = []
    f = Field(width)
    g = torch.Generator().manual_seed(2)
    z0, target = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.tensor([0.0, 1.0])
    calls = {
        "td_adjoint": lambda h: torchdiffeq.odeint_adjoint(f, z0, t, method="rk4", options={"step_size": h}),
        "rampde_quadrature": lambda h: torchdiffeq.odeint_adjoint(f, z0, t, method="rampde_rk4", options={"step_size": h}),
        # one node per VJP: the minimum (the default batches 16 nodes of this batch of 16: their graph)
        "rampde_quadrature_nb1": lambda h: torchdiffeq.odeint_adjoint(f, z0, t, method="rampde_rk4", options={"step_size": h},
                                                                      adjoint_options={"step_size": h, "node_batch": 1}),
        "rampde_discrete": lambda h: torchdiffeq.odeint(f, z0, t, method="rampde_rk4", options={"step_size": h}),
    }
    for n in steps_list:
        row = {"steps": n}
        for kind, call in calls.items():
            with SavedTensorMeter(unique=True, exclude=tuple(f.parameters())) as meter:
                z = call(1.0 / n)
                ((z[-1] - target) ** 2).mean().backward()
            row[kind] = meter.peak
            print(f"N={n:6d} {kind:18s} peak saved {meter.peak / 1024:10.1f} KiB", flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="50,200,1000,2000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", default="100,1000,10000")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    out = args.out
    load = os.getloadavg()
    machine = {"torch": torch.__version__, "torchdiffeq": getattr(torchdiffeq, "__version__", "?"),
               "rampde_plugins": rampde_plugins.__version__, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "load_before": [round(x, 2) for x in load]}
    print(machine, flush=True)
    widths = [int(x) for x in args.widths.split(",") if x]
    sw = sweep(widths, args.repeats)
    mem = memory([int(x) for x in args.steps.split(",") if x])
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "quadrature-cpu.json").write_text(json.dumps({"machine": machine, "sweep": sw, "memory": mem}, indent=1))
    plot(sw, out / "quadrature-cpu.png", machine)
    lines = [f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, torchdiffeq "
             f"{machine['torchdiffeq']}; load average {machine['load_before'][0]} before, {machine['load_after'][0]} after.",
             "", f"Seconds per forward+backward (median of {args.repeats} rounds) and relative parameter-gradient error "
             "against fp64 direct backprop at rtol 1e-9; last columns: the quadrature adjoint's speed-up over torchdiffeq's "
             "`odeint_adjoint` and over rampde's discrete adjoint, and the backward evaluations of the two rampde adjoints "
             "(discrete: recomputed steps; quadrature: the [x, a] solves plus the nodes, nodes/VJP calls).", "",
             "| width | params | " + " | ".join(METHODS) + " | quadrature vs td_adjoint | quadrature vs discrete "
             "| bwd NFE discrete / quadrature (nodes/calls) |", "|" + "---|" * (len(METHODS) + 5)]
    for r in sw:
        cells = [f"{r[k]['seconds']:.3f} s ({r[k]['grad_error']:.1e})" for k in METHODS]
        q, d = r["rampde_quadrature"], r["rampde_discrete"]
        lines.append(f"| {r['width']} | {r['params']:,} | " + " | ".join(cells)
                     + f" | {r['td_adjoint']['seconds'] / q['seconds']:.1f}x | {d['seconds'] / q['seconds']:.2f}x "
                     f"| {d['backward_nfe']} / {q['backward_nfe']} ({q['quadrature_nodes']}/{q['quadrature_calls']}) |")
    lines += ["", "Peak bytes saved for autograd over forward+backward (rk4, fixed grid of N steps, W = 50):", "",
              "| N | td_adjoint | rampde_quadrature | rampde_quadrature (node_batch=1) | rampde_discrete |",
              "|---|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['steps']} | {r['td_adjoint'] / 1024:.1f} KiB | {r['rampde_quadrature'] / 1024:.1f} KiB | "
                     f"{r['rampde_quadrature_nb1'] / 1024:.1f} KiB | {r['rampde_discrete'] / 1024:.1f} KiB |")
    (out / "quadrature-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
