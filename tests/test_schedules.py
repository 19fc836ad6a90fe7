"""Checkpoint schedules (issue 11): every schedule returns the same gradient, binomial schedules
recompute the minimal number of steps, memory is what each schedule promises, misuse is refused.

References that are not rampde: torchdiffeq's own backprop (fp64, fixed grids), the closed form of
binomial checkpointing (an oracle computed here, independently of the schedule code), analytic
solutions (fp16 stress problem)."""

import math

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import AdjointScaler, BinomialSchedule, SegmentsSchedule, StepsSchedule, collect_stats
from rampde_plugins._stats import SavedTensorMeter
from rampde_torchode import RampdeAdjoint

from .helpers import MLPField, rel
from .test_mixed_precision import STRESS_T, STRESS_Y0, PolynomialDecay, _rel_each, _stress_analytic

N_FIXED = 20
# fp64 schedules of the must-show list; "sqrt" stands for c = ceil(sqrt(N)) of the solve at hand
FP64_SCHEDULES = ["steps", "graphs", 1, 2, 5, "sqrt", SegmentsSchedule(3)]
ADAPTIVE_SCHEDULES = FP64_SCHEDULES  # "graphs" too: every trial taped, rejected ones dropped


def _spec(schedule, n):
    return math.ceil(math.sqrt(n)) if schedule == "sqrt" else schedule


def _ids(s):
    return repr(s) if not isinstance(s, str) else s


def _flat(*tensors):
    return torch.cat([t.reshape(-1) for t in tensors if t is not None])


# ---- identical gradients, fp64 ------------------------------------------------------------------

def _torchdiffeq_grads(method, options, t_values, *, n_steps=N_FIXED):
    field = MLPField()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    t = torch.tensor(t_values, dtype=torch.float64, requires_grad=True)
    with collect_stats() as stats:
        y = odeint(field, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
        # every output counts, with different weights (outputs inside steps and at grid points)
        w = torch.linspace(0.5, 2.0, y.shape[0], dtype=torch.float64)[:, None, None]
        (w * y**2).sum().backward()
    grads = _flat(y0.grad, t.grad, *(p.grad for p in field.parameters()))
    return grads, (stats.last if len(stats) else None)


T_OUT = [0.0, 0.33, 0.5, 0.8, 1.0]  # 0.33 and 0.8 fall inside steps of 0.05, 0.5 and 1.0 on grid points


@pytest.mark.parametrize("schedule", FP64_SCHEDULES, ids=_ids)
def test_fixed_grid_gradients_identical_across_schedules_and_equal_torchdiffeq_backprop(schedule):
    opts = {"step_size": 1.0 / N_FIXED}
    ref, _ = _torchdiffeq_grads("rampde_rk4", opts, T_OUT)
    host, _ = _torchdiffeq_grads("rk4", opts, T_OUT)  # torchdiffeq's own backprop through its steps
    got, rec = _torchdiffeq_grads("rampde_rk4", {**opts, "checkpoint": _spec(schedule, N_FIXED)}, T_OUT)
    assert rec.n_steps == N_FIXED and rec.backward_done
    assert rel(got, ref) <= 1e-12 and rel(got, host) <= 1e-12
    assert rec.schedule == ("binomial" if isinstance(_spec(schedule, N_FIXED), int) else
                            getattr(schedule, "name", schedule))
    assert rec.taped_steps == N_FIXED  # every step's graph was built exactly once


@pytest.mark.parametrize("schedule", FP64_SCHEDULES, ids=_ids)
def test_cubic_outputs_and_perturb_identical_across_schedules(schedule):
    opts = {"step_size": 1.0 / N_FIXED, "interp": "cubic", "perturb": True}
    ref, _ = _torchdiffeq_grads("rampde_rk4", opts, T_OUT)
    got, _ = _torchdiffeq_grads("rampde_rk4", {**opts, "checkpoint": _spec(schedule, N_FIXED)}, T_OUT)
    assert rel(got, ref) <= 1e-12


@pytest.mark.parametrize("method", ["rampde_dopri5", "rampde_bosh3"])
@pytest.mark.parametrize("schedule", ADAPTIVE_SCHEDULES, ids=_ids)
def test_adaptive_gradients_identical_across_schedules(method, schedule):
    # bosh3: torchdiffeq reuses the last stage of every step (a carried first stage whose cotangent
    # flows into the previous step) -- it must survive recomputation from a checkpoint.
    ref, rec_ref = _torchdiffeq_grads(method, {}, T_OUT)
    n = rec_ref.n_steps
    got, rec = _torchdiffeq_grads(method, {"checkpoint": _spec(schedule, n)}, T_OUT)
    assert rec.n_steps == n and n >= 6
    assert rel(got, ref) <= 1e-12
    if isinstance(_spec(schedule, n), int):
        # adaptive: the forward keeps y0 only, the backward runs the whole binomial stream
        assert rec.checkpoints <= _spec(schedule, n) and rec.recomputed_steps > 0
    if schedule == "graphs":  # the forward's graphs are reversed: no evaluation in the backward
        assert rec.backward_nfe == 0 and rec.taped_steps == n


class _TimeOnly(torch.nn.Module):
    """torchdiffeq's ``ExpODE`` test field: f(t, y) = -0.1 exp(-0.1 t), no parameter and no ``y``.

    With times that need no gradient nothing a step computes but its end state has a graph, so the
    carried last stage of FSAL methods and outputs between steps are not differentiable at all (a
    VJP must leave them out, not fail on them)."""

    def forward(self, t, y):
        return -0.1 * torch.exp(-0.1 * t) * torch.ones_like(y)


@pytest.mark.parametrize("method", ["rampde_dopri5", "rampde_bosh3", "rampde_rk4"])
@pytest.mark.parametrize("schedule", [*FP64_SCHEDULES, StepsSchedule(stages=True)], ids=_ids)
def test_field_without_state_or_parameters_every_schedule(method, schedule):
    # Found by torchdiffeq's own test_adjoint_against_odeint (ode='exp', t_grad=False) run with
    # options["checkpoint"] = "graphs" (compat/upstream.py --checkpoint graphs).  Reference: the
    # discrete map y_{n+1} = y_n + h Phi(t_n, h) has dy(t_i)/dy0 = 1 exactly, so the gradient is
    # the sum of the cotangents, whatever the steps.
    t = torch.linspace(1, 8, 10, dtype=torch.float64)
    y0 = torch.exp(-0.1 * t[:1]).detach().requires_grad_(True)
    opts = {"step_size": 7 / 63} if method == "rampde_rk4" else {}  # outputs on grid points
    n = 63 if method == "rampde_rk4" else 12
    ys = odeint(_TimeOnly(), y0, t, method=method, rtol=1e-9, atol=1e-12,
                options={**opts, "checkpoint": _spec(schedule, n)})
    host = odeint(_TimeOnly(), y0.detach(), t, method=method[len("rampde_"):], rtol=1e-9, atol=1e-12, options=opts)
    assert rel(ys, host) <= 1e-12  # torchdiffeq's own steps (bosh3's interpolation is 1e-6 off exp)
    cot = torch.linspace(0.5, 2.0, len(t), dtype=torch.float64)[:, None]
    (g,) = torch.autograd.grad(ys, y0, cot)
    assert rel(g, cot.sum().reshape(1)) <= 1e-12


def _torchode_grads(adaptive, checkpoint=None):
    field = MLPField(batched_time=True)
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    t_eval = torch.tensor([[0.0, 0.3, 0.6, 1.0], [0.0, 0.25, 0.5, 0.75], [0.1, 0.2, 0.9, 1.3], [0.0, 0.5, 0.6, 0.7]],
                          dtype=torch.float64, requires_grad=True)
    kw = {} if checkpoint is None else {"checkpoint": checkpoint}
    if adaptive:
        sol = to.solve_ivp(field, y0, t_eval, method="rampde_dopri5", **kw)
    else:
        sol = to.solve_ivp(field, y0, t_eval, method="rampde_rk4", dt0=0.125, **kw)
    (sol.ys**2).sum().backward()
    return _flat(y0.grad, t_eval.grad, *(p.grad for p in field.parameters())), sol.stats["rampde"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("schedule", FP64_SCHEDULES, ids=_ids)
def test_torchode_gradients_identical_across_schedules(adaptive, schedule):
    ref, rec_ref = _torchode_grads(adaptive)
    got, rec = _torchode_grads(adaptive, _spec(schedule, rec_ref.n_steps))
    assert rec.n_steps == rec_ref.n_steps and rel(got, ref) <= 1e-12
    if schedule == "graphs":  # every iteration's trial taped in the forward: nothing evaluated in the backward
        assert rec.backward_nfe == 0 and rec.taped_steps == rec.n_steps


def _rejecting_torchode_grads(checkpoint, policy="fp64", dtype=torch.float64):
    """Per-sample adaptive steps where samples reject at different iterations: too large a first step
    for samples 1 and 3, a stiffer decay for sample 2 -- a taped iteration mixes accepted and rejected
    samples, whose rows must then be the identity (as when "steps" rebuilds them with h = 0)."""
    field = MLPField(batched_time=True, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    y0 = (3 * torch.randn(4, 3, dtype=dtype, generator=gen)).requires_grad_(True)
    t_eval = torch.tensor([[0.0, 0.4, 1.0], [0.0, 0.5, 2.0], [0.0, 0.1, 0.3], [0.2, 0.9, 1.5]],
                          dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 1.0, 30.0, 1.0], dtype=dtype).reshape(4, 1)
    term = to.ODETerm(lambda t, y: scale * field(t, y))
    dt0 = torch.tensor([0.01, 1.5, 0.01, 1.0], dtype=torch.float64)
    if checkpoint == "host":  # torchode's own backprop through the same frozen steps
        solver = to.AutoDiffAdjoint(to.Dopri5(term=None), to.IntegralController(atol=1e-7, rtol=1e-7),
                                    backprop_through_step_size_control=False)
    else:
        solver = RampdeAdjoint(to.Dopri5(term=None), to.IntegralController(atol=1e-7, rtol=1e-7), precision=policy,
                               params=tuple(field.parameters()), checkpoint=checkpoint)
    sol = solver.solve(to.InitialValueProblem(y0, t_eval=t_eval), term=term, dt0=dt0)
    (sol.ys.double() ** 2).sum().backward()
    return _flat(y0.grad, t_eval.grad, *(p.grad for p in field.parameters())), sol.stats.get("rampde")


def test_torchode_graphs_with_per_sample_rejections_equal_steps():
    ref, rec_ref = _rejecting_torchode_grads("steps")
    got, rec = _rejecting_torchode_grads("graphs")
    # samples rejected at different iterations: every taped iteration is a mix
    assert rec_ref.rejected_steps >= 3 and rec.n_steps == rec_ref.n_steps and rec.rejected_steps == rec_ref.rejected_steps
    assert rel(got, ref) <= 1e-12
    assert rec.backward_nfe == 0 and rec.taped_steps == rec.n_steps
    # and torchode's own backprop through the same (frozen) steps, the test_adaptive bound
    host, _ = _rejecting_torchode_grads("host")
    assert rel(got, host) <= 1e-8


def test_torchode_fixed_steps_equal_torchode_autodiff_in_fp64():
    # torchode's own AutoDiffAdjoint through its Heun steps is the non-rampde reference.
    field = MLPField(batched_time=True)
    y0 = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t_eval = torch.linspace(0, 1, 5, dtype=torch.float64).expand(3, 5)
    grads = {}
    for name, kw in [("host", {}), ("graphs", {"checkpoint": "graphs"}), ("binomial", {"checkpoint": 2})]:
        yr = y0.clone().requires_grad_(True)
        method = "heun" if name == "host" else "rampde_heun"
        sol = to.solve_ivp(field, yr, t_eval, method=method, dt0=torch.full((3,), 0.125, dtype=torch.float64),
                           controller=to.FixedStepController(), **kw)
        (sol.ys**2).sum().backward()
        grads[name] = _flat(yr.grad, *(p.grad for p in field.parameters()))
        field.zero_grad()
    assert rel(grads["graphs"], grads["host"]) <= 1e-12 and rel(grads["binomial"], grads["host"]) <= 1e-12


# ---- fields that need replay: dropout and BatchNorm -----------------------------------------------

class NoisyField(torch.nn.Module):
    """Dropout and BatchNorm in training mode: recomputed steps must see the same random numbers and
    buffers, and the buffers end as the forward wrote them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.l1 = torch.nn.Linear(3, 16).double()
        self.bn = torch.nn.BatchNorm1d(16).double()
        self.drop = torch.nn.Dropout(0.3)
        self.l2 = torch.nn.Linear(16, 3).double()

    def forward(self, t, y):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(y)))))


@pytest.mark.parametrize("schedule", ["steps", "graphs", 1, 3, SegmentsSchedule(4)], ids=_ids)
def test_dropout_and_batchnorm_fields_identical_across_schedules(schedule):
    def run(checkpoint):
        field = NoisyField()
        y0 = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        torch.manual_seed(5)
        y = odeint(field, y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), method="rampde_rk4",
                   options={"step_size": 0.1, "checkpoint": checkpoint})
        after_forward = torch.rand(1)  # where the user's random stream continues
        buffers = [b.clone() for b in field.buffers()]
        y.sum().backward()
        return (_flat(y0.grad, *(p.grad for p in field.parameters())), after_forward, buffers,
                [b.clone() for b in field.buffers()], y.detach())

    ref = run("steps")
    got = run(schedule)
    assert torch.equal(got[4], ref[4])  # the same forward
    assert rel(got[0], ref[0]) <= 1e-12
    assert torch.equal(got[1], ref[1])  # the same random stream after the forward
    for b_fwd, b_bwd, b_ref in zip(got[2], got[3], ref[3]):
        assert torch.equal(b_fwd, b_bwd) and torch.equal(b_bwd, b_ref)  # backward left them as written


# ---- recompute counts: the binomial oracle ------------------------------------------------------

def binomial_advances(l, c):
    """t(l, c) = r*l - C(c+r, r-1), r the smallest integer with C(c+r, c) >= l (revolve's convention:
    y_0 is one of the c checkpoints, the first sweep counts as advances, the last step is taped right
    after it).  Independent of the schedule code."""
    r = 0
    while math.comb(c + r, c) < l:
        r += 1
    return r * l - math.comb(c + r, r - 1) if r else 0


def test_oracle_known_values():
    assert binomial_advances(1, 1) == 0
    assert binomial_advances(7, 2) == 11  # r = 3: 21 - C(5, 2)
    assert binomial_advances(20, 1) == 190  # c = 1: l(l-1)/2
    assert all(binomial_advances(l, l) == l - 1 for l in range(1, 50))  # every state fits: one sweep


class _CountingSweep:
    """Stands in for the reverse sweep: counts what the keeper asks for, computes nothing."""

    last = 10**9

    def __init__(self):
        self.advances = self.tapes = self.reversed = 0

    def tape(self, n0, n1, y, k0):
        self.tapes += n1 - n0
        return (n0, n1)

    def advance(self, n, y, k0):
        self.advances += 1
        return y, None

    def after(self, tape, n, y, k0):
        return y, None

    def reverse(self, tape):
        self.reversed += tape[1] - tape[0]


def test_binomial_keeper_counts_for_every_l_and_c():
    """For every l <= 300 and c <= 12: the forward driver's rule (advance unless the keeper tapes the
    step) plus the keeper's backward make t(l, c) advances and l taped steps, each reversed once."""
    y = torch.zeros(())
    for l in range(1, 301):
        for c in range(1, 13):
            keeper = BinomialSchedule(c).keeper(l, torch.float32)
            sweep = _CountingSweep()
            fwd_adv = fwd_tape = 0
            for n in range(l):
                keeper.keep(n, y, None)
                if keeper.tape_now(n):
                    keeper.put_tape(n, (n, n + 1))
                    fwd_tape += 1
                else:
                    fwd_adv += 1
            keeper.end_forward(l)
            keeper.reverse(sweep)
            assert fwd_adv + sweep.advances == binomial_advances(l, c), (l, c)
            assert fwd_tape + sweep.tapes == l and sweep.reversed == l, (l, c)
            assert keeper.checkpoints <= c


def _counted_solve(l, c, method="rampde_euler"):
    w = torch.tensor(-0.5, requires_grad=True)
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return w * y

    with collect_stats() as stats:
        y = odeint(f, torch.ones(1), torch.tensor([0.0, 1.0]), method=method,
                   options={"grid_constructor": lambda f, y0, t: torch.linspace(0.0, 1.0, l + 1), "checkpoint": c,
                            "adjoint_params": (w,)})
        y[-1].sum().backward()
    assert stats.last.n_steps == l
    return calls[0], stats.last


# How the stats map to revolve's count: n_steps = l; taped_steps = l (the last step taped in the
# forward, the others in the backward); the first sweep advances l - 1 steps and recomputed_steps
# counts the advances of the backward, so t(l, c) = (l - 1) + recomputed_steps.  Euler has one stage
# and the forward's first evaluation (the hidden-tensor probe) is reused as step 0's stage, so the
# field is called exactly t(l, c) + l times.
REAL_CASES = [(l, c) for l in (1, 2, 3, 5, 8, 13, 34, 100, 300) for c in (1, 2, 3, 5, 12)]


@pytest.mark.parametrize("l, c", REAL_CASES)
def test_binomial_solves_evaluate_the_field_the_minimal_number_of_times(l, c):
    calls, rec = _counted_solve(l, c)
    assert calls == binomial_advances(l, c) + l
    assert rec.n_steps == l and rec.taped_steps == l
    assert (l - 1) + rec.recomputed_steps == binomial_advances(l, c)
    assert rec.forward_nfe + rec.backward_nfe == calls and rec.checkpoints <= c


@pytest.mark.slow
def test_binomial_solves_minimal_for_every_l_and_c():
    for l in range(1, 301):
        for c in range(1, 13):
            calls, rec = _counted_solve(l, c)
            assert calls == binomial_advances(l, c) + l, (l, c, rec)


def test_steps_graphs_segments_counts():
    w = torch.tensor(-0.5, requires_grad=True)
    for checkpoint, checkpoints, recomputed in [("steps", 40, 0), ("graphs", 0, 0), (SegmentsSchedule(7), 6, 0)]:
        with collect_stats() as stats:
            y = odeint(lambda t, y: w * y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
                       options={"step_size": 1 / 40, "checkpoint": checkpoint, "adjoint_params": (w,)})
            y[-1].sum().backward()
        rec = stats.last
        assert (rec.checkpoints, rec.recomputed_steps, rec.taped_steps, rec.backward_steps) == (checkpoints, recomputed, 40, 40)
        # graphs: nothing is evaluated again in the backward
        assert (rec.backward_nfe == 0) == (checkpoint == "graphs")


# ---- memory -------------------------------------------------------------------------------------

def _memory(n, checkpoint, dim=256, batch=32):
    """Peak bytes autograd keeps (saved-tensor meter) in the forward and in the backward, the bytes of
    the parameters the adjoint Function saves, and the solve's stats, for an MLP field and n RK4 steps."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Tanh(), torch.nn.Linear(dim, dim))
    y0 = torch.randn(batch, dim)
    params = tuple(net.parameters())
    with collect_stats() as stats:
        with SavedTensorMeter() as fwd:
            y = odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                       options={"step_size": 1.0 / n, "checkpoint": checkpoint, "adjoint_params": params})
        with SavedTensorMeter() as bwd:
            y[-1].sum().backward()
    return fwd.peak, bwd.peak, sum(p.numel() * p.element_size() for p in params), stats.last


STATE_BYTES = 32 * 256 * 4
SMALL = 4096  # output times and a few scalars the Function saves
GRID = 8  # bytes a step: the time grid the Function saves (4 in fp32; bookkeeping, not a state)


@pytest.mark.parametrize("n", [100, 400, 1600])
def test_binomial_memory_is_c_states_plus_one_step_graph(n):
    c = 5
    fwd, bwd, params, rec = _memory(n, c)
    _, one_step, _, _ = _memory(20, StepsSchedule(group=1))  # the saved tensors of one rebuilt step
    assert rec.stored_bytes <= c * STATE_BYTES and rec.checkpoints <= c
    # forward: the parameters and only the last step's graph (revolve tapes it after the first sweep)
    assert fwd <= params + one_step + GRID * (n + 1) + SMALL
    # backward: one step's graph at a time, whatever n
    assert bwd <= one_step + SMALL


def test_graphs_keep_every_step_and_steps_keep_every_state():
    fwd_g, bwd_g, params, rec_g = _memory(50, "graphs")
    fwd_s, bwd_s, _, rec_s = _memory(50, StepsSchedule(group=1))  # bwd_s: one step's graph
    assert rec_g.stored_bytes == 0 and fwd_g >= params + 50 * bwd_s * 0.9  # fifty steps' graphs from the forward
    assert rec_s.stored_bytes == 50 * STATE_BYTES and fwd_s <= params + 50 * STATE_BYTES + SMALL


# ---- fp16 adjoint scaling with every schedule -----------------------------------------------------

@pytest.mark.parametrize("schedule", ["graphs", 20, SegmentsSchedule(8)], ids=_ids)
def test_fp16_overflow_is_redone_with_every_schedule(schedule):
    ref = _stress_analytic()
    model = PolynomialDecay()
    y0 = torch.tensor([STRESS_Y0], requires_grad=True)
    # a target far beyond fp16's max forces overflowing VJPs (see test_mixed_precision)
    with collect_stats() as stats:
        y = odeint(model, y0, torch.linspace(0, STRESS_T, 400), method="rampde_rk4",
                   options={"precision": "fp16", "scaler": AdjointScaler(target=2.0**24), "checkpoint": schedule})
        grads = torch.autograd.grad(0.5 * (y[-1] ** 2).sum(), [y0, model.a, model.b, model.c])
    rec = stats.last
    assert rec.scale_backoffs > 0 and rec.redone_steps > 0
    # 1e-2: the rampde paper's bound for this problem (fp16 velocities; measured ~2e-3)
    assert max(_rel_each(grads, ref)) <= 1e-2


# ---- misuse -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, exc, match", [
    ("everything", ValueError, "'steps'.*'graphs'.*integer"),
    (0, ValueError, "at least 1 stored state"),
    (2.5, TypeError, "checkpoint"),
    (True, TypeError, "checkpoint"),
])
def test_bad_checkpoint_values_are_refused_before_anything_runs(bad, exc, match):
    calls = []
    with pytest.raises(exc, match=match):
        odeint(lambda t, y: calls.append(1) or -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 0.1, "checkpoint": bad})
    assert not calls
    with pytest.raises(exc, match=match):
        to.solve_ivp(lambda t, y: -y, torch.ones(1, 2), torch.tensor([0.0, 1.0]), method="rampde_rk4", dt0=0.1,
                     checkpoint=bad)


def test_schedule_objects_validate_their_argument():
    with pytest.raises(ValueError, match="positive integer"):
        SegmentsSchedule(0)
    with pytest.raises(TypeError, match="positive integer"):
        BinomialSchedule(1.5)


def test_checkpoint_keyword_only_for_rampde_methods_in_torchode():
    with pytest.raises(TypeError, match="rampde_\\* methods only"):
        to.solve_ivp(lambda t, y: -y, torch.ones(1, 2), torch.tensor([0.0, 1.0]), method="dopri5", checkpoint=3)


@pytest.mark.parametrize("schedule", ["graphs", 3])
def test_second_backward_through_a_consuming_schedule_says_so(schedule):
    w = torch.tensor(-0.5, requires_grad=True)
    y = odeint(lambda t, y: w * y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 0.1, "checkpoint": schedule, "adjoint_params": (w,)})
    y[-1].sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*checkpoint='steps'"):
        y[-1].sum().backward()


def test_second_backward_with_steps_gives_the_same_gradient():
    w = torch.tensor(-0.5, requires_grad=True)
    y = odeint(lambda t, y: w * y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 0.1, "checkpoint": SegmentsSchedule(3), "adjoint_params": (w,)})
    (g1,) = torch.autograd.grad(y[-1].sum(), w, retain_graph=True)
    (g2,) = torch.autograd.grad(y[-1].sum(), w)
    assert torch.equal(g1, g2)


def test_no_grad_solve_keeps_nothing_whatever_the_schedule():
    for schedule in ("graphs", 2, SegmentsSchedule(2)):
        with collect_stats() as stats, torch.no_grad():
            odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
                   options={"step_size": 0.1, "checkpoint": schedule})
        assert stats.last.stored_bytes == 0 and stats.last.taped_steps == 0


def test_rampde_core_exports_the_schedules():
    assert rampde_plugins.checkpoint_schedule(4).c == 4
    assert rampde_plugins.checkpoint_schedule("graphs").name == "graphs"
    assert isinstance(rampde_plugins.checkpoint_schedule(None), rampde_plugins.StepsSchedule)


_RSS_JOB = r"""
import math, sys, json
sys.path.insert(0, sys.argv[1])
import torch
from torchdiffeq import odeint
import rampde_plugins
from rampde_plugins import collect_stats
from _common import current_rss_bytes, peak_rss_bytes, release_free_memory, reset_peak_rss
torch.set_num_threads(1)
n = int(sys.argv[2])
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(1024) * 0.1)
y0 = torch.randn(128, 1024)  # 512 KiB: above glibc's mmap threshold, so RSS follows every state
f = lambda t, y: torch.tanh(y) * w
c = math.ceil(math.sqrt(n))
def run(steps, checkpoint):
    with collect_stats() as stats:
        y = odeint(f, y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                   options={"step_size": 1.0 / steps, "checkpoint": checkpoint, "adjoint_params": (w,)})[-1]
        release_free_memory(); reset_peak_rss(); before = current_rss_bytes()
        y.sum().backward()
        peak = peak_rss_bytes()[0] - before
    return peak, stats.last
run(4, 2)  # one-time initialisation (kernels, autograd threads) is not the schedule's memory
one_step, _ = run(8, "steps")  # steps: the backward holds one rebuilt step (states are already held)
peak, rec = run(n, c)
print(json.dumps({"peak": peak, "one_step": one_step, "checkpoints": rec.checkpoints, "c": c}))
"""


@pytest.mark.parametrize("n", [100, 400, 1600])
def test_binomial_backward_peak_rss_is_c_states_plus_one_step(n):
    """Peak RSS growth of the backward, in a fresh process: c = ceil(sqrt(N)) checkpoints of 512 KiB
    states plus one step's backward (measured as the "steps" backward of a short solve, whose states
    are held before it starts) plus a small constant (the saved-tensor meter's version of this is
    test_binomial_memory_is_c_states_plus_one_step_graph).  With 1 MiB states this machine measured
    46.8, 58.1 and 72.1 MiB for N = 100, 400, 1600 (c = 10, 20, 40; one step 33-36 MiB)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    proc = subprocess.run([sys.executable, "-c", _RSS_JOB, str(bench), str(n)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    state = 2**19
    # the checkpoints are taken in the backward's first sweep (the forward keeps only the last
    # step's graph), so the growth is c states + one step + a constant: the adjoint, its
    # cotangents, autograd's and the allocator's buffers.  Measured over c states + one step:
    # -3 to +1 states in three processes run side by side, +8.6 once in the parallel suite (the
    # one-step reading moves too); hence 16 states (8 MiB).  "steps" would hold N states: 800 MiB
    # at N = 1600, and 1/4 of them would be 200 MiB.
    assert r["checkpoints"] <= r["c"]
    assert r["peak"] <= r["c"] * state + r["one_step"] + 16 * state, r


class _HalvingController(rampde_plugins.BatchedStepController):
    """A minimal per-sample controller of the core protocol: accepts an error below ``tol`` and grows
    the step by 1.5, rejects otherwise -- a non-finite error included -- and halves it."""

    def __init__(self, tol):
        self.tol = tol

    def start(self, f, t0, y0, dt0):
        return dt0.clone(), None

    def judge(self, t0, dt, y0, y1, err):
        e = err.abs().flatten(1).amax(1)
        ok = torch.isfinite(e) & (e <= self.tol)
        return ok, torch.where(ok, 1.5 * dt, 0.5 * dt), None

    def merge(self, running):
        pass

    def rejecting_error(self, y0):
        return torch.full_like(y0, math.inf)


def test_graphs_per_sample_trial_that_overflows_gives_the_gradient_of_steps():
    """Sample 1's first trial overflows (y' = -a y^3 from y = 40 with a step of 1: its stages reach
    inf, its error is NaN) and is rejected while sample 0 accepts.  Kept in the taped iteration under
    a zero cotangent, those rows would make the VJP 0 * inf = NaN and poison the parameter's gradient;
    the iteration is taped again with h = 0 for them (what "steps" rebuilds).  Core only, no host."""
    from rampde_plugins import BatchedOutputs, StageInterpolation, solve_batched_adaptive

    reg = rampde_plugins.get_registry()
    tab = reg.tableau("dopri5")

    def grads(checkpoint):
        a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        y0 = torch.tensor([[0.5, -0.3], [40.0, 1.0]], dtype=torch.float64, requires_grad=True)
        t_eval = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]], dtype=torch.float64)
        out = BatchedOutputs(t_eval, StageInterpolation(tab))
        with collect_stats() as stats:
            ys, info = solve_batched_adaptive(lambda t, y: -a * y**3, y0, t_eval[:, 0], t_eval[:, -1], out,
                                              tableau=tab, policy=reg.policy("fp64"), params=(a,),
                                              controller=_HalvingController(1e-8),
                                              dt0=torch.tensor([0.01, 1.0], dtype=torch.float64),
                                              checkpoint=checkpoint)
            (ys**2).sum().backward()
        assert bool((info["status"] == 0).all()) and bool(torch.isfinite(ys).all())
        return _flat(y0.grad, a.grad), stats.last

    ref, rec_ref = grads("steps")
    got, rec = grads("graphs")
    assert rec.rejected_steps == rec_ref.rejected_steps >= 1
    assert bool(torch.isfinite(got).all()) and rel(got, ref) <= 1e-12
    # the overflowing iteration was taped again: more evaluations than the untaped forward of
    # "steps" (which makes exactly torchode's), none in the backward
    assert rec.forward_nfe > rec_ref.forward_nfe and rec.backward_nfe == 0


# ---- "steps" groups small steps into one VJP ------------------------------------------------------

def _count_vjps(monkeypatch):
    calls = [0]
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls[0] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("policy", ["fp64", "bf16"])
def test_steps_groups_small_step_graphs_into_one_vjp_with_the_gradient_of_one_vjp_per_step(policy, monkeypatch):
    """A small field's step graphs are rebuilt 16 at a time and reversed by one VJP (the per-call cost
    of autograd dominates such a backward), each step still starting from *its own stored state*: the
    value is the stored one, the adjoint passes to the previous step's end as the identity -- so the
    gradient is that of one VJP per step.  bf16 stores its states in bf16: chaining the 16 steps from
    the first stored state instead (what SegmentsSchedule does, with 1/16 of the states) gives another
    trajectory and another gradient, which the second bound shows the test would see."""
    dtype = torch.float64 if policy == "fp64" else torch.float32
    field = MLPField(dtype=dtype)
    y0 = torch.randn(4, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    calls = _count_vjps(monkeypatch)

    def grads(checkpoint):
        field.zero_grad()
        y0_ = y0.clone().requires_grad_(True)
        calls[0] = 0
        with collect_stats() as stats:
            y = odeint(field, y0_, t.to(dtype), method="rampde_rk4",
                       options={"step_size": 1.0 / 40, "precision": policy, "checkpoint": checkpoint})
            (y.double() ** 2).sum().backward()
        return _flat(y0_.grad, *(p.grad for p in field.parameters())).double(), stats.last, calls[0]

    one, rec1, vjps1 = grads(rampde_plugins.StepsSchedule(group=1))
    got, rec, vjps = grads("steps")
    assert (rec1.segment_steps, vjps1) == (0, 40)
    # the last step alone (its graph decides the group size), then 16 + 16 + 7 steps
    assert rec.schedule == "steps" and rec.segment_steps == 16 and vjps == 4
    assert rec.checkpoints == 40 and rec.backward_nfe == rec1.backward_nfe and rec.taped_steps == 40
    if policy == "fp64":
        assert rel(got, one) <= 1e-12
    else:
        # the same steps from the same stored states: equal but for the order of fp32 sums
        assert rel(got, one) <= 1e-5
        chained, _, _ = grads(SegmentsSchedule(16))
        assert rel(chained, one) > 1e-4


def test_steps_keeps_one_vjp_per_step_for_large_step_graphs():
    """A step whose graph is over 1 MiB (a 256-wide MLP at batch 512: 4 MiB) is reversed alone, so
    grouping never costs "steps" more than about 1 MiB of memory; at batch 32 (256 KiB a step) four
    steps share a VJP."""
    _, bwd, _, rec = _memory(10, "steps", batch=512)
    assert rec.segment_steps == 0 and rec.backward_steps == 10
    _, _, _, rec = _memory(10, "steps", batch=32)
    assert rec.segment_steps == 4


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (2.5, TypeError), ("4", TypeError)])
def test_steps_group_must_be_a_positive_int(bad, exc):
    with pytest.raises(exc, match="StepsSchedule\\(group\\)"):
        rampde_plugins.StepsSchedule(group=bad)


def test_steps_with_an_explicit_group_reports_it():
    w = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    with collect_stats() as stats:
        y = odeint(lambda t, y: w * y, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                   method="rampde_rk4", options={"step_size": 1 / 20, "checkpoint": StepsSchedule(group=8),
                                                 "adjoint_params": (w,)})
        y[-1].sum().backward()
    # 20 steps, 8 a VJP, each from its own stored state; the gradient is the analytic one
    assert stats.last.segment_steps == 8 and stats.last.checkpoints == 20 and stats.last.backward_steps == 20
    assert abs(float(w.grad) - 2 * math.exp(-0.5)) <= 1e-7  # d/dw sum exp(w t) at t = 1; RK4 h = 0.05


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_stored_states_die_with_the_backward_not_with_the_garbage_collector(precision):
    """A solve's problem, keeper and stepper form a reference cycle; the stored states must not hang
    off it once autograd has them: after the backward (and the user's loss) they are freed at once,
    without the cyclic collector (a training loop otherwise held one more iteration's states per
    iteration: 13 MB each on the benchmark's 400-step MLP)."""
    import gc
    import weakref

    from rampde_plugins._engine import _schedules

    kept = []
    original = _schedules._StatesKeeper.release_states

    def spy(self):
        if self._fixed is not None:
            kept.append(weakref.ref(self._fixed))  # the stored states ("steps" on a grid)
        original(self)

    field = MLPField(3, 8).float()
    # (a warm-up solve: the first one of a process imports torch._dynamo, whose import keeps the
    # frames that triggered it alive -- the first solve's locals once per process, not this test's)
    odeint(field, torch.randn(4, 3), torch.tensor([0.0, 1.0]), method="rampde_rk4",
           options={"step_size": 0.5, "precision": precision})[-1].sum().backward()
    gc.disable()
    try:
        _schedules._StatesKeeper.release_states = spy
        y = odeint(field, torch.randn(4, 3), torch.tensor([0.0, 1.0]), method="rampde_rk4",
                   options={"step_size": 0.05, "precision": precision})
        y[-1].square().sum().backward()
        del y
        assert kept and all(ref() is None for ref in kept)
    finally:
        _schedules._StatesKeeper.release_states = original
        gc.enable()


def test_a_retained_graph_backward_twice_still_has_its_states():
    field = MLPField(3, 8).float()
    y = odeint(field, torch.randn(4, 3), torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 0.05, "precision": "bf16"})
    g1 = torch.autograd.grad(y[-1].sum(), list(field.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(y[-1].sum(), list(field.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_the_storage_overflow_check_runs_in_blocks_and_names_the_step(monkeypatch):
    """The fp16 storage check looks at every stored state -- a block at a time (its temporary was
    the default schedule's CPU peak) -- and still names the first step whose state overflows."""
    calls = []
    real = torch.isinf
    monkeypatch.setattr(torch, "isinf", lambda x: calls.append(x.shape) or real(x))
    n, width = 300, 2048  # 300 fp16 states of 4 KiB: 256 states per 1 MiB block
    y0 = torch.full((1, width), 1.0)
    # from step 280 (t >= 279.5/300) the state grows by 1e7/300 a step: 1 + 2 * 33333 > 65504 at step 282
    with pytest.raises(FloatingPointError, match=r"state at step 282 of 300"):
        odeint(lambda t, y: torch.where(t >= 279.5 / n, torch.full_like(y, 1e7), torch.zeros_like(y)),
               y0.requires_grad_(), torch.tensor([0.0, 1.0]), method="rampde_euler",
               options={"step_size": 1.0 / n, "precision": "fp16"})
    assert sorted(s[0] for s in calls) == [44, 256]
