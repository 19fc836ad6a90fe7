"""Butcher tableaus of explicit and diagonally implicit Runge--Kutta methods, validated on construction.

One small value per method (the diffrax habit): the numbers, the order they claim, and a check that
the numbers deliver it.  The engine reads nothing else, so a tableau registered by any plugin runs
with every precision policy and in every host library.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

__all__ = ["ButcherTableau", "BUILTIN_TABLEAUS"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Tolerance of the algebraic checks.  Coefficients are usually typed as decimal approximations of
# rationals (e.g. 0.3333333333333333); 1e-12 accepts those and rejects real typos.
_TOL = 1e-12


@lru_cache(maxsize=None)
def _rooted_trees(order: int) -> tuple:
    """All rooted trees with ``order`` nodes, each a sorted tuple of its children's trees."""
    if order == 1:
        return ((),)
    trees = set()
    # A tree of n nodes is a root plus a multiset of subtrees whose sizes sum to n - 1.
    def forests(remaining, max_size):
        if remaining == 0:
            yield ()
            return
        for size in range(min(remaining, max_size), 0, -1):
            for sub in _rooted_trees(size):
                for rest in forests(remaining - size, size):
                    yield (sub,) + rest
    for forest in forests(order - 1, order - 1):
        trees.add(tuple(sorted(forest)))
    return tuple(sorted(trees))


def _order_conditions(c, a, b, order):
    """Yield (tree, b.Phi(tree), 1/gamma(tree)) for every rooted tree with at most ``order`` nodes.

    Butcher's theory: a Runge--Kutta method has order p iff b.Phi(t) = 1/gamma(t) for all rooted
    trees t with |t| <= p, where Phi(leaf) = 1, Phi([t1..tm])_i = prod_k (A Phi(t_k))_i and
    gamma(t) = |t| * prod_k gamma(t_k).  (200 trees up to order 8: cheap.)
    """
    s = len(b)
    memo = {}

    def size(t):
        return 1 + sum(size(k) for k in t)

    def phi_gamma(t):
        if t not in memo:
            phi, gamma = [1.0] * s, size(t)
            for child in t:
                cphi, cgamma = phi_gamma(child)
                # rows may include the diagonal (DIRK): sum over j <= i
                a_phi = [sum(a[i][j] * cphi[j] for j in range(len(a[i]))) for i in range(s)]
                phi = [phi[i] * a_phi[i] for i in range(s)]
                gamma *= cgamma
            memo[t] = (phi, gamma)
        return memo[t]

    for n in range(1, order + 1):
        for tree in _rooted_trees(n):
            phi, gamma = phi_gamma(tree)
            yield tree, sum(b[i] * phi[i] for i in range(s)), 1.0 / gamma


def _tree_str(t) -> str:
    return "o" if not t else "[" + ",".join(_tree_str(k) for k in t) + "]"


@dataclass(frozen=True, eq=False)
class ButcherTableau:
    """A Runge--Kutta method ``(c, A, b)`` with its claimed order: explicit, or diagonally implicit.

    Args:
        name: short lowercase identifier; host libraries see the method as ``rampde_<name>``.
        c: stage times as fractions of the step (``c[0] == 0`` for an explicit method).
        a: the lower-triangular stage matrix, either as ragged rows (row ``i`` has ``i`` entries, or
            ``i + 1`` with its diagonal entry last) or as a full ``s x s`` matrix whose upper triangle
            is zero.  A non-zero diagonal makes the method diagonally implicit (DIRK; ESDIRK when
            ``a[0][0] == 0``): each such stage is solved by Newton's method.  Fully implicit methods
            (a non-zero upper triangle: Radau IIA, Gauss) are not supported.
        b: solution weights.
        order: the classical order the method claims; every order condition up to it (one per
            rooted tree, Butcher's theory) is checked.
        b_err: optional weights of an embedded error estimate (``b - b_hat``), which must sum to 0.
        description: one line for ``python -m rampde_plugins``.

    Raises:
        ValueError: naming the violated condition, if the tableau is malformed or does not reach
            its claimed order.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_err: tuple[float, ...] | None = None
    description: str = ""
    #: the diagonal of A (all zero for an explicit method)
    diag: tuple[float, ...] = field(init=False)
    # Derived, filled by __post_init__: which stages the torchdiffeq-style `perturb` option nudges.
    _c_is_one: tuple[bool, ...] = field(init=False, repr=False)

    def __init__(
        self,
        name: str,
        c: Sequence[float],
        a: Sequence[Sequence[float]],
        b: Sequence[float],
        order: int,
        b_err: Sequence[float] | None = None,
        description: str = "",
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"ButcherTableau name={name!r} is invalid: use lowercase letters, digits and '_', "
                "starting with a letter (host libraries see it as 'rampde_<name>')"
            )
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"ButcherTableau {name!r}: order={order!r} must be a positive integer")
        try:
            c_t = tuple(float(x) for x in c)
            b_t = tuple(float(x) for x in b)
            rows = [tuple(float(x) for x in row) for row in a]
            be_t = None if b_err is None else tuple(float(x) for x in b_err)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ButcherTableau {name!r}: coefficients must be real numbers ({exc})") from None
        s = len(b_t)
        if s == 0:
            raise ValueError(f"ButcherTableau {name!r}: b is empty; a method needs at least one stage")
        if len(c_t) != s or len(rows) != s:
            raise ValueError(
                f"ButcherTableau {name!r}: len(c)={len(c_t)}, len(a)={len(rows)} and len(b)={s} must agree"
            )
        # Accept ragged rows (with or without the diagonal) or a full square matrix; store the
        # strictly lower rows and the diagonal apart (the explicit engine reads only the former).
        ragged, diag = [], []
        for i, row in enumerate(rows):
            if len(row) == s > i + 1:  # a row of the square matrix: nothing above the diagonal
                if any(x != 0.0 for x in row[i + 1:]):
                    raise ValueError(
                        f"ButcherTableau {name!r}: a[{i}] has non-zero entries above the diagonal; fully "
                        "implicit methods (Radau IIA, Gauss) are not supported -- only explicit and "
                        "diagonally implicit (DIRK) methods"
                    )
                row = row[: i + 1]
            if len(row) == i:
                ragged.append(row)
                diag.append(0.0)
            elif len(row) == i + 1:
                ragged.append(row[:i])
                diag.append(row[i])
            else:
                raise ValueError(
                    f"ButcherTableau {name!r}: a[{i}] has {len(row)} entries; expected {i} or {i + 1} (ragged, "
                    f"the diagonal last) or {s} (square)"
                )
        implicit = any(x != 0.0 for x in diag)
        if not implicit and c_t[0] != 0.0:
            raise ValueError(f"ButcherTableau {name!r}: c[0]={c_t[0]} must be 0 for an explicit method")
        for x in (*c_t, *b_t, *(v for r in ragged for v in r), *diag, *(be_t or ())):
            if not math.isfinite(x):
                raise ValueError(f"ButcherTableau {name!r}: coefficient {x} is not finite")
        full_rows = [r + (d,) for r, d in zip(ragged, diag)]
        # Row sums equal c: the stage times must be where the stage states actually are, or the
        # method loses order on non-autonomous problems.
        for i in range(s):
            if abs(sum(full_rows[i]) - c_t[i]) > _TOL * max(1.0, abs(c_t[i])):
                raise ValueError(
                    f"ButcherTableau {name!r}: row {i} of a sums to {sum(full_rows[i])!r} but c[{i}]={c_t[i]!r}"
                )
        # 1e-10: coefficients typed to ~16 digits satisfy the conditions to ~1e-15; a wrong
        # coefficient misses them by far more.
        for tree, value, expected in _order_conditions(c_t, full_rows, b_t, order):
            if abs(value - expected) > 1e-10:
                raise ValueError(
                    f"ButcherTableau {name!r} claims order {order} but violates the order condition of the "
                    f"rooted tree {_tree_str(tree)}: b.Phi = {value!r}, expected 1/gamma = {expected!r}"
                )
        if be_t is not None:
            if len(be_t) != s:
                raise ValueError(f"ButcherTableau {name!r}: len(b_err)={len(be_t)} must equal len(b)={s}")
            if abs(sum(be_t)) > _TOL * s:
                raise ValueError(f"ButcherTableau {name!r}: b_err sums to {sum(be_t)!r}; error weights must sum to 0")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "c", c_t)
        object.__setattr__(self, "a", tuple(ragged))
        object.__setattr__(self, "diag", tuple(diag))
        object.__setattr__(self, "b", b_t)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "b_err", be_t)
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "_c_is_one", tuple(x == 1.0 for x in c_t))

    @property
    def stages(self) -> int:
        """Number of function evaluations per step."""
        return len(self.b)

    @property
    def implicit(self) -> bool:
        """True for a diagonally implicit method (some stage is solved by Newton's method)."""
        return any(x != 0.0 for x in self.diag)

    @property
    def explicit_first_stage(self) -> bool:
        """The first stage is ``f(t_n, y_n)`` (every explicit method; ESDIRK methods)."""
        return self.diag[0] == 0.0

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated at (t_{n+1}, y_{n+1}) (e.g. Dormand--Prince).

        Never for an implicit method: its last stage meets y_{n+1} only to the Newton tolerance, and
        reusing it as the next first stage would not be the same function bit for bit."""
        s = self.stages
        return not self.implicit and s > 1 and self.c[-1] == 1.0 and self.b[-1] == 0.0 and self.a[-1] == self.b[:-1]

    def same_coefficients(self, other: "ButcherTableau", tol: float = 1e-14) -> bool:
        """True when ``other`` is the same method to ``tol`` (used to merge host tableaus).

        Every coefficient counts: (c, A, b), the error weights ``b_err`` (two pairs that differ only
        there take different adaptive steps) and the claimed order.
        """
        if self.stages != other.stages or self.order != other.order:
            return False
        if (self.b_err is None) != (other.b_err is None):
            return False
        pairs = [*zip(self.c, other.c), *zip(self.b, other.b)]
        if self.b_err is not None:
            pairs += list(zip(self.b_err, other.b_err))
        pairs += [p for r1, r2 in zip(self.a, other.a) for p in zip(r1, r2)]
        pairs += list(zip(self.diag, other.diag))
        return all(abs(x - y) <= tol for x, y in pairs)


_third = 1.0 / 3.0

BUILTIN_TABLEAUS = (
    ButcherTableau("euler", c=[0.0], a=[[]], b=[1.0], order=1, description="forward Euler"),
    ButcherTableau(
        "midpoint", c=[0.0, 0.5], a=[[], [0.5]], b=[0.0, 1.0], order=2, description="explicit midpoint rule"
    ),
    ButcherTableau(
        "heun2", c=[0.0, 1.0], a=[[], [1.0]], b=[0.5, 0.5], order=2, description="Heun's method (trapezoidal)"
    ),
    ButcherTableau(
        "heun3",
        c=[0.0, _third, 2 * _third],
        a=[[], [_third], [0.0, 2 * _third]],
        b=[0.25, 0.0, 0.75],
        order=3,
        description="Heun's third-order method (as torchdiffeq's heun3)",
    ),
    # torchdiffeq's `rk4` is Kutta's 3/8 rule (rk4_alt_step_func), not the classic RK4; keep the name
    # meaning the same thing in both libraries.
    ButcherTableau(
        "rk4",
        c=[0.0, _third, 2 * _third, 1.0],
        a=[[], [_third], [-_third, 1.0], [1.0, -1.0, 1.0]],
        b=[0.125, 0.375, 0.375, 0.125],
        order=4,
        description="Kutta's 3/8 rule (torchdiffeq's rk4)",
    ),
    ButcherTableau(
        "rk4_classic",
        c=[0.0, 0.5, 0.5, 1.0],
        a=[[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
        b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
        order=4,
        description="the classic fourth-order Runge-Kutta method",
    ),
)


def _implicit_builtins() -> tuple:
    """The diagonally implicit built-ins.  Names and coefficients are torchdiffeq main's where it has
    the method (implicit_euler, implicit_midpoint, trapezoid, sdirk2, trbdf2); trbdf2 also carries
    Hosea & Shampine's third-order embedded estimate, so it adapts unless a grid is given."""
    s2 = math.sqrt(2.0)
    g = 1.0 - s2 / 2.0  # sdirk2's and trbdf2's diagonal; L-stable
    w = s2 / 4.0
    trbdf2_b, trbdf2_bhat = (w, w, g), ((1.0 - w) / 3.0, (3.0 * w + 1.0) / 3.0, g / 3.0)
    # Kvaerno (2004) ESDIRK 3(2): gamma is the root of 6x^3 - 18x^2 + 9x - 1 near 0.436 (L-stability)
    k = 0.43586652150845899942
    kv_a3 = ((-4 * k * k + 6 * k - 1) / (4 * k), (-2 * k + 1) / (4 * k), k)
    kv_b = ((6 * k - 1) / (12 * k), -1 / ((24 * k - 12) * k), (-6 * k * k + 6 * k - 1) / (6 * k - 3), k)
    # Kvaerno (2004) ESDIRK 5(4), gamma = 0.26: 7 stages, stiffly accurate (b is the last row of a) and
    # L-stable; the 4th-order embedded solution is the sixth stage's state (c6 = c7 = 1), so the error
    # estimate is the difference of the last two rows.
    kg = 0.26
    kv5 = (
        [],
        [kg, kg],
        [0.13, 0.84033320996790809, kg],
        [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, kg],
        [0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, kg],
        [0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, kg],
        [0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
         0.06962479448202728, kg],
    )
    kv5_c = [0.0, *(math.fsum(row) for row in kv5[1:])]
    kv5_err = [x - y for x, y in zip(kv5[-1], (*kv5[-2], 0.0))]
    return (
        ButcherTableau("implicit_euler", c=[1.0], a=[[1.0]], b=[1.0], order=1,
                       description="backward Euler (L-stable)"),
        ButcherTableau("implicit_midpoint", c=[0.5], a=[[0.5]], b=[1.0], order=2,
                       description="implicit midpoint rule (A-stable, symplectic)"),
        ButcherTableau("trapezoid", c=[0.0, 1.0], a=[[], [0.5, 0.5]], b=[0.5, 0.5], order=2,
                       description="trapezoidal rule / Crank-Nicolson (A-stable)"),
        ButcherTableau("sdirk2", c=[g, 1.0], a=[[g], [1.0 - g, g]], b=[1.0 - g, g], order=2,
                       description="two-stage SDIRK, gamma = 1 - 1/sqrt(2) (L-stable)"),
        ButcherTableau("trbdf2", c=[0.0, 2.0 * g, 1.0], a=[[], [g, g], [w, w, g]], b=list(trbdf2_b), order=2,
                       b_err=[x - y for x, y in zip(trbdf2_b, trbdf2_bhat)],
                       description="TR-BDF2 ESDIRK 2(3), Hosea-Shampine error estimate (L-stable)"),
        ButcherTableau("kvaerno3", c=[0.0, 2.0 * k, 1.0, 1.0], a=[[], [k, k], list(kv_a3), list(kv_b)], b=list(kv_b),
                       order=3, b_err=[x - y for x, y in zip(kv_b, (*kv_a3, 0.0))],
                       description="Kvaerno's ESDIRK 3(2), stiffly accurate (L-stable)"),
        ButcherTableau("kvaerno5", c=kv5_c, a=[list(r) for r in kv5], b=list(kv5[-1]), order=5, b_err=kv5_err,
                       description="Kvaerno's ESDIRK 5(4), stiffly accurate (L-stable)"),
    )


BUILTIN_TABLEAUS = BUILTIN_TABLEAUS + _implicit_builtins()
