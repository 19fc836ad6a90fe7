"""Tableaus and policies validate themselves with messages that name the problem."""

from math import factorial

import pytest
import torch

from rampde_plugins import AdjointScaler, ButcherTableau, PrecisionPolicy, ScalerConfig
from rampde_plugins._tableau import BUILTIN_TABLEAUS


def _stability_coefficients(a, b, upto):
    """b^T A^(k-1) 1 for k = 1..upto: the Taylor coefficients of the method's stability function
    R(z) = 1 + z b^T (I - zA)^-1 1 (computed here in float64, not by the tableau's own checks)."""
    s = len(b)
    a = [[float(x) for x in (list(row) + [0] * (s - len(row)))] for row in a]
    b = [float(x) for x in b]
    v, out = [1.0] * s, []
    for _ in range(upto):
        out.append(sum(bi * vi for bi, vi in zip(b, v)))
        v = [sum(a[i][j] * v[j] for j in range(s)) for i in range(s)]
    return out


@pytest.mark.parametrize("tab", BUILTIN_TABLEAUS, ids=lambda t: t.name)
def test_builtin_tableaus_reproduce_exp_to_their_order(tab):
    """On y' = lambda y a method of order p has R(z) = exp(z) + O(z^(p+1)): b^T A^(k-1) 1 = 1/k! for
    k <= p, an independent check of every coefficient set against its claimed order (a typo in a or
    b breaks it; the embedded pair's weights b - b_err must reach at least order 1)."""
    a = [(*row, d) for row, d in zip(tab.a, tab.diag)]  # implicit methods: the diagonal too
    coeffs = _stability_coefficients(a, tab.b, tab.order)
    assert coeffs == pytest.approx([1 / factorial(k) for k in range(1, tab.order + 1)], rel=1e-12, abs=1e-14)
    if tab.b_err is not None:
        other = [bi - ei for bi, ei in zip(tab.b, tab.b_err)]
        assert _stability_coefficients(a, other, 1) == pytest.approx([1.0], rel=1e-12)
        assert any(abs(e) > 1e-14 for e in tab.b_err)  # an estimate that can see an error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="RK4"), r"name='RK4' is invalid"),
        (dict(c=[0, 0.5, 0.5, 0.9]), r"row 3 of a sums to 1.0 but c\[3\]=0.9"),
        (dict(b=[1 / 6, 1 / 3, 1 / 3, 1 / 5]), r"claims order 4 but violates the order condition of the rooted tree o:"),
        (dict(order=5), r"claims order 5 but violates the order condition of the rooted tree \[o,o,o,o\]"),
        (dict(a=[[0, 0, 0, 0], [0.5, 0, 0, 0.1], [0, 0.5, 0, 0], [0, 0, 1, 0]]), r"a\[1\] has non-zero entries above the diagonal; fully implicit"),
        (dict(a=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0.1, 0], [0, 0, 1, 0]]), r"row 2 of a sums to 0.6 but c\[2\]=0.5"),
        (dict(b_err=[0.1, 0, 0, 0]), r"b_err sums to 0.1; error weights must sum to 0"),
        (dict(c=[0.1, 0.5, 0.5, 1]), r"c\[0\]=0.1 must be 0"),
    ],
)
def test_tableau_validation(kwargs, message):
    base = dict(name="rk4_test", c=[0, 0.5, 0.5, 1], a=[[], [0.5], [0, 0.5], [0, 0, 1]], b=[1 / 6, 1 / 3, 1 / 3, 1 / 6], order=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ButcherTableau(**base)


def test_tableau_order_conditions_catch_wrong_order_claim():
    with pytest.raises(ValueError, match=r"'heun_claims3' claims order 3 but violates .* expected 1/gamma = 0.333"):
        ButcherTableau("heun_claims3", c=[0, 1], a=[[], [1]], b=[0.5, 0.5], order=3)


def test_number_of_order_conditions():
    from rampde_plugins._tableau import _rooted_trees

    # Butcher's counts of rooted trees with 1..8 nodes.
    assert [len(_rooted_trees(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]


def test_square_and_ragged_a_agree():
    sq = ButcherTableau("x", c=[0, 1], a=[[0, 0], [1, 0]], b=[0.5, 0.5], order=2)
    rg = ButcherTableau("y", c=[0, 1], a=[[], [1]], b=[0.5, 0.5], order=2)
    assert sq.a == rg.a and sq.same_coefficients(rg)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(state_dtype=torch.float16), r"state_dtype=torch.float16 is not supported; choose one of float32, float64"),
        (dict(accumulation_dtype=torch.bfloat16), r"accumulation_dtype=torch.bfloat16 is not supported"),
        (dict(compute_dtype=torch.int8), r"compute_dtype=torch.int8 is not supported; choose one of float16, bfloat16, float32, float64, None"),
        (dict(scaling="static"), r"scaling='static' is not one of none, dynamic, inf_signal"),
    ],
)
def test_policy_validation(kwargs, message):
    base = dict(name="p", compute_dtype=torch.float16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PrecisionPolicy(**base)


def test_policy_is_frozen_and_resolves_defaults():
    p = PrecisionPolicy("p", torch.bfloat16, torch.float32, storage_dtype=torch.bfloat16)
    assert p.storage == torch.bfloat16 and p.accumulation == torch.float32 and p.output == torch.float32
    with pytest.raises(AttributeError):
        p.state_dtype = torch.float64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(growth_factor=1.0), r"growth_factor=1.0 must be > 1"),
        (dict(backoff_factor=1.5), r"backoff_factor=1.5 must be in \(0, 1\)"),
        (dict(growth_interval=0), r"growth_interval=0 must be a positive int"),
        (dict(init_scale=-2.0), r"init_scale=-2.0 must be None or a positive finite power of two"),
    ],
)
def test_scaler_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdjointScaler(**kwargs)


def test_scaler_growth_rule_uses_the_scaled_adjoint():
    s = AdjointScaler._from_config(ScalerConfig(growth_interval=2))
    # Not enough clean steps yet: no growth even though the scaled value is small.
    assert s._grow(8.0, 1.0, 1) == (8.0, 1)
    # After the interval, grow by powers of two up to the 1024 target (1 * 2^10 = 1024).
    assert s._grow(8.0, 1.0, 2) == (8.0 * 2**10, 0)
    # Near the target: leave it alone (this is what stops grow/overflow oscillation).
    assert s._grow(8.0, 700.0, 50) == (8.0, 50)
