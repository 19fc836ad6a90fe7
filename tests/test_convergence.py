"""Observed convergence order of every registered method (fp64, analytic solution)."""

import math

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins

from .helpers import ALL_METHODS


def _observed_order(method, steps=(40, 80, 160, 320)):
    # Step counts in the asymptotic range of every built-in method (heun3 is still at order ~2.4 for
    # 10-20 steps) and above the fp64 round-off floor for the fourth-order ones.
    # y' = cos(t) y  ->  y(t) = y0 exp(sin t): non-autonomous, so wrong stage times (c) lose order.
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    exact = y0 * math.exp(math.sin(2.0))
    errs = []
    for n in steps:
        y = odeint(lambda t, y: torch.cos(t) * y, y0, t, method=method, options={"step_size": 2.0 / n, "precision": "fp64"})
        errs.append((y[-1] - exact).abs().max().item())
    xs = [math.log(2.0 / n) for n in steps]
    ys = [math.log(e) for e in errs]
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_observed_order_within_0_3_of_nominal(name):
    tableau = rampde_plugins.get_registry().tableau(name)
    order = _observed_order("rampde_" + name)
    assert abs(order - tableau.order) <= 0.3, f"{name}: observed order {order:.2f}, nominal {tableau.order}"
