"""A stepper is one class plus one registration: ``register_stepper(kind, factory, applies)``."""

from __future__ import annotations

import pytest
import torch

import rampde_plugins
from rampde_plugins import ExplicitStepper, register_stepper, unregister_stepper


class CountingStepper(ExplicitStepper):
    """An explicit stepper that counts the steps it takes (a third party's stepper, in one class)."""

    steps = 0

    def step(self, y, times, h, k0=None, f=None):
        CountingStepper.steps += 1
        return super().step(y, times, h, k0, f)


def _solve_midpoint():
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    ys = rampde_plugins.solve(lambda t, y: y @ a, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                              method="midpoint", step_size=0.125, params=(a,))
    return [g for g in torch.autograd.grad(ys[-1].square().sum(), (y0, a))], ys.detach()


def test_a_registered_stepper_steps_the_tableaus_it_applies_to():
    before, ys_before = _solve_midpoint()
    CountingStepper.steps = 0
    register_stepper("counting", CountingStepper, lambda tableau: tableau.name == "midpoint")
    try:
        after, ys_after = _solve_midpoint()
        assert CountingStepper.steps >= 8  # 8 forward steps, and the backward's recomputation
        assert torch.equal(ys_before, ys_after) and all(torch.equal(x, y) for x, y in zip(before, after))
        taken = CountingStepper.steps
        rampde_plugins.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4", step_size=0.5)
        assert CountingStepper.steps == taken  # (rk4 is not its tableau)
    finally:
        unregister_stepper("counting")
    _solve_midpoint()
    assert CountingStepper.steps == taken  # the built-in explicit stepper again


def test_register_stepper_checks_its_arguments():
    with pytest.raises(TypeError, match=r"register_stepper\('x', \.\.\.\): the factory and applies must be callable"):
        register_stepper("x", CountingStepper, applies=None)
    with pytest.raises(ValueError, match=r"unregister_stepper\('nope'\): no such stepper; registered: explicit, dirk"):
        unregister_stepper("nope")
