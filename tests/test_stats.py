"""Per-call statistics without hand-made counters."""

import torch
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import collect_stats


def test_counts_of_a_forward_and_backward():
    w = torch.tensor(-0.3, requires_grad=True)
    t = torch.tensor([0.0, 0.33, 1.0])
    with collect_stats() as outer:
        with collect_stats() as inner:
            y = odeint(lambda t, y: w * y, torch.ones(5), t, method="rampde_rk4",
                       options={"step_size": 0.1, "adjoint_params": (w,), "interp": "cubic"})
        assert inner.last is outer.last
    rec = inner.last
    assert rec.method == "rampde_rk4" and rec.policy == "fp32"
    assert rec.n_steps == 10 and rec.n_outputs == 3
    # 4 stages per step, plus one end-slope evaluation per step that holds a cubic output.
    assert rec.forward_nfe == 10 * 4 + 2
    assert rec.stored_bytes == 10 * 5 * 4
    assert not rec.backward_done
    y.sum().backward()  # after the with-block: the record is still filled in
    assert rec.backward_done and rec.backward_steps == 10 and rec.backward_nfe == 10 * 4 + 2
    assert rec.scale_backoffs == 0 and rec.final_scale is None  # fp32: no scaling
    assert outer.total("forward_nfe") == rec.forward_nfe


def test_backward_skips_steps_after_the_last_output():
    w = torch.tensor(-0.3, requires_grad=True)
    with collect_stats() as stats:
        y = odeint(lambda t, y: w * y, torch.ones(2), torch.linspace(0, 1, 3), method="rampde_euler",
                   options={"step_size": 0.125, "adjoint_params": (w,)})
    y[1].sum().backward()  # only the output at t = 0.5 carries a cotangent
    assert stats.last.backward_steps == 4


def test_fp16_records_scale():
    w = torch.nn.Linear(3, 3)
    with collect_stats() as stats:
        y = odeint(lambda t, y: w(y), torch.ones(4, 3), torch.tensor([0.0, 1.0]), method="rampde_rk4",
                   options={"step_size": 0.25, "precision": "fp16", "adjoint_params": tuple(w.parameters())})
    y[-1].mean().backward()
    rec = stats.last
    assert rec.initial_scale is not None and rec.final_scale is not None
    # initial scale: the power of two bringing max|dL/dy(T)| = 1/12 near 2^10
    assert rec.initial_scale == 2.0 ** round(torch.log2(torch.tensor(1024 * 12.0)).item())
    assert rampde_plugins.SolveStats(method="x", policy="y").as_dict()["n_steps"] == 0
