"""A bouncing ball with drag, bounce after bounce with ``torchdiffeq.odeint_event``: rampde methods
next to torchdiffeq's own.

    python benchmarks/bouncing_ball.py [--bounces 6]

The ball: height ``x`` and velocity ``v`` with ``x' = v``, ``v' = -g - c v`` (linear drag, so no
Runge--Kutta method is exact), written as one ``F.linear`` so that a ``bf16``/``fp16`` policy really
runs the velocity in low precision.  It falls from ``h0``; each time ``x`` reaches 0 (the event) it
bounces, ``v -> -e v`` with the restitution coefficient ``e``, and starts again from the event time.
After the last bounce it flies ``TAIL`` more time units: ``final height``.

Printed: the bounce times of each method and their largest distance to torchdiffeq's ``dopri5`` at
rtol = atol = 1e-12; steps and field evaluations of each event solve (rampde: the event search, and
the replay that the gradient needs, separately); and the gradients of the last bounce time and the
final height with respect to ``h0`` and ``e`` against central finite differences in fp64.
The functions here are also what ``tests/test_events.py`` runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import rampde_plugins  # noqa: F401  (installs the rampde methods)
from rampde_plugins import collect_stats

GRAVITY, DRAG, TAIL = 9.81, 0.5, 0.25
#: The height a bounce restarts from is |x| + LIFT: the event state lies on the surface only up to the
#: root finder's resolution (fp32 state: ~1e-7 of the terms of x), and a restart exactly on or just
#: under it would end at once (torchdiffeq's example adds 1e-7 for the same reason).
LIFT = 1e-5


class Ball(torch.nn.Module):
    """``d[x, v]/dt = A [x, v] + b`` with ``A = [[0, 1], [0, -c]]``, ``b = [0, -g]`` (buffers: the ball's
    physics is fixed; the differentiated inputs are ``h0`` and ``e``).  Counts its evaluations."""

    def __init__(self, dtype=torch.float64, drag=DRAG, gravity=GRAVITY):
        super().__init__()
        self.register_buffer("A", torch.tensor([[0.0, 1.0], [0.0, -drag]], dtype=dtype))
        self.register_buffer("b", torch.tensor([0.0, -gravity], dtype=dtype))
        self.nfe = 0
        self.accepted = self.rejected = 0

    def forward(self, t, y):
        self.nfe += 1
        return F.linear(y, self.A, self.b)


class CountingBall(Ball):
    """The ball with torchdiffeq's accept/reject step callbacks (adaptive methods only: a fixed-grid
    method warns that it has none), which rampde's adaptive methods call as torchdiffeq's do."""

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


def height(t, y):
    """The event function: the ball's height."""
    return y[..., 0]


def bounce(h0, e, *, method, options=None, rtol=1e-10, atol=1e-10, bounces=3, dtype=torch.float64,
           odeint_interface=None, record=None):
    """Bounce times ``[t_1, ..., t_n]`` and the final height, differentiable in ``h0`` and ``e``.

    ``record``: a list that gets, per bounce, ``(steps, rejected, nfe)`` of the event solve as the
    ball's callbacks and evaluation counter see them."""
    import torchdiffeq

    odeint_interface = odeint_interface or torchdiffeq.odeint
    adaptive = "step_size" not in (options or {})
    ball = CountingBall(dtype=dtype) if record is not None and adaptive else Ball(dtype=dtype)
    y = torch.stack([h0, torch.zeros_like(h0)]).to(dtype)
    t0 = torch.zeros((), dtype=torch.float64)
    times = []
    for _ in range(bounces):
        ball.nfe = ball.accepted = ball.rejected = 0
        t0, sol = torchdiffeq.odeint_event(ball, y, t0, event_fn=height, odeint_interface=odeint_interface,
                                           method=method, options=options, rtol=rtol, atol=atol)
        if record is not None:
            record.append((ball.accepted, ball.rejected, ball.nfe))
        times.append(t0)
        x, v = sol[-1].unbind(-1)
        y = torch.stack([x.abs() + LIFT, -e.to(dtype) * v])
    tail = torch.stack([t0, t0 + TAIL])
    final = torchdiffeq.odeint(ball, y, tail, method=method, options=options, rtol=rtol, atol=atol)[-1, 0]
    return times, final


def gradients(h0=2.0, e=0.8, dtype=torch.float32, **kw):
    """``{name: (d/dh0, d/de)}`` for the last bounce time and the final height, by backpropagation."""
    h = torch.tensor(h0, dtype=dtype, requires_grad=True)
    r = torch.tensor(e, dtype=dtype, requires_grad=True)
    times, final = bounce(h, r, dtype=dtype, **kw)
    out = {}
    for name, value in (("last bounce", times[-1]), ("final height", final)):
        g = torch.autograd.grad(value, (h, r), retain_graph=True)
        out[name] = tuple(float(x) for x in g)
    return out, [float(t.detach()) for t in times], float(final.detach())


def finite_differences(h0=2.0, e=0.8, eps=1e-5, **kw):
    """Central differences in fp64 of the same two quantities."""
    def run(h, r):
        with torch.no_grad():
            times, final = bounce(torch.tensor(h, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                                  dtype=torch.float64, **kw)
        return float(times[-1]), float(final)

    dh = [(a - b) / (2 * eps) for a, b in zip(run(h0 + eps, e), run(h0 - eps, e))]
    de = [(a - b) / (2 * eps) for a, b in zip(run(h0, e + eps), run(h0, e - eps))]
    return {"last bounce": (dh[0], de[0]), "final height": (dh[1], de[1])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bounces", type=int, default=4)
    args = parser.parse_args(argv)
    n = args.bounces
    h0 = torch.tensor(2.0, dtype=torch.float64)
    e = torch.tensor(0.8, dtype=torch.float64)
    ref, _ = bounce(h0, e, method="dopri5", rtol=1e-12, atol=1e-12, bounces=n)
    ref = [float(t) for t in ref]
    runs = [
        ("torchdiffeq dopri5 fp64", "dopri5", {}, 1e-8, torch.float64),
        ("rampde_dopri5 fp64", "rampde_dopri5", {}, 1e-8, torch.float64),
        ("rampde_dopri5 fp32", "rampde_dopri5", {"precision": "fp32"}, 1e-6, torch.float32),
        ("rampde_dopri5 bf16", "rampde_dopri5", {"precision": "bf16"}, 1e-3, torch.float32),
        ("rampde_dopri5 fp16", "rampde_dopri5", {"precision": "fp16"}, 1e-4, torch.float32),
        ("torchdiffeq rk4 h=0.01 cubic", "rk4", {"step_size": 0.01, "interp": "cubic"}, 1e-9, torch.float64),
        ("rampde_rk4 h=0.01 fp64", "rampde_rk4", {"step_size": 0.01}, 1e-9, torch.float64),
        ("rampde_rk4 h=0.01 bf16", "rampde_rk4", {"step_size": 0.01, "precision": "bf16"}, 1e-9, torch.float32),
    ]
    print(f"bounce times (reference: torchdiffeq dopri5, rtol = atol = 1e-12): {', '.join(f'{t:.9f}' for t in ref)}\n")
    print(f"{'method':32s} {'max |t_k - ref|':>16s} {'steps/rej/NFE per bounce':>44s} {'replay NFE':>16s}  time")
    for label, method, opts, tol, dtype in runs:
        rec = []
        t_start = time.perf_counter()
        h = h0.to(dtype).requires_grad_(True)
        with collect_stats() as stats:
            times, final = bounce(h, e.to(dtype), method=method, options=opts, rtol=tol, atol=tol, bounces=n,
                                  dtype=dtype, record=rec)
            torch.autograd.grad(times[-1] + final, h)
        wall = time.perf_counter() - t_start
        err = max(abs(float(t.detach()) - r) for t, r in zip(times, ref))
        per = "; ".join(f"{a}/{r}/{f}" for a, r, f in rec[:3]) + (" ..." if n > 3 else "")
        # each rampde event solve: its search record, then the replay's (the last record: the tail solve)
        records = list(stats)
        replay = [records[i + 1].forward_nfe for i, s in enumerate(records[:-1]) if s.method.endswith("(event search)")]
        replay = "; ".join(map(str, replay[:3])) + (" ..." if n > 3 else "") if replay else "-"
        print(f"{label:32s} {err:16.2e} {per:>44s} {replay:>16s}  {wall:.2f}s")
    print("\n(steps/rej/NFE: what the ball's callbacks and evaluation counter saw in each event solve's forward --"
          "\n for rampde the search and the replay together; 'replay NFE' is the replay's share, from SolveStats)")

    print("\ngradients w.r.t. (h0, e), fp64 unless stated; finite differences: central, eps = 1e-5, rtol = atol = 1e-12")
    fd = finite_differences(method="rampde_dopri5", rtol=1e-12, atol=1e-12, bounces=n)
    rows = [
        ("finite differences (rampde_dopri5)", fd),
        ("torchdiffeq dopri5 backprop", gradients(method="dopri5", rtol=1e-12, atol=1e-12, bounces=n, dtype=torch.float64)[0]),
        ("rampde_dopri5 discrete adjoint", gradients(method="rampde_dopri5", rtol=1e-12, atol=1e-12, bounces=n, dtype=torch.float64)[0]),
        ("rampde_rk4 h=0.01 fp64", gradients(method="rampde_rk4", options={"step_size": 0.01}, bounces=n, dtype=torch.float64)[0]),
        ("rampde_dopri5 bf16 rtol 1e-3", gradients(method="rampde_dopri5", options={"precision": "bf16"}, rtol=1e-3, atol=1e-3, bounces=n)[0]),
        ("rampde_rk4 h=0.01 bf16", gradients(method="rampde_rk4", options={"step_size": 0.01, "precision": "bf16"}, bounces=n)[0]),
    ]
    print(f"{'':36s} {'dt_n/dh0':>12s} {'dt_n/de':>12s} {'dx_T/dh0':>12s} {'dx_T/de':>12s}   max rel. to FD")
    for label, g in rows:
        vals = [*g["last bounce"], *g["final height"]]
        ref_vals = [*fd["last bounce"], *fd["final height"]]
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(vals, ref_vals))
        print(f"{label:36s} " + " ".join(f"{v:12.6f}" for v in vals) + f"   {rel:.1e}")


if __name__ == "__main__":
    main()
