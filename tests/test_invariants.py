"""The invariant matrix: host x method family x checkpoint schedule x adjoint x field x policy.

Every cell (``tests/invariant_cells.py`` lists the dimensions, methods and references) asserts either
a documented refusal -- an error whose message says why and names the fix (``REFUSED`` there, each
entry with its reason), the RNG and buffers put back, and not only after the forward ran into the
step cap -- or all of:

* forward: the outputs equal the same solve under ``torch.no_grad()`` and the same solve with the
  ``"steps"`` schedule and the discrete adjoint (bitwise in fp64, to ``BF16_FORWARD`` relative in
  bf16), and the reference's outputs (to the gradient's bound);
* buffers and the RNG state after ``backward`` equal what the reference leaves -- for the explicit
  families the host's own method; integer buffers (``num_batches_tracked``, the call counter)
  exactly, BatchNorm's running statistics to 1e-9 relative in fp64 and to ``BF16_BUFFER_BOUND`` in
  bf16 (statistics of bf16 activations);
* gradient (w.r.t. ``y0`` and every differentiated tensor): within ``FP64_BOUND`` (1e-10) of the fp64
  reference through the same steps.  In fp64 every bound against the reference is widened to four
  times the reference's own movement under a one-ulp change of ``y0`` where that is larger
  (``rounding_sensitivity``: adaptive steps on a field that couples the batch amplify rounding --
  torchode's own Dopri5 moves by 6.5e-10 on the bn-closure field, by 1.5e-15 on the plain one); bf16 within ``BF16_BOUND`` (the README's 5e-3), the dropout and
  BatchNorm fields within ``BF16_NOISY_BOUND`` (2e-2: torchode's own method under bf16 autocast is
  1.1e-2 and 1.6e-2 off there), the inner-leaf field (a velocity that is itself a bf16 derivative)
  within ``BF16_DERIVATIVE_BOUND`` (1e-2: torchdiffeq's own rk4 under bf16 autocast is 6.2e-3
  off); the quadrature adjoint within ``QUADRATURE_BOUND`` of the ODE's own gradient (plus ``BF16_QUADRATURE_BOUND`` in bf16);
* memory: with the ``budget`` schedule (a budget that binds, see ``budget_of``) the measured peak
  (``SolveStats.peak_bytes``) is within the budget.

The default run takes a fixed pairwise cover of the matrix (``pairwise_cover()``: 70 cells in which
every pair of values of any two dimensions appears, in a running cell wherever one has that pair;
``test_the_cover_is_pairwise`` checks it): about 30 s with ``-n 2`` on 2 cores.  ``-m slow`` runs all
1792 cells, all green: about 1 minute with ``-n 2``.  A failing cell reports every invariant it breaks, one line
each, starting with a tag: ``[forward]``, ``[no_grad]``, ``[steps]``, ``[gradient]``, ``[rng]``,
``[buffer]``, ``[budget]``, ``[refusal]``.
"""

import itertools

import pytest
import torch

import rampde_plugins

from .host_helpers import needs_torchdiffeq_callbacks
from .invariant_cells import (ALL_CELLS, BF16_BOUND, BF16_DERIVATIVE_BOUND, BF16_NOISY_BOUND, DERIVATIVE_FIELDS, BF16_QUADRATURE_BOUND, DIMENSIONS, F64,
                              FP64_BOUND, MAX_STEPS, NOISY_FIELDS, QUADRATURE_BOUND, REFUSED, SEED, STEP, T_OUT, Cell, _first_line, budget_of,
                              cell_id, gradient, make_field, matches_refusal, rounding_sensitivity, ode_gradient, pairs_of, pairwise_cover,
                              reference, refusals, solve, state_dtype, t_out, y0_value, WRITES_ONLY)

#: bf16 forward against the same solve under no_grad / "steps": the same operations on the same
#: numbers, so equal but for the order of fp32 sums.
BF16_FORWARD = 1e-6
#: bf16 running statistics against the fp64 reference's (relative, each buffer): statistics of bf16
#: activations.  Measured for the host's own method under bf16 autocast: 1.5e-3 to 3.2e-3 on the fixed
#: grids, up to 3.3e-2 on torchdiffeq's adaptive steps (bn-closure running_var; rampde the same there).
BF16_BUFFER_BOUND = 5e-2


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def _same_forward(a, b, policy):
    if policy == "fp64":
        return torch.equal(a, b), "not bitwise equal (max |diff| %.3g)" % float((a.double() - b.double()).abs().max())
    err = _rel(a, b)
    return err <= BF16_FORWARD, f"relative difference {err:.3g} > {BF16_FORWARD:g}"


def _compare_buffers(got, want, policy, what, fp64_atol=1e-12):
    problems = []
    for name, ref in want.items():
        val = got.get(name)
        if val is None:
            problems.append(f"[buffer] {name} missing")
        elif not ref.is_floating_point():
            if not torch.equal(val, ref):
                problems.append(f"[buffer] {name} = {val.tolist()} after backward, {what} leaves {ref.tolist()}")
        elif policy == "fp64":
            if not torch.allclose(val.double(), ref.double(), rtol=1e-9, atol=fp64_atol):
                diff = float((val.double() - ref.double()).abs().max())
                problems.append(f"[buffer] {name} differs from what {what} leaves (max |diff| {diff:.3g})")
        else:
            err = _rel(val, ref)
            if not err <= BF16_BUFFER_BOUND:
                problems.append(f"[buffer] {name} {err:.3g} (relative) from what {what} leaves in fp64, bound "
                                f"{BF16_BUFFER_BOUND:g}")
    return problems


def _check_refusal(cell, refs):
    dtype = state_dtype(cell.policy)
    fb = make_field(cell.field, dtype)
    y0 = y0_value().to(dtype).requires_grad_(True)
    torch.manual_seed(SEED)
    rng0, buffers0 = torch.get_rng_state(), fb.buffers()
    names = ", ".join(r.name for r in refs)
    try:
        ys, _ = solve(cell, fb, y0)
        gradient(ys, y0, fb.params)
    except (ValueError, RuntimeError) as caught:
        err, msg = caught, str(caught)
    else:
        raise AssertionError(f"[refusal] no error: documented refusal ({names}) expected")
    assert matches_refusal(msg, refs), (f"[refusal] the error does not say why and name the fix of ({names}): "
                                        f"{type(err).__name__}: {_first_line(msg)}")
    capped = "max_num_steps" in str(err.__cause__ or "") or any(r.n_steps >= MAX_STEPS for r in fb.records)
    assert not capped, (f"[refusal] only after the forward ran into the step cap ({MAX_STEPS} step attempts; "
                        f"{fb.python_calls} evaluations of the field): the field is checked at the end of the forward")
    assert torch.equal(torch.get_rng_state(), rng0), "[refusal] the RNG state was not put back"
    problems = _compare_buffers(fb.buffers(), buffers0, "fp64", "the field before the call")
    assert not problems, "[refusal] buffers not put back: " + "; ".join(problems)


def run_cell(cell):
    refs = refusals(cell)
    if refs:
        _check_refusal(cell, refs)
        return
    fp64 = cell.policy == "fp64"
    dtype = state_dtype(cell.policy)
    ref = reference(cell.host, cell.family, cell.field, cell.policy)
    what = "the host's own method" if cell.family.startswith("explicit") else "the fp64 'steps' reference"
    problems = []

    # the solve under test, differentiated
    fb = make_field(cell.field, dtype)
    y0 = y0_value().to(dtype).requires_grad_(True)
    torch.manual_seed(SEED)
    ys, rec = solve(cell, fb, y0)
    grad = gradient(ys, y0, fb.params)
    rng, buffers = torch.get_rng_state(), fb.buffers()
    ys = ys.detach()

    err = _rel(ys, ref.ys)
    bound = (FP64_BOUND if fp64 else BF16_NOISY_BOUND if cell.field in NOISY_FIELDS
             else BF16_DERIVATIVE_BOUND if cell.field in DERIVATIVE_FIELDS else BF16_BOUND)
    grad_bound = bound
    if fp64:  # (the reference's own one-ulp sensitivity, where it is larger: see rounding_sensitivity)
        s_ys, s_grad, s_buf = rounding_sensitivity(cell.host, cell.family, cell.field, cell.policy)
        bound, grad_bound = max(bound, 4 * s_ys), max(bound, 4 * s_grad)
    if not err <= bound:
        problems.append(f"[forward] outputs {err:.3g} (relative) from {what}'s, bound {bound:g}")
    if cell.adjoint == "discrete":
        err = _rel(grad, ref.grad)
        if not err <= grad_bound:
            problems.append(f"[gradient] relative error {err:.3g} > {grad_bound:g} against {what} (fp64)")
    else:
        bound = QUADRATURE_BOUND[cell.host, cell.family] + (0.0 if fp64 else BF16_QUADRATURE_BOUND)
        err = _rel(grad, ode_gradient(cell.field))
        if not err <= bound:
            problems.append(f"[gradient] quadrature: relative error {err:.3g} > {bound:g} against the ODE's gradient")
    if not torch.equal(rng, ref.rng):
        problems.append(f"[rng] the RNG state after backward is not where {what} leaves it")
    if cell.adjoint == "quadrature" and cell.field in WRITES_ONLY:
        # The quadrature adjoint evaluates the field in its backward too (as torchdiffeq's own adjoint
        # does): its writes stay -- every evaluation counted but those that check the field is one
        # function (put back; SolveStats.field_checks).
        checks = rec.field_checks if rec is not None else 0
        for name, value in buffers.items():
            if not value.is_floating_point() and int(value) != fb.python_calls - checks:
                problems.append(f"[buffer] {name} = {int(value)} after backward, the field was called "
                                f"{fb.python_calls} times ({checks} of them checks, put back)")
    else:
        problems += _compare_buffers(buffers, ref.buffers, cell.policy, what,
                                     fp64_atol=max(1e-12, 4 * s_buf) if fp64 else 1e-12)
    if cell.schedule == "budget":
        budget = budget_of(cell.host, cell.family, cell.field, cell.policy)
        if rec is None or rec.memory_budget != budget or not rec.peak_bytes <= budget:
            peak, kept, chosen = (None, None, None) if rec is None else (rec.peak_bytes, rec.memory_budget, rec.schedule)
            problems.append(f"[budget] measured peak {peak} bytes, budget {budget} (recorded {kept}; schedule {chosen})")

    # the same solve under no_grad
    fb = make_field(cell.field, dtype)
    torch.manual_seed(SEED)
    with torch.no_grad():
        ys_ng, _ = solve(cell, fb, y0.detach())
    ok, how = _same_forward(ys_ng, ys, cell.policy)
    if not ok:
        problems.append(f"[no_grad] outputs under no_grad {how}")

    # the same solve with the default schedule and the discrete adjoint
    if not (cell.schedule == "steps" and cell.adjoint == "discrete"):
        fb = make_field(cell.field, dtype)
        torch.manual_seed(SEED)
        ys_st, _ = solve(cell, fb, y0.detach().requires_grad_(True), schedule="steps", adjoint="discrete")
        ok, how = _same_forward(ys_st.detach(), ys, cell.policy)
        if not ok:
            problems.append(f"[steps] outputs against the 'steps' schedule (discrete adjoint) {how}")

    assert not problems, "\n".join(problems)


COVER = pairwise_cover()

#: Cells that fail today, each an open defect of issue 27 (strict: a fix turns the mark into a failure,
#: which is the prompt to remove it).  Not refusals: the engine should honour these combinations.
KNOWN_OPEN: dict = {}


def _cells(cells):
    return [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_OPEN[cell_id(c)]))
            if cell_id(c) in KNOWN_OPEN else c for c in cells]


@pytest.mark.parametrize("cell", _cells(COVER), ids=cell_id)
def test_cover_cell(cell):
    run_cell(cell)


@pytest.mark.slow
@pytest.mark.parametrize("cell", _cells(ALL_CELLS), ids=cell_id)
def test_matrix_cell(cell):
    run_cell(cell)


# ---- the matrix itself --------------------------------------------------------------------------------

def test_the_cover_is_pairwise():
    """Every pair of values of any two dimensions is in a cover cell; a pair that some running cell
    has is in a running cover cell; the cover is a fixed list (the same on every call)."""
    names = list(DIMENSIONS)
    running = [c for c in ALL_CELLS if not refusals(c)]
    in_running = set().union(*(pairs_of(c) for c in running))
    covered = set().union(*(pairs_of(c) for c in COVER))
    covered_running = set().union(*(pairs_of(c) for c in COVER if not refusals(c)))
    for i, j in itertools.combinations(range(len(names)), 2):
        for a in DIMENSIONS[names[i]]:
            for b in DIMENSIONS[names[j]]:
                pair = (i, a, j, b)
                assert pair in covered, f"{names[i]}={a}, {names[j]}={b} is in no cover cell"
                if pair in in_running:
                    assert pair in covered_running, f"{names[i]}={a}, {names[j]}={b} is in no running cover cell"
    assert len(set(COVER)) == len(COVER) and pairwise_cover.__wrapped__() == COVER
    assert len(ALL_CELLS) == 1792


def test_every_documented_refusal_applies_somewhere_and_is_in_the_cover():
    for r in REFUSED:
        assert any(r.applies(c) for c in ALL_CELLS), r.name
        assert any(r.applies(c) for c in COVER), r.name


# ---- the DIRK reference, checked once against a reference outside rampde ------------------------------

def _autograd_dirk(f, tab, y0, grid, newton_iterations=8):
    """A DIRK solve by plain autograd over the whole state: each implicit stage by full Newton
    iterations (the Jacobian at every iterate, built with create_graph), so that backprop goes
    through the converged iteration."""
    ys = [y0]
    y = y0
    for n in range(len(grid) - 1):
        t0, h = grid[n], grid[n + 1] - grid[n]
        ks = []
        for i in range(tab.stages):
            ti = t0 + tab.c[i] * h
            base = y + h * sum((a * k for a, k in zip(tab.a[i], ks)), torch.zeros_like(y))
            g = tab.diag[i]
            if g == 0.0:
                ks.append(f(ti, base))
                continue
            k = ks[-1] if ks else f(ti, y)
            for _ in range(newton_iterations):
                z = base + h * g * k
                jac = torch.autograd.functional.jacobian(lambda zz: f(ti, zz), z, create_graph=True)
                m = z.numel()
                lhs = torch.eye(m, dtype=z.dtype) - h * g * jac.reshape(m, m)
                k = k + torch.linalg.solve(lhs, (f(ti, z) - k).reshape(-1)).reshape(k.shape)
            ks.append(f(ti, base + h * g * k))
        y = y + h * sum(b * k for b, k in zip(tab.b, ks))
        ys.append(y)
    return ys


def _grid_outputs(ys, grid):
    idx = [int(torch.argmin((grid - t).abs())) for t in T_OUT]
    assert all(abs(float(grid[i]) - t) < 1e-12 for i, t in zip(idx, T_OUT))
    return torch.stack([ys[i] for i in idx], 1)


@pytest.mark.parametrize("host", ["torchdiffeq", "torchode"])
def test_dirk_fixed_reference_equals_autograd_dirk(host):
    """The DIRK families' reference (rampde fp64, "steps", default Newton tolerances 1e-9 / 1e-11 on a
    fixed grid) against backprop through converged Newton iterations (1e-7 relative: the Newton
    tolerance, amplified by 8 steps)."""
    cell = Cell(host, "dirk-fixed", "steps", "discrete", "plain", "fp64")
    ref = reference(*cell[:2], cell.field, "fp64")
    fb = make_field("plain", F64)
    y0 = y0_value().requires_grad_(True)
    grid = torch.arange(0, 9, dtype=F64) * STEP
    tab = rampde_plugins.get_registry().tableau("sdirk2")
    ys = _grid_outputs(_autograd_dirk(fb.func, tab, y0, grid), grid)
    assert _rel(ref.ys, ys) <= 1e-9
    assert _rel(ref.grad, gradient(ys, y0, fb.params)) <= 1e-7


@needs_torchdiffeq_callbacks
def test_dirk_adaptive_reference_equals_autograd_dirk_on_its_steps():
    """The adaptive DIRK reference (torchdiffeq, kvaerno3) against backprop through converged Newton
    iterations on the steps it accepted (read with torchdiffeq's accept callback; its steps land on
    every output)."""
    fb = make_field("plain", F64)
    accepted = []
    fb.func.callback_accept_step = lambda t0, y, dt: accepted.append(float(t0 + dt))
    y0 = y0_value().requires_grad_(True)
    ys, _ = solve(Cell("torchdiffeq", "dirk-adaptive", "steps", "discrete", "plain", "fp64"), fb, y0)
    want = gradient(ys, y0, fb.params)
    ref = reference("torchdiffeq", "dirk-adaptive", "plain", "fp64")
    assert _rel(want, ref.grad) <= 1e-12  # the reference is this solve
    grid = torch.tensor([T_OUT[0], *accepted], dtype=F64)
    fb = make_field("plain", F64)
    y0 = y0_value().requires_grad_(True)
    tab = rampde_plugins.get_registry().tableau("kvaerno3")
    out = _grid_outputs(_autograd_dirk(fb.func, tab, y0, grid), grid)
    assert len(accepted) >= 4
    assert _rel(ys.detach(), out) <= 1e-8
    assert _rel(want, gradient(out, y0, fb.params)) <= 1e-6


def test_inner_leaf_bf16_bound_is_the_hosts():
    """``BF16_DERIVATIVE_BOUND`` is not a bound chosen to pass: on the inner-leaf field (a velocity that
    autograd differentiates inside the field) torchdiffeq's own rk4 under bf16 autocast is itself
    further than ``BF16_BOUND`` from the fp64 gradient on the same steps, and within the looser bound."""
    torchdiffeq = pytest.importorskip("torchdiffeq")

    def grad(dtype, autocast):
        fb = make_field("inner-leaf", dtype)
        y0 = y0_value().to(dtype).requires_grad_(True)
        torch.manual_seed(SEED)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ys = torchdiffeq.odeint(fb.func, y0, t_out(dtype), method="rk4", options={"step_size": STEP})
        return gradient(ys.movedim(0, 1), y0, fb.params)

    err = _rel(grad(torch.float32, True), grad(F64, False))
    assert BF16_BOUND < err <= BF16_DERIVATIVE_BOUND, err


def test_fp64_bounds_widen_only_where_the_reference_itself_moves():
    """``rounding_sensitivity`` widens fp64 bounds only where the host's own method is that sensitive:
    on the adaptive bn-closure field a one-ulp change of ``y0`` moves torchode's own Dopri5 by more
    than ``FP64_BOUND``; on the plain field by rounding only."""
    assert rounding_sensitivity("torchode", "explicit-adaptive", "bn-closure", "fp64")[0] > FP64_BOUND
    plain = rounding_sensitivity("torchode", "explicit-adaptive", "plain", "fp64")
    assert plain[0] < 1e-13 and plain[1] < 1e-13
