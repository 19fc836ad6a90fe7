"""The main job: learn a spiral's dynamics with a neural ODE, rampde vs torchdiffeq, side by side.

    python benchmarks/train.py                 # CPU: bf16 policy, about a minute on 2 quiet cores
    python benchmarks/train.py --device cuda   # CUDA: fp16 policy

Data are generated, nothing is downloaded: the ground truth is the cubic spiral
``y' = (y**3) A`` with ``A = [[-0.1, 2], [-2, -0.1]]``, integrated in float64.  An MLP ``f(y**3)``
(two hidden layers, 512 wide: the size at which a CPU's bf16 matrix units pay for the casts) is
trained (mean squared error) on random trajectory segments twice from the same initialisation: once
with ``torchdiffeq.odeint(..., method="rampde_rk4")`` under the device's low-precision policy and the
default schedule, once with torchdiffeq's own ``rk4`` in fp32 (direct backprop).

The summary compares final loss, time per iteration, the gradient's error against an fp64 reference
and the fit; then *where rampde wins*: one training iteration of each configuration (torchdiffeq fp32
and autocast, rampde's default schedule and ``checkpoint="graphs"``), timed side by side in this
process (rounds interleaved) and measured for memory both ways -- on the CPU the peak RSS growth in a
child process that returns freed memory to the system (``MALLOC_MMAP_THRESHOLD_=65536``) and the
bytes of live tensors, on CUDA ``max_memory_allocated`` -- each as a ratio to torchdiffeq fp32, with a
verdict per configuration.  The thread count (chosen from the free cores: ``--threads``) and the load
average are printed and drawn in the PNG with the fits, the loss curves and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rampde_plugins  # noqa: E402  (activates the torchdiffeq adapter)
from _common import (  # noqa: E402
    choose_threads, current_rss_bytes, default_precision, machine_info, peak_rss_bytes, rel_err, release_free_memory,
    reset_peak_rss,
    round_robin,
)

A_TRUE = [[-0.1, 2.0], [-2.0, -0.1]]


class ODEFunc(torch.nn.Module):
    def __init__(self, hidden: int, layers: int = 2):
        super().__init__()
        mods = [torch.nn.Linear(2, hidden), torch.nn.Tanh()]
        for _ in range(layers - 1):
            mods += [torch.nn.Linear(hidden, hidden), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*mods, torch.nn.Linear(hidden, 2))

    def forward(self, t, y):
        return self.net(y**3)


def ground_truth(n_points: int, t_end: float):
    t = torch.linspace(0.0, t_end, n_points, dtype=torch.float64)
    a = torch.tensor(A_TRUE, dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        y = odeint(lambda t, y: (y**3) @ a, y0, t, method="dopri5", rtol=1e-10, atol=1e-12)
    return t, y[:, 0, :]  # (n_points, 2)


def batches(t, y, batch: int, seg: int, iters: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        start = torch.randint(0, t.shape[0] - seg, (batch,), generator=g)
        idx = start[None, :] + torch.arange(seg)[:, None]  # (seg, batch)
        yield y[start], t[:seg] - t[0], y[idx]


def run_solver(kind: str, func, y0, t, steps_per_seg: int, precision: str | None, checkpoint=None):
    """One solve: ``kind`` is "rampde" (rampde_rk4 under ``precision``, ``checkpoint`` its schedule),
    "torchdiffeq" (rk4 in the inputs' dtype) or "autocast" (rk4 under torch's autocast)."""
    step = float(t[-1] - t[0]) / steps_per_seg
    if kind == "rampde":
        options = {"step_size": step, "precision": precision}
        if checkpoint is not None:
            options["checkpoint"] = checkpoint
        return odeint(func, y0, t, method="rampde_rk4", options=options)
    if kind == "autocast":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        with torch.autocast(y0.device.type, dtype=dtype):
            return odeint(func, y0, t, method="rk4", options={"step_size": step}).float()
    return odeint(func, y0, t, method="rk4", options={"step_size": step})


def train(kind, args, device, data, init_state, precision, progress=True):
    from tqdm import tqdm

    t, y = data
    torch.manual_seed(args.seed)
    func = ODEFunc(args.hidden, args.layers).to(device)
    func.load_state_dict(init_state)
    opt = torch.optim.Adam(func.parameters(), lr=args.lr)
    losses, times = [], []
    label = f"rampde_rk4 {precision}" if kind == "rampde" else "torchdiffeq rk4 fp32"
    bar = tqdm(batches(t, y, args.batch, args.seg, args.iters, args.seed), total=args.iters, desc=f"{label:>22s}",
               disable=not progress, leave=True, file=sys.stdout, mininterval=0.2 if sys.stdout.isatty() else 10.0)
    for y0_b, t_b, y_b in bar:
        y0_b, t_b, y_b = y0_b.float().to(device), t_b.float().to(device), y_b.float().to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        pred = run_solver(kind, func, y0_b, t_b, args.steps, precision)
        loss = (pred - y_b).square().mean()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.5f}", refresh=False)
    return func, losses, times


def gradient_errors(func, device, batch, precision, steps):
    """Gradient of one batch's loss at the same parameters: ours and torchdiffeq fp32 vs fp64."""
    y0_b, t_b, y_b = batch

    def grads(kind, dtype, prec):
        f = copy.deepcopy(func).to(device, dtype)
        pred = run_solver(kind, f, y0_b.to(device, dtype), t_b.to(device, dtype), steps, prec)
        loss = (pred - y_b.to(device, dtype)).square().mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(f.parameters()))])

    ref = grads("rampde", torch.float64, "fp64")
    return rel_err(grads("rampde", torch.float32, precision), ref), rel_err(grads("torchdiffeq", torch.float32, None), ref)


def fit_error(func, data, device, steps_per_unit=40):
    t, y = data
    with torch.no_grad():
        f = copy.deepcopy(func).to(device, torch.float64)
        pred = odeint(f, y[:1].to(device), t.to(device), method="rampde_rk4",
                      options={"step_size": 1.0 / steps_per_unit, "precision": "fp64"})[:, 0, :].cpu()
    return float((pred - y).abs().mean()), pred


# -- where rampde wins: one iteration of each configuration, time and memory ---------------------------
def configurations(precision: str) -> dict[str, tuple[str, str | None, object]]:
    """label -> (kind, policy, checkpoint) of the side-by-side comparison; the first is the baseline."""
    return {
        "torchdiffeq rk4 fp32": ("torchdiffeq", None, None),
        f"torchdiffeq rk4 autocast {precision}": ("autocast", precision, None),
        f"rampde_rk4 {precision} (default)": ("rampde", precision, None),
        f"rampde_rk4 {precision} graphs": ("rampde", precision, "graphs"),
    }


def _iteration(func, batch, kind, precision, checkpoint, steps, device) -> None:
    y0_b, t_b, y_b = (x.float().to(device) for x in batch)
    func.zero_grad(set_to_none=True)
    pred = run_solver(kind, func, y0_b, t_b, steps, precision, checkpoint)
    (pred - y_b).square().mean().backward()


def time_configurations(func, batch, precision, steps, device, rounds: int) -> dict[str, list[float]]:
    """Seconds per iteration of every configuration, rounds interleaved (:func:`_common.round_robin`)."""
    fns = {label: (lambda kind=kind, prec=prec, ck=ck: _iteration(func, batch, kind, prec, ck, steps, device))
           for label, (kind, prec, ck) in configurations(precision).items()}
    return round_robin(fns, rounds, sync=torch.cuda.synchronize if device.type == "cuda" else None)


def memory_probe(spec: dict) -> dict[str, dict[str, int]]:
    """In this process: for every configuration, one warm-up iteration, then the peak RSS growth of
    one iteration (VmHWM after a reset, minus the RSS before; meaningful when the process was started
    with ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed memory is returned to the system) and the
    peak of the tensor storages alive during another (on CUDA: ``max_memory_allocated`` growth)."""
    from live_memory import LiveTensorMeter

    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    func = ODEFunc(spec["hidden"], spec["layers"]).to(device)
    batch = tuple(torch.tensor(x) for x in spec["batch"])
    out = {}
    for label, (kind, prec, ck) in configurations(spec["precision"]).items():
        run = lambda: _iteration(func, batch, kind, prec, ck, spec["steps"], device)  # noqa: E731
        run()
        func.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run()
            torch.cuda.synchronize()
            out[label] = {"cuda_peak_bytes": torch.cuda.max_memory_allocated(device) - base}
            continue
        release_free_memory()
        reset_peak_rss()
        before = current_rss_bytes()
        run()
        peak, _ = peak_rss_bytes()
        func.zero_grad(set_to_none=True)
        meter = LiveTensorMeter()
        with meter:
            run()
        out[label] = {"rss_peak_bytes": peak - before, "live_tensor_peak_bytes": meter.peak}
    return out


def measure_memory(args, device, batch, precision, threads: int) -> dict[str, dict[str, int]]:
    """:func:`memory_probe` in a child process on the CPU (the allocator's setting must be there
    before the process starts), in this one on CUDA."""
    spec = {"device": device.type, "seed": args.seed, "hidden": args.hidden, "layers": args.layers,
            "steps": args.steps, "precision": precision, "batch": [x.tolist() for x in batch]}
    if device.type == "cuda":
        return memory_probe(spec)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verdict(time_ratio: float, memory_ratios: list[float]) -> str:
    """What a configuration wins against torchdiffeq fp32 (ratios below 1 win)."""
    wins_time, wins_memory = time_ratio < 1.0, all(r < 1.0 for r in memory_ratios)
    if wins_time and wins_memory:
        return "wins time and memory"
    if wins_memory:
        return f"wins memory, not time ({time_ratio:.2f}x)"
    if wins_time:
        return "wins time, not memory"
    return "wins neither"


def plot(path, data, preds, curves, wins, settings: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, y = data
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    ax1.plot(y[:, 0], y[:, 1], "k-", lw=2.5, alpha=0.35, label="ground truth")
    for (label, pred), style in zip(preds.items(), ["C0-", "C3--"]):
        ax1.plot(pred[:, 0], pred[:, 1], style, lw=1.2, label=f"learned: {label}")
    ax1.set_title("phase portrait: learned dynamics from y(0)")
    ax1.set_xlabel("y1")
    ax1.set_ylabel("y2")
    # Outside the axes: the spiral fills its box, a legend inside would cover the data.
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2, frameon=False)
    for (label, losses), (color, ls, lw) in zip(curves.items(), [("C0", "-", 2.4), ("C3", "--", 1.2)]):
        k = max(1, len(losses) // 50)
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1) if len(losses) >= k else torch.tensor(losses)
        ax2.plot(range(len(smooth)), smooth, color=color, ls=ls, lw=lw, label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("training loss (moving average)")
    ax2.set_title("loss curves")
    ax2.legend(fontsize=8, loc="upper right")
    # Where rampde wins: every configuration's ratios to torchdiffeq fp32 (log scale; < 1 wins).
    labels = list(wins)
    measures = [k for k in ("time", "rss", "live", "cuda") if k in next(iter(wins.values()))]
    names = {"time": "time / iteration", "rss": "peak RSS (freed memory returned)", "live": "live tensors",
             "cuda": "CUDA max_memory_allocated"}
    height = 0.8 / len(measures)
    for j, m in enumerate(measures):
        ys = [i + (j - (len(measures) - 1) / 2) * height for i in range(len(labels))]
        vals = [wins[label][m] for label in labels]
        ax3.barh(ys, vals, height=height, color=f"C{j + 2}", label=names[m])
        for yy, v in zip(ys, vals):
            ax3.text(v, yy, f" {v:.3g}x", va="center", fontsize=7)
    ax3.axvline(1.0, color="k", lw=0.8)
    ax3.set_xscale("log")
    ax3.set_yticks(range(len(labels)))
    ax3.set_yticklabels(labels, fontsize=8)
    ax3.invert_yaxis()
    ax3.set_xlabel("ratio to torchdiffeq rk4 fp32 (< 1: rampde wins)")
    ax3.set_title("one training iteration, side by side")
    ax3.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=1, frameon=False)
    if settings:
        fig.suptitle(settings, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    p.add_argument("--precision", default=None, help="rampde policy (default: bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="RK4 steps per training segment")
    p.add_argument("--iters", type=int, default=160, help="training iterations per solver")
    p.add_argument("--batch", type=int, default=128, help="segments per batch")
    p.add_argument("--hidden", type=int, default=512, help="width of the MLP's hidden layers")
    p.add_argument("--layers", type=int, default=2, help="hidden layers of the MLP")
    p.add_argument("--seg", type=int, default=10, help="data points per segment")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t-end", type=float, default=10.0, help="length of the ground-truth trajectory")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the side-by-side timing")
    p.add_argument("--out", default="out/train", help="output folder (plot and JSON)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", default="auto", help="torch threads: 'auto' (the cores the load leaves free) or N")
    p.add_argument("--record", action="store_true",
                   help="also write the summary to benchmarks/results/train-cpu.{md,json} (the README's numbers)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # (the child process)
    args = p.parse_args(argv)
    for name in ("steps", "iters", "batch", "hidden", "layers", "seg", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_probe is not None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return {}
    threads, why = choose_threads(args.threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # (this program's own setting, put back at the end)
    print(f"threads: {why}", flush=True)
    try:
        return _main(args, threads, why)
    finally:
        torch.set_num_threads(before)


def _main(args, threads: int, why: str) -> dict:
    start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    precision = args.precision or default_precision(device)
    rampde_plugins.resolve_policy(precision, device_type=device.type)  # clear error for a bad name/device
    data = ground_truth(400, args.t_end)
    torch.manual_seed(args.seed)
    init_state = ODEFunc(args.hidden, args.layers).to(device).state_dict()
    results, preds, curves = {}, {}, {}
    eval_batch = next(batches(*data, args.batch, args.seg, 1, args.seed + 1))
    for kind, prec in (("rampde", precision), ("torchdiffeq", None)):
        func, losses, times = train(kind, args, device, data, init_state, prec, progress=not args.no_progress)
        label = f"rampde_rk4 {prec}" if kind == "rampde" else "torchdiffeq rk4 fp32"
        skip = min(5, len(times) - 1)  # warm-up iterations
        fit, pred = fit_error(func, data, device)
        results[label] = {
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "time_per_iter_ms": 1e3 * sorted(times[skip:])[len(times[skip:]) // 2],
            "trajectory_fit_mae": fit,
        }
        preds[label], curves[label] = pred, losses
    # Gradient error against fp64 at the shared initialisation (a gradient that matters) and at the
    # end (where the residual approaches bf16's resolution of the state, ~4e-3 * |y|).
    ours, host = (results[k] for k in results)
    init_func = ODEFunc(args.hidden, args.layers).to(device)
    init_func.load_state_dict(init_state)
    for where, f in (("init", init_func), ("end", func)):
        g_ours, g_host = gradient_errors(f, device, eval_batch, precision, args.steps)
        ours[f"grad_rel_error_vs_fp64_{where}"], host[f"grad_rel_error_vs_fp64_{where}"] = g_ours, g_host

    phases = {"training_and_checks_s": time.perf_counter() - start}
    # Where rampde wins: time side by side (this process), memory both ways (a child process on the CPU).
    t0 = time.perf_counter()
    times = time_configurations(init_func, eval_batch, precision, args.steps, device, args.rounds)
    phases["side_by_side_timing_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    memory = measure_memory(args, device, eval_batch, precision, threads)
    phases["memory_probe_s"] = time.perf_counter() - t0
    base_label = next(iter(times))
    base_t = statistics.median(times[base_label])
    wins, side = {}, {}
    for label in times:
        t_med = statistics.median(times[label])
        mem = memory[label]
        ratios = {"time": t_med / base_t}
        if device.type == "cuda":
            ratios["cuda"] = mem["cuda_peak_bytes"] / max(1, memory[base_label]["cuda_peak_bytes"])
        else:
            ratios["rss"] = mem["rss_peak_bytes"] / max(1, memory[base_label]["rss_peak_bytes"])
            ratios["live"] = mem["live_tensor_peak_bytes"] / max(1, memory[base_label]["live_tensor_peak_bytes"])
        wins[label] = ratios
        side[label] = {"ms_per_iter_median": 1e3 * t_med, "ms_per_iter_min": 1e3 * min(times[label]), **mem,
                       "ratios_to_torchdiffeq_fp32": ratios,
                       "verdict": "baseline" if label == base_label else
                       verdict(ratios["time"], [v for k, v in ratios.items() if k != "time"])}

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "",
        f"{'training':28s}{'final loss':>11s}{'ms/iter':>9s}{'grad err (init/end vs fp64)':>29s}{'fit MAE':>9s}",
    ]
    for label, r in results.items():
        lines.append(f"{label:28s}{r['final_loss']:11.2e}{r['time_per_iter_ms']:9.1f}"
                     f"{r['grad_rel_error_vs_fp64_init']:19.1e} /{r['grad_rel_error_vs_fp64_end']:8.1e}{r['trajectory_fit_mae']:9.4f}")
    lines.append(f"training time per iteration, rampde / torchdiffeq: {ours['time_per_iter_ms'] / host['time_per_iter_ms']:.2f}x")
    lines.append("")
    mem_cols = ("CUDA peak MB",) if device.type == "cuda" else ("peak RSS MB", "live MB")
    lines.append(f"{'where rampde wins (one iteration)':36s}{'ms':>8s}{'time':>7s}" + "".join(f"{c:>14s}" for c in mem_cols)
                 + "   verdict vs torchdiffeq fp32")
    for label, r in side.items():
        rat = r["ratios_to_torchdiffeq_fp32"]
        cols = ([f"{r['cuda_peak_bytes'] / 2**20:7.1f} {rat['cuda']:5.3f}x"] if device.type == "cuda" else
                [f"{r['rss_peak_bytes'] / 2**20:7.1f} {rat['rss']:5.3f}x", f"{r['live_tensor_peak_bytes'] / 2**20:7.1f} {rat['live']:5.3f}x"])
        lines.append(f"{label:36s}{r['ms_per_iter_median']:8.1f}{rat['time']:6.2f}x" + "".join(f"{c:>14s}" for c in cols)
                     + f"   {r['verdict']}")
    winners = [label for label, r in side.items() if label.startswith("rampde") and r["verdict"] == "wins time and memory"]
    lines.append(("rampde wins time and memory in: " + ", ".join(winners)) if winners else
                 "no rampde configuration wins both time and memory here (a larger field or batch favours the "
                 "low-precision matrix units; see the ratios above)")
    memory_note = ("CUDA max_memory_allocated growth" if device.type == "cuda" else
                   "peak RSS growth in a child process with MALLOC_MMAP_THRESHOLD_=65536 (freed memory returned), "
                   "and the peak of live tensor storages")
    lines.append(f"memory: {memory_note}; time: median of {args.rounds} interleaved rounds")
    elapsed = time.perf_counter() - start
    machine = (f"{threads} torch threads ({why}); load average {load_start[0]:.2f} at the start, "
               f"{load_end[0]:.2f} at the end; {elapsed:.0f} s")
    lines.append(f"machine: {machine}")
    out = Path(args.out)
    settings = (f"rampde_rk4 {precision} vs torchdiffeq rk4 fp32: {args.iters} iterations, {args.steps} RK4 steps, "
                f"{args.layers}x{args.hidden} MLP, batch {args.batch}, lr {args.lr}, seed {args.seed}, {device.type}\n"
                f"{threads} torch threads, load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    plot(out / "spiral_fit.png", data, preds, curves, wins, settings)
    summary = {"machine": {**machine_info(device), "threads_why": why, "load_average_start": list(load_start),
                           "load_average_end": list(load_end), "elapsed_s": elapsed, "phases": phases},
               "args": vars(args), "precision": precision, "results": results, "where_rampde_wins": side}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines.append(f"wrote {out / 'spiral_fit.png'} and {out / 'summary.json'}")
    print("\n".join(lines))
    if args.record:
        results_dir = Path(__file__).resolve().parent / "results"
        (results_dir / f"train-{device.type}.json").write_text(json.dumps(summary, indent=2))
        import shutil

        shutil.copyfile(out / "spiral_fit.png", results_dir / f"train-{device.type}.png")
        (results_dir / f"train-{device.type}.md").write_text(
            "```\n" + "\n".join(lines[1:-1]) + "\n```\n")
    return summary


if __name__ == "__main__":
    main()
