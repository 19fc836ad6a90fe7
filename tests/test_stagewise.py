"""Stage-by-stage step VJPs (``stages=True`` on the steps, segments and binomial schedules).

The tape of a step keeps only its stage states; each field evaluation is redone with a graph when
the VJP reaches it.  The gradient must be the gradient of the same computation: references that are
not rampde are torchdiffeq's and torchode's own backprop in fp64 (fields with dropout and BatchNorm
included), the closed form of the linear problem (mixed precision) and the analytic gradient of the
fp16 stress problem; memory is measured with the saved-tensor meter.
"""

import math

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

from rampde_plugins import AdjointScaler, BinomialSchedule, SegmentsSchedule, StepsSchedule, collect_stats
from rampde_plugins._stats import SavedTensorMeter

from .helpers import MLPField, rel
from .test_mixed_precision import STRESS_T, STRESS_Y0, PolynomialDecay, _rel_each, _stress_analytic
from .test_real_fields import F64, FIELDS, STEP, T, _make, _reference, check_like_reference
from .test_schedules import N_FIXED, T_OUT, _torchdiffeq_grads, _torchode_grads

STAGE_SCHEDULES = [StepsSchedule(stages=True), StepsSchedule(group=1, stages=True), SegmentsSchedule(3, stages=True),
                   BinomialSchedule(1, stages=True), BinomialSchedule(2, stages=True),
                   BinomialSchedule(5, stages=True)]


def _ids(s):
    return repr(s)


def _whole_steps(s):
    """The same schedule with whole-step tapes."""
    if isinstance(s, StepsSchedule):
        return StepsSchedule(group=s.group)
    return SegmentsSchedule(s.k) if isinstance(s, SegmentsSchedule) else BinomialSchedule(s.c)


@pytest.mark.parametrize("schedule", STAGE_SCHEDULES, ids=_ids)
def test_fixed_grid_gradients_equal_whole_step_tapes_and_torchdiffeq_backprop(schedule):
    # outputs inside steps (0.33, 0.8) and at grid points; gradients of y0, of the output times and
    # of the parameters
    opts = {"step_size": 1.0 / N_FIXED}
    whole, rec_whole = _torchdiffeq_grads("rampde_rk4", {**opts, "checkpoint": _whole_steps(schedule)}, T_OUT)
    host, _ = _torchdiffeq_grads("rk4", opts, T_OUT)
    got, rec = _torchdiffeq_grads("rampde_rk4", {**opts, "checkpoint": schedule}, T_OUT)
    assert rel(got, whole) <= 1e-12 and rel(got, host) <= 1e-12
    assert rec.stage_vjp is True and rec_whole.stage_vjp is False
    assert rec.schedule == schedule.name and rec.taped_steps == N_FIXED
    # each reversed step evaluates its 4 stages once more, for their VJPs
    assert rec.recomputed_steps == rec_whole.recomputed_steps
    assert rec.backward_nfe == rec_whole.backward_nfe + 4 * N_FIXED


@pytest.mark.parametrize("schedule", [StepsSchedule(stages=True), BinomialSchedule(3, stages=True)], ids=_ids)
def test_cubic_outputs_and_perturb_equal_whole_step_tapes(schedule):
    opts = {"step_size": 1.0 / N_FIXED, "interp": "cubic", "perturb": True}
    ref, _ = _torchdiffeq_grads("rampde_rk4", opts, T_OUT)
    got, _ = _torchdiffeq_grads("rampde_rk4", {**opts, "checkpoint": schedule}, T_OUT)
    assert rel(got, ref) <= 1e-12


@pytest.mark.parametrize("method", ["rampde_dopri5", "rampde_bosh3"])
@pytest.mark.parametrize("schedule", [StepsSchedule(stages=True), BinomialSchedule(3, stages=True)], ids=_ids)
def test_adaptive_steps_and_carried_first_stages(method, schedule):
    # bosh3: the first stage of a step is the previous step's last (its cotangent crosses the step)
    ref, rec_ref = _torchdiffeq_grads(method, {}, T_OUT)
    got, rec = _torchdiffeq_grads(method, {"checkpoint": schedule}, T_OUT)
    assert rec.n_steps == rec_ref.n_steps >= 6 and rec.stage_vjp
    assert rel(got, ref) <= 1e-12


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("schedule", [StepsSchedule(stages=True), BinomialSchedule(2, stages=True)], ids=_ids)
def test_torchode_per_sample_times(adaptive, schedule):
    ref, rec_ref = _torchode_grads(adaptive)
    got, rec = _torchode_grads(adaptive, schedule)
    assert rec.n_steps == rec_ref.n_steps and rec.stage_vjp
    assert rel(got, ref) <= 1e-12


@pytest.mark.parametrize("schedule", [StepsSchedule(stages=True), BinomialSchedule(2, stages=True),
                                      SegmentsSchedule(3, stages=True)], ids=_ids)
@pytest.mark.parametrize("kind", FIELDS)
def test_dropout_and_batchnorm_equal_torchdiffeq_backprop(kind, schedule):
    """Each recomputed stage sees the random numbers and buffers its evaluation saw: gradients equal
    torchdiffeq's backprop, buffers and the random stream end as after it."""
    reference = _reference(kind)
    field, y0 = _make(kind)
    torch.manual_seed(123)
    with collect_stats() as stats:
        y = odeint(field, y0, T, method="rampde_rk4", options=dict(STEP, precision="fp64", checkpoint=schedule))[-1]
    check_like_reference(field, y0, y, reference)
    assert stats.last.replayed and stats.last.stage_vjp


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_mixed_precision_linear_problem_within_the_bounds_of_every_schedule(policy):
    """The bounds of test_linear_precision (bf16 <= 5e-3, fp16 <= 1e-3 relative to the closed form, the
    rampde paper's) with stage VJPs; 256 steps here (fp16 is emulated on this CPU) -- the closed form
    is that of these 256 steps.  And the whole-step tape's gradient to within the same bound: stages
    cast their weights per stage, so their weight gradients reach fp32 before they are summed."""
    from .helpers import linear_problem

    n = 256
    a64, y064 = linear_problem()
    a, yy = a64.clone().requires_grad_(), y064.clone().requires_grad_()
    z = (1.0 / n) * a
    eye = torch.eye(z.shape[0], dtype=F64)
    r = eye + z + z @ z / 2 + z @ z @ z / 6 + z @ z @ z @ z / 24
    exact = torch.autograd.grad(((yy @ torch.linalg.matrix_power(r, n)) ** 2).sum(), [a, yy])

    def grads(checkpoint):
        a = a64.float().requires_grad_()
        y0 = y064.float().requires_grad_()
        y = odeint(lambda t, y: y @ a, y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                   options={"step_size": 1.0 / n, "precision": policy, "checkpoint": checkpoint,
                            "adjoint_params": (a,)})[-1]
        return torch.autograd.grad((y.float() ** 2).sum(), [a, y0])

    bound = {"fp16": 1e-3, "bf16": 5e-3}[policy]
    whole = grads(16)
    for schedule in (StepsSchedule(stages=True), BinomialSchedule(16, stages=True)):
        got = grads(schedule)
        assert max(rel(g, e) for g, e in zip(got, exact)) <= bound
        assert max(rel(g, w) for g, w in zip(got, whole)) <= bound


def test_fp16_overflowing_stage_vjps_are_redone():
    # the fp16 range-stress problem of test_mixed_precision: VJPs that overflow are redone with a
    # smaller scale -- each retry evaluates the stages again, from what the tape kept
    ref = _stress_analytic()
    model = PolynomialDecay()
    y0 = torch.tensor([STRESS_Y0], requires_grad=True)
    with collect_stats() as stats:
        y = odeint(model, y0, torch.linspace(0, STRESS_T, 400), method="rampde_rk4",
                   options={"precision": "fp16", "scaler": AdjointScaler(target=2.0**24),
                            "checkpoint": BinomialSchedule(20, stages=True)})
        grads = torch.autograd.grad(0.5 * (y[-1] ** 2).sum(), [y0, model.a, model.b, model.c])
    rec = stats.last
    assert rec.scale_backoffs > 0 and rec.redone_steps > 0 and rec.stage_vjp
    assert max(_rel_each(grads, ref)) <= 1e-2  # the paper's bound for this problem, as for whole steps


def _memory(n, checkpoint, dim=16, hidden=512, batch=64):
    """Saved-tensor peaks (forward, backward) of an MLP whose stage graphs dwarf its state."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))
    y0 = torch.randn(batch, dim)
    params = tuple(net.parameters())
    with collect_stats() as stats:
        with SavedTensorMeter(unique=True, exclude=params) as fwd:
            y = odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 1.0]), method="rampde_rk4",
                       options={"step_size": 1.0 / n, "checkpoint": checkpoint, "adjoint_params": params})
        with SavedTensorMeter(unique=True, exclude=params) as bwd:
            y[-1].sum().backward()
    return fwd.peak, bwd.peak, stats.last


@pytest.mark.parametrize("n", [100, 400])
def test_backward_holds_one_stage_graph_and_the_stage_states(n):
    state = 64 * 16 * 4
    one_step = _memory(8, StepsSchedule(group=1))[1]  # one rebuilt step's graph
    one_stage = one_step / 4  # the four stages of rk4 save the same tensors
    c = math.ceil(math.sqrt(n))
    fwd, bwd, rec = _memory(n, BinomialSchedule(c, stages=True))
    # forward: the first stage's probe (one evaluation's graph, dropped at once), the grid and the
    # last step's three stage states (revolve tapes it right away)
    assert fwd <= one_stage + 3 * state + 8 * (n + 1) + 4096
    # backward: a tape's stage states, one stage's graph -- not one step's
    assert bwd <= 3 * state + one_stage + 4096
    assert bwd < 0.5 * one_step
    assert rec.checkpoints <= c and rec.stored_bytes <= c * state


def test_tensor_used_only_later_is_reported_at_its_stage():
    v = torch.randn(3, 3, dtype=F64, requires_grad=True)

    class Late(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3, dtype=F64)

        def forward(self, t, y):
            return self.lin(y) + (y @ v if bool((t > 0.5).all()) else 0.0)

    y = odeint(Late(), torch.randn(4, 3, dtype=F64), T, method="rampde_rk4",
               options=dict(STEP, checkpoint=BinomialSchedule(2, stages=True)))
    with pytest.raises(ValueError, match=r"the vector field \(at step \d of 8, t = 0\.[5-9]\d*, a stage recomputed "
                                         r"for its VJP\) uses 1 tensor\(s\) that require grad"):
        y.sum().backward()
    assert v.grad is None


def test_second_backward_through_steps_with_stages():
    w = torch.tensor(-0.5, requires_grad=True)
    y = odeint(lambda t, y: torch.tanh(w * y), torch.ones(2), torch.tensor([0.0, 1.0]), method="rampde_rk4",
               options={"step_size": 0.1, "checkpoint": StepsSchedule(stages=True), "adjoint_params": (w,)})
    (g1,) = torch.autograd.grad(y[-1].sum(), w, retain_graph=True)
    (g2,) = torch.autograd.grad(y[-1].sum(), w)
    assert torch.equal(g1, g2)


def test_implicit_methods_refuse_stages_before_anything_runs():
    calls = []
    with pytest.raises(ValueError, match=r"stages=True.*explicit methods.*implicit.*without stages=True"):
        odeint(lambda t, y: calls.append(1) or -y, torch.ones(2), torch.tensor([0.0, 1.0]),
               method="rampde_implicit_euler", options={"step_size": 0.1, "checkpoint": BinomialSchedule(2, stages=True)})
    assert not calls


@pytest.mark.parametrize("make", [lambda: StepsSchedule(stages=1), lambda: SegmentsSchedule(2, stages="yes"),
                                  lambda: BinomialSchedule(2, stages=None)])
def test_stages_must_be_a_bool(make):
    with pytest.raises(TypeError, match=r"stages must be True or False"):
        make()


def test_repr_names_stages():
    assert repr(BinomialSchedule(4, stages=True)) == "BinomialSchedule(4, stages=True)"
    assert repr(StepsSchedule(group=2, stages=True)) == "StepsSchedule(group=2, stages=True)"
    assert repr(SegmentsSchedule(3)) == "SegmentsSchedule(3)"
