"""Convergence of the Wong--Zakai ODE ensemble to the SDE as the Karhunen--Loeve terms K grow (issue 14).

    python benchmarks/wong_zakai.py [--paths 400000] [--ks 5,10,20,40,80] [--out benchmarks/results]

Two processes with analytic laws, both in Stratonovich form on [0, 1]:

* geometric Brownian motion dX = mu X dt + sig X o dW, X_0 = 1 (mu = 0.2, sig = 0.5):
  E X_T = exp(mu T + sig^2 T / 2), Var X_T = exp(2 mu T + sig^2 T) (exp(sig^2 T) - 1);
* Ornstein--Uhlenbeck dX = -theta X dt + sig dW, X_0 = 0.5 (theta = 1, sig = 0.8):
  E X_T = 0.5 exp(-theta T), Var X_T = sig^2 (1 - exp(-2 theta T)) / (2 theta).

For each K the ODE ``dy/dt = f + g xi_K`` is solved for ``--paths`` independent paths (rampde_rk4, the
default step of 8 per half period of the fastest mode) and the sample mean and variance of X_T are
compared with the SDE's, with Monte-Carlo standard errors (variance: ((m4 - v^2)/N)^(1/2)).  The same
statistics from torchsde's own Stratonovich solver (midpoint, dt = 0.01) close the table.  The slope of
log|error| against log K is fitted over the Ks whose error exceeds 3 standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info  # noqa: E402

import rampde_plugins  # noqa: E402,F401
import torchsde  # noqa: E402
from rampde_torchsde import sdeint  # noqa: E402


class GBM(torch.nn.Module):
    noise_type, sde_type = "diagonal", "stratonovich"
    mu, sig, x0 = 0.2, 0.5, 1.0

    def f(self, t, y):
        return self.mu * y

    def g(self, t, y):
        return self.sig * y

    def law(self, t):
        m = self.x0 * math.exp(self.mu * t + 0.5 * self.sig ** 2 * t)
        return m, m ** 2 * (math.exp(self.sig ** 2 * t) - 1)


class OU(torch.nn.Module):
    noise_type, sde_type = "diagonal", "stratonovich"
    theta, sig, x0 = 1.0, 0.8, 0.5

    def f(self, t, y):
        return -self.theta * y

    def g(self, t, y):
        return torch.full_like(y, self.sig)

    def law(self, t):
        return self.x0 * math.exp(-self.theta * t), self.sig ** 2 * (1 - math.exp(-2 * self.theta * t)) / (2 * self.theta)


def moments(chunks):
    """Mean, variance and their standard errors from a list of 1-D chunks (fp64 sums)."""
    x = torch.cat([c.double().flatten() for c in chunks])
    n = x.numel()
    mean = x.mean()
    c = x - mean
    var = c.pow(2).mean()
    return {"mean": float(mean), "mean_se": float(c.pow(2).mean().sqrt() / math.sqrt(n)),
            "var": float(var), "var_se": float(((c.pow(4).mean() - var ** 2) / n).sqrt()), "n": n}


def _in_chunks(sde, paths, chunk, solve):
    """Moments of X_T over ``paths`` paths, solved ``chunk`` at a time by ``solve(i, y0)``."""
    with torch.no_grad():
        return moments([solve(i, torch.full((min(chunk, paths - start), 1), sde.x0))
                        for i, start in enumerate(range(0, paths, chunk))])


def ensemble(sde, k, paths, chunk, t_end, seed):
    return _in_chunks(sde, paths, chunk, lambda i, y0: sdeint(sde, y0, [0.0, t_end], n_terms=k,
                                                                generator=seed + 1000 * i)[-1])


def reference(sde, paths, chunk, t_end, dt, seed):
    def solve(i, y0):
        bm = torchsde.BrownianInterval(t0=0.0, t1=t_end, size=tuple(y0.shape), entropy=seed + i)
        return torchsde.sdeint(sde, y0, torch.tensor([0.0, t_end]), bm=bm, method="midpoint", dt=dt)[-1]

    return _in_chunks(sde, paths, chunk, solve)


def slope(ks, errs, ses):
    pts = [(math.log(k), math.log(abs(e))) for k, e, s in zip(ks, errs, ses) if abs(e) > 3 * s]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=20_000, help="paths per solve (the (K, chunk) coefficients stay in cache)")
    ap.add_argument("--ks", default="5,10,20,40,80")
    ap.add_argument("--dt", type=float, default=0.01, help="torchsde's step for the reference")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    info = machine_info(torch.device("cpu"))
    info["load_average_start"] = list(os.getloadavg())
    print(f"threads={torch.get_num_threads()} load average={info['load_average_start']}", flush=True)
    t_end = 1.0
    results = {"machine": info, "args": vars(args), "processes": {}}
    for name, sde in (("GBM", GBM()), ("OU", OU())):
        mean, var = sde.law(t_end)
        rows = []
        for k in ks:
            r = ensemble(sde, k, args.paths, args.chunk, t_end, seed=k)
            r.update(k=k, mean_err=r["mean"] - mean, var_err=r["var"] - var)
            rows.append(r)
            print(f"{name} K={k:3d} mean {r['mean']:.5f} (err {r['mean_err']:+.5f} +- {r['mean_se']:.5f})  "
                  f"var {r['var']:.5f} (err {r['var_err']:+.5f} +- {r['var_se']:.5f})", flush=True)
        ref = reference(sde, args.paths, args.chunk, t_end, args.dt, seed=99)
        ref.update(mean_err=ref["mean"] - mean, var_err=ref["var"] - var)
        print(f"{name} torchsde midpoint dt={args.dt}: mean {ref['mean']:.5f} var {ref['var']:.5f}", flush=True)
        results["processes"][name] = {
            "law": {"mean": mean, "var": var}, "rows": rows, "torchsde": ref,
            "var_slope": slope(ks, [r["var_err"] for r in rows], [r["var_se"] for r in rows]),
            "mean_slope": slope(ks, [r["mean_err"] for r in rows], [r["mean_se"] for r in rows]),
        }
    info["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wong_zakai-cpu.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out / "wong_zakai-cpu.md")
    print(f"wrote {out / 'wong_zakai-cpu.md'}")


def _fmt(x, se):
    return f"{x:+.4f} +- {2 * se:.4f}"


def write_markdown(results, path):
    m, a = results["machine"], results["args"]
    lines = ["# Wong--Zakai ensembles against the SDE's law (errors +- 2 standard errors)", "",
             f"`python benchmarks/wong_zakai.py --paths {a['paths']} --ks {a['ks']}` -- {m['processor']}, "
             f"{m['threads']} threads, load average {m['load_average_start']} -> {m['load_average_end']}; torch {m['torch']}.", ""]
    for name, p in results["processes"].items():
        lines += [f"## {name}: E X_1 = {p['law']['mean']:.5f}, Var X_1 = {p['law']['var']:.5f}", "",
                  "| K | mean error | variance error | K x variance error |", "|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['k']} | {_fmt(r['mean_err'], r['mean_se'])} | {_fmt(r['var_err'], r['var_se'])} | "
                         f"{r['k'] * r['var_err']:+.3f} |")
        ref = p["torchsde"]
        lines.append(f"| torchsde midpoint, dt = {a['dt']} | {_fmt(ref['mean_err'], ref['mean_se'])} | "
                     f"{_fmt(ref['var_err'], ref['var_se'])} | |")
        vs = p["var_slope"]
        lines += ["", f"Fitted slope of log|variance error| vs log K (points beyond 3 SE): "
                      f"{'n/a' if vs is None else f'{vs:.2f}'} (1/K is -1).", ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
