"""The main job: learn a spiral's dynamics with a neural ODE, rampde vs torchdiffeq, side by side.

    python benchmarks/train.py                 # CPU: bf16 policy, about a minute on 2 cores
    python benchmarks/train.py --device cuda   # CUDA: fp16 policy

Data are generated, nothing is downloaded: the ground truth is the cubic spiral
``y' = (y**3) A`` with ``A = [[-0.1, 2], [-2, -0.1]]``, integrated in float64.  A small MLP ``f(y**3)``
is trained (mean squared error) on random trajectory segments twice from the same initialisation: once with
``torchdiffeq.odeint(..., method="rampde_rk4")`` under the device's low-precision policy, once with
torchdiffeq's own ``rk4`` in fp32 (direct backprop).  The summary compares final loss, time per
iteration, autograd memory and the gradient's error against an fp64 reference; a PNG shows the fits
and loss curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rampde_plugins  # noqa: E402  (activates the torchdiffeq adapter)
from _common import SavedTensorMeter, choose_threads, default_precision, machine_info, rel_err  # noqa: E402

A_TRUE = [[-0.1, 2.0], [-2.0, -0.1]]


class ODEFunc(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))

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


def run_solver(kind: str, func, y0, t, steps_per_seg: int, precision: str):
    step = float(t[-1] - t[0]) / steps_per_seg
    if kind == "rampde":
        return odeint(func, y0, t, method="rampde_rk4", options={"step_size": step, "precision": precision})
    return odeint(func, y0, t, method="rk4", options={"step_size": step})


def train(kind, args, device, data, init_state, precision, progress=True):
    from tqdm import tqdm

    t, y = data
    torch.manual_seed(args.seed)
    func = ODEFunc(args.hidden).to(device)
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


def memory_of_one_iteration(kind, func, device, batch, precision, steps):
    y0_b, t_b, _ = batch
    y0_b, t_b = y0_b.float().to(device), t_b.float().to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_solver(kind, func, y0_b, t_b, steps, precision).square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with SavedTensorMeter() as meter:
        run_solver(kind, func, y0_b, t_b, steps, precision).square().mean().backward()
    return meter.peak


def gradient_errors(func, device, batch, precision, steps):
    """Gradient of one batch's loss at the same parameters: ours and torchdiffeq fp32 vs fp64."""
    y0_b, t_b, y_b = batch

    def grads(kind, dtype, prec):
        f = ODEFunc(func.net[0].out_features).to(device, dtype)
        f.load_state_dict(func.state_dict())
        pred = run_solver(kind, f, y0_b.to(device, dtype), t_b.to(device, dtype), steps, prec)
        loss = (pred - y_b.to(device, dtype)).square().mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(f.parameters()))])

    ref = grads("rampde", torch.float64, "fp64")
    return rel_err(grads("rampde", torch.float32, precision), ref), rel_err(grads("torchdiffeq", torch.float32, None), ref)


def fit_error(func, data, device, steps_per_unit=40):
    t, y = data
    with torch.no_grad():
        f = ODEFunc(func.net[0].out_features).to(device, torch.float64)
        f.load_state_dict(func.state_dict())
        pred = odeint(f, y[:1].to(device), t.to(device), method="rampde_rk4",
                      options={"step_size": 1.0 / steps_per_unit, "precision": "fp64"})[:, 0, :].cpu()
    return float((pred - y).abs().mean()), pred


def plot(path, data, preds, curves, settings: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, y = data
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.plot(y[:, 0], y[:, 1], "k-", lw=2.5, alpha=0.35, label="ground truth")
    for (label, pred), style in zip(preds.items(), ["C0-", "C3--"]):
        ax1.plot(pred[:, 0], pred[:, 1], style, lw=1.2, label=f"learned: {label}")
    ax1.set_title("phase portrait: learned dynamics from y(0)")
    ax1.set_xlabel("y1")
    ax1.set_ylabel("y2")
    # Outside the axes: the spiral fills its box, a legend inside would cover the data.
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=3, frameon=False)
    for (label, losses), (color, ls, lw) in zip(curves.items(), [("C0", "-", 2.4), ("C3", "--", 1.2)]):
        k = max(1, len(losses) // 50)
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1) if len(losses) >= k else torch.tensor(losses)
        ax2.plot(range(len(smooth)), smooth, color=color, ls=ls, lw=lw, label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("training loss (moving average)")
    ax2.set_title("loss curves")
    ax2.legend(fontsize=8, loc="upper right")
    if settings:
        fig.suptitle(settings, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    p.add_argument("--precision", default=None, help="rampde policy (default: bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--steps", type=int, default=20, help="RK4 steps per training segment")
    p.add_argument("--iters", type=int, default=500, help="training iterations per solver")
    p.add_argument("--batch", type=int, default=128, help="segments per batch")
    p.add_argument("--hidden", type=int, default=256, help="width of the MLP")
    p.add_argument("--seg", type=int, default=20, help="data points per segment")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t-end", type=float, default=10.0, help="length of the ground-truth trajectory")
    p.add_argument("--out", default="out/train", help="output folder (plot and JSON)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", default="auto", help="torch threads: 'auto' (the cores the load leaves free) or N")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads, why = choose_threads(args.threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # (this program's own setting, put back at the end)
    print(f"threads: {why}", flush=True)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(before)


def _main(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    precision = args.precision or default_precision(device)
    rampde_plugins.resolve_policy(precision, device_type=device.type)  # clear error for a bad name/device
    data = ground_truth(400, args.t_end)
    torch.manual_seed(args.seed)
    init_state = ODEFunc(args.hidden).to(device).state_dict()
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
            "autograd_memory_bytes" if device.type == "cpu" else "peak_cuda_memory_bytes":
                memory_of_one_iteration(kind, func, device, eval_batch, prec, args.steps),
            "trajectory_fit_mae": fit,
        }
        preds[label], curves[label] = pred, losses
    # Gradient error against fp64 at the shared initialisation (a gradient that matters) and at the
    # end (where the residual approaches bf16's resolution of the state, ~4e-3 * |y|).
    ours, host = (results[k] for k in results)
    init_func = ODEFunc(args.hidden).to(device)
    init_func.load_state_dict(init_state)
    for where, f in (("init", init_func), ("end", func)):
        g_ours, g_host = gradient_errors(f, device, eval_batch, precision, args.steps)
        ours[f"grad_rel_error_vs_fp64_{where}"], host[f"grad_rel_error_vs_fp64_{where}"] = g_ours, g_host

    mem_key = next(k for k in ours if "memory" in k)
    lines = [
        "",
        f"{'':24s}{'final loss':>11s}{'ms/iter':>9s}{'memory':>11s}{'grad err (init/end vs fp64)':>29s}{'fit MAE':>9s}",
    ]
    for label, r in results.items():
        lines.append(f"{label:24s}{r['final_loss']:11.2e}{r['time_per_iter_ms']:9.1f}{r[mem_key] / 2**20:9.2f}MB"
                     f"{r['grad_rel_error_vs_fp64_init']:19.1e} /{r['grad_rel_error_vs_fp64_end']:8.1e}{r['trajectory_fit_mae']:9.4f}")
    lines.append(f"ratios (rampde / torchdiffeq): time {ours['time_per_iter_ms'] / host['time_per_iter_ms']:.2f}x, "
                 f"memory {ours[mem_key] / host[mem_key]:.3f}x   ({'autograd saved tensors' if device.type == 'cpu' else 'CUDA peak'})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines.append(f"machine: {torch.get_num_threads()} torch threads (chosen from the cores and the load: --threads), "
                 f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    out = Path(args.out)
    settings = (f"rampde_rk4 {precision} vs torchdiffeq rk4 fp32: {args.iters} iterations, {args.steps} RK4 steps, "
                f"hidden {args.hidden}, batch {args.batch}, lr {args.lr}, seed {args.seed}, {device.type}")
    plot(out / "spiral_fit.png", data, preds, curves, settings)
    summary = {"machine": machine_info(device), "args": vars(args), "precision": precision, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines.append(f"wrote {out / 'spiral_fit.png'} and {out / 'summary.json'}")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
