"""Observed convergence order of every registered method (fp64, analytic solution)."""

import math

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins

from .helpers import ALL_METHODS


def _observed_order(method, steps=(10, 20, 40, 80, 160)):
    # y' = -y + sin(3t)  ->  y(t) = (y0 + 0.3) e^-t + (sin 3t - 3 cos 3t) / 10.  Non-autonomous, so
    # wrong stage times (c) lose order, and free of the error cancellations that make the local
    # order of e.g. Tsit5 on y' = cos(t) y read 5.4-5.8 in this range.  Errors stay above 1e-14
    # (well clear of fp64 round-off) for every built-in method at 160 steps.
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t_end = 2.0
    c = y0 + 0.3  # y(0) = c - 3/10
    exact = c * math.exp(-t_end) + (math.sin(3 * t_end) - 3 * math.cos(3 * t_end)) / 10
    t = torch.tensor([0.0, t_end], dtype=torch.float64)
    errs = []
    for n in steps:
        y = odeint(lambda t, y: -y + torch.sin(3 * t), y0, t, method=method,
                   options={"step_size": t_end / n, "precision": "fp64"})
        errs.append((y[-1] - exact).abs().max().item())
    xs = [math.log(t_end / n) for n in steps]
    ys = [math.log(e) for e in errs]
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_observed_order_within_0_3_of_nominal(name):
    tableau = rampde_plugins.get_registry().tableau(name)
    order = _observed_order("rampde_" + name)
    assert abs(order - tableau.order) <= 0.3, f"{name}: observed order {order:.2f}, nominal {tableau.order}"
