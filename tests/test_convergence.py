"""Observed convergence order of every registered method (fp64, analytic solution)."""

import math

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins

from .helpers import ALL_METHODS


OMEGA, T_END = 6.0, 2.0
STEPS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _observed_order(method):
    """Least-squares slope of log(error) against log(h) in the method's asymptotic range.

    Problem: y' = -y + sin(w t), exact y(t) = (y0 + w/(1+w^2)) e^-t + (sin wt - w cos wt)/(1+w^2)
    (non-autonomous, so wrong stage times c lose order).  Error: max over two components and the
    outputs t = 0, T/2, T (on grid points for the even step counts used; a sup norm is not fooled by
    an error that happens to cross zero at T).  Which step counts are used: those whose error lies
    in (3e-14, 1e-2) -- below 1e-2 the leading error term dominates, above 3e-14 fp64 round-off does
    not -- and of those the four finest.  One rule serves Euler (asymptotic only at hundreds of
    steps) and dopri8 (at round-off after ~30 steps).
    """
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.linspace(0, T_END, 3, dtype=torch.float64)
    w = OMEGA
    exact = (y0 + w / (1 + w * w)) * torch.exp(-t)[:, None] + ((torch.sin(w * t) - w * torch.cos(w * t)) / (1 + w * w))[:, None]
    points = []
    # implicit methods: Newton converged far below the errors measured (its default tolerance,
    # 1e-2 x torchdiffeq's rtol = 1e-9, would floor the finest errors)
    tight = {"newton": {"rtol": 1e-13, "atol": 1e-15}} if rampde_plugins.get_registry().tableau(method[7:]).implicit else {}
    for n in STEPS:
        y = odeint(lambda t, y: -y + torch.sin(w * t), y0, t, method=method,
                   options={"step_size": T_END / n, "precision": "fp64", **tight})
        err = (y - exact).abs().max().item()
        if 3e-14 < err < 1e-2:
            points.append((math.log(T_END / n), math.log(err)))
    points = points[-4:]
    assert len(points) >= 3, f"{method}: too few step counts in the asymptotic range"
    xm = sum(x for x, _ in points) / len(points)
    ym = sum(y for _, y in points) / len(points)
    return sum((x - xm) * (y - ym) for x, y in points) / sum((x - xm) ** 2 for x, _ in points)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_observed_order_within_0_3_of_nominal(name):
    tableau = rampde_plugins.get_registry().tableau(name)
    order = _observed_order("rampde_" + name)
    assert abs(order - tableau.order) <= 0.3, f"{name}: observed order {order:.2f}, nominal {tableau.order}"
