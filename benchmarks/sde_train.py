"""Training a neural SDE through its Wong--Zakai ODE (rampde) against torchsde's own training (issue 14).

    python benchmarks/sde_train.py [--iters 300] [--batch 256] [--out benchmarks/results]

The data: the time-dependent Ornstein--Uhlenbeck process

    dX = (0.2 t - 0.1 X) dt + (0.6 + 0.15 t) o dW,   X_0 = 0,   t in [0, 10],

observed at 101 times, 2000 paths sampled with torchsde (reversible Heun, dt = 0.01).  The model: a
neural drift f(t, x) and a neural diffusion g(t, x) (diagonal noise, Stratonovich), the same
initialisation for every route.  Loss: the squared error of the model's marginal mean and standard
deviation against the data's at all 101 times (a batch of model paths per iteration).

Routes, each trained for the same number of iterations with Adam:
  * rampde fp32 / rampde bf16: ``rampde_torchsde.sdeint(..., method="rampde_rk4", n_terms=K)``,
    the exact discrete adjoint (bf16: velocities in bf16, state and gradients in fp32);
  * rampde quadrature: the same ODE with ``adjoint="quadrature"`` (memory flat in the steps);
  * torchsde sdeint: reversible Heun, dt = 0.01, backprop through the solver;
  * torchsde sdeint_adjoint: reversible Heun with its reversible adjoint, dt = 0.01.

Every trained model is then *sampled with torchsde* (the same parameters, reversible Heun, 4000 paths)
and its marginal mean and standard deviation are compared with the data's at all times.  Time per
iteration is the median over the iterations after the first few (one process, routes in turn; the
machine's load and thread count are printed and saved).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import choose_threads, machine_info  # noqa: E402

import rampde_plugins  # noqa: E402,F401  (installs the adapters)
import torchsde  # noqa: E402
from rampde_torchsde import sdeint as wz_sdeint  # noqa: E402

T_END, N_OBS = 10.0, 101


class TrueOU(torch.nn.Module):
    noise_type, sde_type = "diagonal", "stratonovich"

    def f(self, t, y):
        return 0.2 * t - 0.1 * y

    def g(self, t, y):
        return (0.6 + 0.15 * t) * torch.ones_like(y)


class NeuralSDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "stratonovich"

    def __init__(self, width=32):
        super().__init__()
        self.drift = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                         torch.nn.SiLU(), torch.nn.Linear(width, 1))
        self.diffusion = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.SiLU(), torch.nn.Linear(width, 1))

    def _in(self, t, y):
        # t scaled to [0, 1]: the same inputs whichever solver calls (a 0-d time, any dtype)
        return torch.cat([y, (t / T_END).to(y.dtype).expand(y.shape[0], 1)], dim=1)

    def f(self, t, y):
        return self.drift(self._in(t, y))

    def g(self, t, y):
        return torch.nn.functional.softplus(self.diffusion(self._in(t, y)))


def sample_torchsde(sde, n, ts, seed, dt=0.01):
    with torch.no_grad():
        y0 = torch.zeros(n, 1)
        bm = torchsde.BrownianInterval(t0=0.0, t1=T_END, size=(n, 1), entropy=seed)
        return torchsde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=dt)[..., 0]


def moments(paths):
    return paths.mean(dim=1), paths.std(dim=1)


def loss_fn(paths, data_mean, data_std):
    mean, std = moments(paths)
    return ((mean - data_mean) ** 2).mean() + ((std - data_std) ** 2).mean()


def make_route(name, model, ts, batch, n_terms, it_seed, dt):
    y0 = torch.zeros(batch, 1)
    if name.startswith("rampde"):
        options = {"precision": "bf16"} if name == "rampde bf16" else {}
        adjoint = "quadrature" if name == "rampde quadrature" else "discrete"
        return lambda i: wz_sdeint(model, y0, ts, method="rampde_rk4", n_terms=n_terms, generator=it_seed + i,
                                   options=options, adjoint=adjoint)[..., 0]

    def run(i):
        bm = torchsde.BrownianInterval(t0=0.0, t1=T_END, size=(batch, 1), entropy=it_seed + i)
        if name == "torchsde sdeint":
            return torchsde.sdeint(model, y0, ts, bm=bm, method="reversible_heun", dt=dt)[..., 0]
        return torchsde.sdeint_adjoint(model, y0, ts, bm=bm, method="reversible_heun",
                                       adjoint_method="adjoint_reversible_heun", dt=dt)[..., 0]

    return run


ROUTES = ("rampde fp32", "rampde bf16", "rampde quadrature", "torchsde sdeint", "torchsde sdeint_adjoint")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-terms", type=int, default=64, help="K of the Wong--Zakai path")
    ap.add_argument("--data-paths", type=int, default=2000)
    ap.add_argument("--eval-paths", type=int, default=4000)
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--dt", type=float, default=0.01, help="torchsde's step (training routes and sampling)")
    ap.add_argument("--threads", default="auto", help="torch threads: N, or 'auto' (the cores the load leaves free)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)  # (this program's own setting)
    print(f"threads: {why}", flush=True)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    bad = [r for r in routes if r not in ROUTES]
    if bad:
        ap.error(f"--routes: unknown {bad}; choose from {', '.join(ROUTES)}")

    info = machine_info(torch.device("cpu"))
    info["torchsde"] = torchsde.__version__ if hasattr(torchsde, "__version__") else None
    info["load_average_start"] = list(os.getloadavg())
    print(f"threads={torch.get_num_threads()} load average={info['load_average_start']}", flush=True)

    ts = torch.linspace(0.0, T_END, N_OBS)
    data = sample_torchsde(TrueOU(), args.data_paths, ts, seed=12345, dt=args.dt)
    data_mean, data_std = moments(data)

    torch.manual_seed(0)
    init = NeuralSDE().state_dict()
    results = {"machine": info, "args": vars(args), "routes": {}}
    for name in routes:
        model = NeuralSDE()
        model.load_state_dict(init)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        run = make_route(name, model, ts, args.batch, args.n_terms, it_seed=1000, dt=args.dt)
        times, losses = [], []
        for i in range(args.iters):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(run(i), data_mean, data_std)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if i % max(1, args.iters // 5) == 0:
                print(f"  {name:24s} iter {i:4d} loss {losses[-1]:.4f} ({times[-1] * 1e3:.0f} ms)", flush=True)
        sampled = sample_torchsde(model, args.eval_paths, ts, seed=777, dt=args.dt)
        mean, std = moments(sampled)
        warm = times[min(3, len(times) - 1):]
        results["routes"][name] = {
            "ms_per_iter": 1e3 * statistics.median(warm),
            "final_loss": statistics.mean(losses[-10:]),
            "mean_max_err": float((mean - data_mean).abs().max()),
            "mean_rms_err": float((mean - data_mean).pow(2).mean().sqrt()),
            "std_max_err": float((std - data_std).abs().max()),
            "std_rms_err": float((std - data_std).pow(2).mean().sqrt()),
            "mean": mean.tolist(), "std": std.tolist(),
        }
        r = results["routes"][name]
        print(f"{name:24s} {r['ms_per_iter']:8.1f} ms/iter  final loss {r['final_loss']:.4f}  "
              f"mean err max {r['mean_max_err']:.3f}  std err max {r['std_max_err']:.3f}", flush=True)
    results["data"] = {"t": ts.tolist(), "mean": data_mean.tolist(), "std": data_std.tolist()}
    info["load_average_end"] = list(os.getloadavg())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sde_train-cpu.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out / "sde_train-cpu.md")
    plot(results, out / "sde_train-cpu.png")
    print(f"wrote {out / 'sde_train-cpu.md'}")


def write_markdown(results, path):
    m, a = results["machine"], results["args"]
    lines = [
        "# Neural SDE training: Wong--Zakai ODE on rampde vs torchsde",
        "",
        f"`python benchmarks/sde_train.py --iters {a['iters']} --batch {a['batch']} --n-terms {a['n_terms']} --dt {a['dt']}` -- "
        f"{m['processor']}, {m['threads']} threads, load average {m['load_average_start']} -> {m['load_average_end']}; "
        f"torch {m['torch']}, torchsde {m['torchsde']}, torchdiffeq {m['torchdiffeq']}.",
        "",
        "Data: dX = (0.2 t - 0.1 X) dt + (0.6 + 0.15 t) o dW on [0, 10], 101 times, "
        f"{a['data_paths']} torchsde paths.  Each trained model sampled with torchsde (reversible Heun, dt = {a['dt']}, "
        f"{a['eval_paths']} paths); errors of its marginal mean and std against the data's over all 101 times.",
        "",
        "| route | ms / iter | final loss | mean err (max / rms) | std err (max / rms) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["routes"].items():
        lines.append(f"| {name} | {r['ms_per_iter']:.1f} | {r['final_loss']:.4f} | {r['mean_max_err']:.3f} / "
                     f"{r['mean_rms_err']:.3f} | {r['std_max_err']:.3f} / {r['std_rms_err']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["data"]["t"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("mean", "std")):
        ax.plot(t, results["data"][key], "k-", lw=3, alpha=0.4, label="data")
        for name, r in results["routes"].items():
            ax.plot(t, r[key], lw=1.2, label=name)
        ax.set_xlabel("t")
        ax.set_title(f"marginal {key} (models sampled with torchsde)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
