"""Memory budgets (issue 11, item 3): rampde chooses the fastest schedule whose predicted peak fits.

What is checked, and against what:
* the chosen schedule's peak, measured independently of rampde's own accounting by the saved-tensor
  meter (unique memory, parameters excluded; binomial checkpoints are not saved tensors, so their
  count times a state's bytes is added; the states of steps and segments are one saved tensor) stays
  within the budget, for budgets
  from "all graphs fit" through segments of 16 .. 2 steps and "steps" down to "two checkpoints";
* the work (field evaluations, forward + backward) never grows as the budget grows -- the
  deterministic side of "time decreases with the budget" (the timings are in the benchmark);
* every budget gives the gradient of the unbudgeted solve (fp64, 1e-12) and of torchdiffeq's own
  backprop; a field with dropout and BatchNorm draws and writes exactly what it does without a
  budget (the measuring step puts the generators and buffers back);
* too small a budget raises with the numbers and changes nothing; bad values raise naming the option;
* (issue 27) every tensor the whole solve holds at once -- forward, backward, solution, adjoint,
  gradients, the VJP's buffers -- stays within the predicted peak; the budgets of the ladder are the
  peaks the schedules themselves predict (``predict_peak``), and a schedule family enters the
  chooser only through its own prediction and one registration (SegmentsSchedule, and a family
  written in the test).  The resident-set check of the whole solve is tests/test_budget_peak.py.
"""

import pytest
import torch
import torchode as to
from torchdiffeq import odeint

from rampde_plugins import (BinomialSchedule, GraphsSchedule, MemoryBudget, SegmentsSchedule, StepsSchedule,
                            collect_stats, parse_memory_budget)
from rampde_torchode import RampdeAdjoint
from rampde_plugins._engine._memory import LiveBytes
from rampde_plugins._stats import SavedTensorMeter

from .helpers import MLPField, rel
from .test_schedules import binomial_advances

N = 40


def _field(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return MLPField(dim=3, hidden=32, dtype=dtype, seed=seed)


def _y0(dtype=torch.float64):
    return torch.randn(8, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))


def _solve(field, options, *, method="rampde_rk4", t=(0.0, 1.0), meter=False, **kw):
    y0 = _y0().requires_grad_(True)
    for p in field.parameters():
        p.grad = None
    m = SavedTensorMeter(unique=True, exclude=list(field.parameters())) if meter else None
    # the whole solve's tensors (forward, backward, gradients), as CUDA's max_memory_allocated counts
    live = LiveBytes() if meter else None
    with collect_stats() as stats:
        if m is not None:
            m.__enter__()
            live.__enter__()
        try:
            y = odeint(field, y0, torch.tensor(t, dtype=torch.float64), method=method, options=options, **kw)
            y.sum().backward()  # a loss that saves nothing of its own
            del y
        finally:
            if m is not None:
                live.__exit__(None, None, None)
                m.__exit__(None, None, None)
    grads = torch.cat([y0.grad.reshape(-1), *(p.grad.reshape(-1) for p in field.parameters())])
    if m is not None:
        m.live = live.peak
    return grads, (stats.last if len(stats) else None), m


class _Measured(MemoryBudget):
    """A budget that keeps the step measure it chose from (``m``): the test asks the schedules
    themselves for their predicted peaks, as the chooser does."""

    def resolve(self, m, outputs=None):
        self.m = m
        return super().resolve(m, outputs)


def _measure(field, options):
    budget = _Measured("1GB")
    _, rec, _ = _solve(field, {**options, "memory_budget": budget})
    return budget.m, rec


def _ladder(field, options=None):
    """Budgets from "all graphs fit" down to "two checkpoints", from one measuring solve: the peaks
    of the whole solve the schedules predict (their holdings: N G; 16 G + 3 S; 8 G + 5 S; 4 G + 10 S;
    2 G + 20 S; N S + G; c S + G for c = 20, 12, 5, 2 -- plus what every solve holds)."""
    options = options or {"step_size": 1.0 / N}
    m, rec = _measure(field, options)
    g, state = m.graph, m.state
    assert rec.schedule == "graphs" and g > 0 and m.n_steps == N
    assert rec.predicted_bytes == GraphsSchedule().predict_peak(m)
    # a step's graph holds the hidden activations: far more than the 20 states that segments(2) saves
    # over "steps", so there is a band where "steps" fits and segments(2) does not
    assert g > N // 2 * state
    graphs = GraphsSchedule().predict_peak(m)
    return [graphs, graphs - 1, *(SegmentsSchedule(k).predict_peak(m) for k in (16, 8, 4, 2)),
            StepsSchedule(group=1).predict_peak(m), *(BinomialSchedule(c).predict_peak(m) for c in (20, 12, 5, 2))]


def _check_peak(rec, meter, budget, state_bytes, stored_bytes=None):
    assert rec.memory_budget == budget and rec.backward_done
    assert rec.predicted_bytes <= budget and rec.peak_bytes <= budget
    # the budget bounds the whole solve: every tensor alive at once, forward and backward (issue 27)
    assert getattr(meter, "live", 0) <= rec.predicted_bytes, (rec.schedule, meter.live, rec.predicted_bytes)
    # binomial checkpoints (state dtype) are kept outside autograd, so the meter does not see them:
    # they are added (the states of steps and segments are one saved tensor, which it sees)
    outside = state_bytes if rec.schedule == "binomial" else 0
    held = meter.peak + rec.checkpoints * outside
    # the meter also sees a few 0-d tensors (step sizes, weights) that rampde does not count
    assert held <= budget + 256, (budget, rec.schedule, meter.peak, rec.peak_bytes)
    # rampde's own measurement agrees with the meter's (the same tensors, counted independently)
    assert abs(held - rec.peak_bytes) <= 0.02 * rec.peak_bytes + 256


def test_budget_ladder_peak_within_budget_work_monotone_gradients_identical():
    field = _field()
    ref, _, _ = _solve(field, {"step_size": 1.0 / N})
    host, _, _ = _solve(field, {"step_size": 1.0 / N}, method="rk4")  # torchdiffeq's own backprop
    assert rel(ref, host) <= 1e-12
    chosen, work = [], []
    for budget in _ladder(field):
        got, rec, meter = _solve(field, {"step_size": 1.0 / N, "memory_budget": budget}, meter=True)
        assert rel(got, ref) <= 1e-12, (budget, rec.schedule)
        _check_peak(rec, meter, budget, _y0().numel() * 8)
        chosen.append((rec.schedule, rec.segment_steps or rec.checkpoints))
        work.append((rec.forward_nfe + rec.backward_nfe, -(rec.segment_steps or 1)))
        # the record's work is revolve's closed form (the oracle of test_schedules): t(N, c) advances
        # plus N taped steps, 4 evaluations a step, and 4 more for the measuring step
        steps_run = ({"graphs": N, "steps": 2 * N, "segments": 2 * N}.get(rec.schedule)
                     or binomial_advances(N, rec.checkpoints) + N)
        assert rec.forward_nfe + rec.backward_nfe == 4 * steps_run + 4
        if rec.schedule == "segments":  # ceil(N / k) stored states, one VJP per k steps
            assert rec.checkpoints == -(-N // rec.segment_steps) and rec.backward_steps == N
    # "graphs" reverses its kept graphs 16 steps per VJP; below it: segments of 16, 8, 4, 2 steps while they fit (the same steps as "steps", fewer
    # and larger VJPs), "steps" while its states fit, then binomial with ever fewer checkpoints
    assert chosen == [("graphs", 16), ("segments", 16), ("segments", 16), ("segments", 8), ("segments", 4),
                      ("segments", 2), ("steps", N), ("binomial", 20), ("binomial", 12), ("binomial", 5),
                      ("binomial", 2)]
    # less memory, never less work: field evaluations never fall, and at equal evaluations the
    # backward never takes fewer steps per VJP
    assert work == sorted(work) and work[0] < work[1] and work[6] < work[7]


def test_bf16_budget_chooses_steps_when_only_narrow_states_fit():
    """Under bf16 the stored states are half a state's bytes: a budget that holds N bf16 states but
    not N - 1 fp32 checkpoints still gets "steps" (its storage is counted in the storage dtype)."""
    field = _field(dtype=torch.float32)
    y0 = _y0(torch.float32)
    t = torch.tensor([0.0, 1.0])

    def run(budget):
        for p in field.parameters():
            p.grad = None
        meter = SavedTensorMeter(unique=True, exclude=list(field.parameters()))
        with collect_stats() as stats, meter:
            y = odeint(field, y0.clone().requires_grad_(True), t, method="rampde_rk4",
                       options={"step_size": 1.0 / N, "precision": "bf16", "memory_budget": budget})
            y.sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in field.parameters()]), stats.last, meter

    spy = _Measured("1GB")
    run(spy)
    m = spy.m
    state = y0.numel() * 4
    assert (m.state, m.stored) == (state, y0.numel() * 2)
    budget = StepsSchedule(group=1).predict_peak(m)  # N bf16 states + one step's graph + the rest
    assert budget < BinomialSchedule(N - 1).predict_peak(m)  # binomial(N - 1) does not fit
    got, rec, meter = run(budget)
    assert rec.schedule == "steps"
    _check_peak(rec, meter, budget, state)
    ref, _, _ = run(None)
    # The same steps run with the same stored bf16 states: the same gradient (to fp32 rounding of
    # the order-independent sums).
    assert rel(got, ref) <= 1e-6


def test_adaptive_budget_steps_when_states_fit_binomial_otherwise():
    field = _field()
    kw = {"method": "rampde_dopri5", "t": (0.0, 0.4, 1.0), "rtol": 1e-7, "atol": 1e-9}
    ref, base, _ = _solve(field, {}, **kw)
    _, big, _ = _solve(field, {"memory_budget": "1GB"}, **kw)
    assert big.schedule == "steps" and big.peak_bytes <= big.predicted_bytes + 0
    state = _y0().numel() * 8
    budget = 3 * state + big.step_graph_bytes + 2 * big.predicted_bytes // 3 - 2 * big.step_graph_bytes // 3
    budget = max(budget, 3 * state + big.step_graph_bytes * 2)
    small = min(budget, big.predicted_bytes - 1)
    got, rec, meter = _solve(field, {"memory_budget": small}, meter=True, **kw)
    assert rel(got, ref) <= 1e-12
    assert rec.schedule == "binomial" and rec.n_steps == base.n_steps
    assert rec.peak_bytes <= small and rec.predicted_bytes <= small
    assert meter.peak + rec.checkpoints * state <= small + 256
    assert rec.recomputed_steps > 0


def test_torchode_budget_fixed_and_adaptive():
    field = MLPField(dim=3, hidden=16, batched_time=True)
    y0 = _y0()
    t_eval = torch.linspace(0, 1, 4, dtype=torch.float64).repeat(y0.shape[0], 1)

    def grads(**kw):
        for p in field.parameters():
            p.grad = None
        term = to.ODETerm(field)
        with collect_stats() as stats:
            sol = to.solve_ivp(term, y0, t_eval, **kw)
            sol.ys.sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in field.parameters()]), stats.last

    fixed = {"method": "rampde_rk4", "controller": to.FixedStepController(), "dt0": torch.full((8,), 0.05, dtype=torch.float64)}
    ref, _ = grads(**fixed)
    got, rec = grads(**fixed, memory_budget="1GB")
    assert rel(got, ref) <= 1e-12 and rec.schedule == "graphs" and rec.peak_bytes <= rec.predicted_bytes
    # one byte short of each choice's predicted peak, again and again: ever smaller segments, then
    # "steps", then binomial -- every one within its budget and with the same gradient
    chosen = []
    while rec.schedule != "binomial":
        budget = rec.predicted_bytes - 1
        got, rec = grads(**fixed, memory_budget=budget)
        assert rel(got, ref) <= 1e-12 and rec.peak_bytes <= rec.predicted_bytes <= budget, rec
        chosen.append((rec.schedule, rec.segment_steps))
    assert chosen == [("segments", 16), ("segments", 8), ("segments", 4), ("segments", 2), ("steps", 0),
                      ("binomial", 0)]
    adaptive = {"method": "rampde_dopri5"}
    ref, base = grads(**adaptive)
    got, rec = grads(**adaptive, memory_budget="1GB")
    assert rel(got, ref) <= 1e-12 and rec.schedule == "steps"
    got, rec = grads(**adaptive, memory_budget=rec.predicted_bytes - 1)  # the states no longer fit
    assert rel(got, ref) <= 1e-12 and rec.schedule == "binomial" and rec.peak_bytes <= rec.memory_budget


class _DropBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, t, y):
        return self.out(torch.nn.functional.dropout(torch.tanh(self.bn(self.lin(y))), 0.2, training=True))


def test_measuring_step_leaves_rng_and_buffers_as_without_budget():
    def run(options):
        torch.manual_seed(3)
        field = _DropBN().double()
        y0 = _y0().requires_grad_(True)
        torch.manual_seed(5)
        y = odeint(field, y0, torch.tensor([0.0, 0.5], dtype=torch.float64), method="rampde_rk4",
                   options={"step_size": 0.05, **options})
        y.square().sum().backward()
        after = torch.rand(3)  # the generator continues where it would have
        return y.detach(), y0.grad, [b.clone() for b in field.buffers()], after

    ref = run({})
    for budget in ("1GB", 80_000):
        with collect_stats() as stats:
            got = run({"memory_budget": budget})
        assert torch.equal(got[0], ref[0]) and rel(got[1], ref[1]) <= 1e-12
        assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2])) and torch.equal(got[3], ref[3])
        assert stats.last.replayed == (stats.last.schedule != "graphs")


def test_too_small_budget_raises_with_numbers_and_changes_nothing():
    torch.manual_seed(3)
    field = _DropBN().double()
    before = {k: v.clone() for k, v in field.state_dict().items()}
    rng = torch.get_rng_state()
    y0 = _y0().requires_grad_(True)
    with pytest.raises(ValueError, match=r"memory_budget=.*below what even one checkpoint needs.*one state \(192 bytes\).*BinomialSchedule\(c, stages=True\)"):
        odeint(field, y0, torch.tensor([0.0, 0.5], dtype=torch.float64), method="rampde_rk4",
               options={"step_size": 0.05, "memory_budget": 1000})
    assert all(torch.equal(v, field.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng) and y0.grad is None


@pytest.mark.parametrize("text, nbytes", [("512MB", 512 * 10**6), ("1.5 GiB", int(1.5 * 2**30)), ("64kib", 65536),
                                          ("100", 100), (2048, 2048), ("1e3 B", 1000)])
def test_sizes(text, nbytes):
    assert parse_memory_budget(text) == nbytes


@pytest.mark.parametrize("bad, err, match", [("12 parsecs", ValueError, "not a size.*units"), ("-5MB", ValueError, "not a size"),
                                             (0, ValueError, "at least 1 byte"), (True, TypeError, "number of bytes"),
                                             ([1], TypeError, "number of bytes"), (float("nan"), ValueError, "at least 1")])
def test_bad_budgets_name_the_option(bad, err, match):
    field = _field()
    with pytest.raises(err, match=r"options\['memory_budget'\].*" + match):
        odeint(field, _y0(), torch.tensor([0.0, 1.0], dtype=torch.float64), method="rampde_rk4",
               options={"step_size": 0.1, "memory_budget": bad})
    with pytest.raises(err, match=r"RampdeAdjoint: memory_budget.*" + match):
        RampdeAdjoint(to.Euler(to.ODETerm(field)), to.FixedStepController(), memory_budget=bad)


def test_budget_and_checkpoint_are_exclusive():
    field = _field()
    with pytest.raises(ValueError, match="both choose the checkpoint schedule"):
        odeint(field, _y0(), torch.tensor([0.0, 1.0], dtype=torch.float64), method="rampde_rk4",
               options={"step_size": 0.1, "memory_budget": "1MB", "checkpoint": 3})
    term = to.ODETerm(field)
    with pytest.raises(ValueError, match="both choose the checkpoint schedule"):
        to.solve_ivp(term, _y0(), torch.linspace(0, 1, 3, dtype=torch.float64).repeat(8, 1), method="rampde_rk4",
                     dt0=torch.full((8,), 0.1, dtype=torch.float64), memory_budget="1MB", checkpoint="graphs")
    assert repr(MemoryBudget("2KiB")) == "MemoryBudget(2048)"


# ---- schedules as the chooser's interface (issue 27) ---------------------------------------------

@pytest.fixture
def registry():
    """The budget's registry, put back as it was after the test."""
    from rampde_plugins._engine import _candidates

    saved = list(_candidates._CANDIDATES)
    yield _candidates
    _candidates._CANDIDATES[:] = saved


def _measure_of(n=40, graph=10_000, state=192, **kw):
    from rampde_plugins._engine._candidates import StepMeasure

    return StepMeasure(graph=graph, output=0, replay=0, state=state, stored=state, n_steps=n, times=(400, 0),
                       solution=2 * state, adjoint=3 * state, vjp=graph // 2, step=graph + 500, **kw)


def test_each_family_finds_its_own_best_instance_and_the_cost_orders_them():
    m = _measure_of()
    # binomial: the most checkpoints whose peak fits, from its own closed form
    for budget in (BinomialSchedule(1).predict_peak(m) + 5 * m.state + 7, BinomialSchedule(17).predict_peak(m)):
        got = BinomialSchedule.within_budget(m, budget)
        assert got.predict_peak(m) <= budget < BinomialSchedule(got.c + 1).predict_peak(m)
    assert BinomialSchedule.within_budget(m, BinomialSchedule(1).predict_peak(m) - 1) is None
    # segments: the largest k that fits, below N
    assert SegmentsSchedule.within_budget(m, SegmentsSchedule(8).predict_peak(m)).k == 8
    assert SegmentsSchedule.within_budget(m, 10**12).k == 16
    assert [s.k for s in SegmentsSchedule.budget_instances(_measure_of(n=10))] == [8, 4, 2]
    # the order the budget chooses in: one sweep, then fewer VJPs, then a repeatable backward
    order = [GraphsSchedule(), SegmentsSchedule(16), SegmentsSchedule(2), StepsSchedule(group=1),
             BinomialSchedule(39), BinomialSchedule(5), BinomialSchedule(1)]
    costs = [s.budget_cost(m) for s in order]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    # the peaks of the whole solve: more than what the schedule holds
    assert StepsSchedule(group=1).predict_peak(m) > m.n * m.stored + m.graph + m.solution + m.adjoint


def test_segments_enter_the_chooser_only_through_their_registration(registry):
    """The must-show of issue 27: the chooser names no schedule.  Without SegmentsSchedule's
    registration a budget that fits segments of 16 steps gets "steps"; with it, segments."""
    field = _field()
    m, _ = _measure(field, {"step_size": 1.0 / N})
    budget = SegmentsSchedule(16).predict_peak(m)
    registry.unregister_budget_candidate(SegmentsSchedule)
    _, rec, _ = _solve(field, {"step_size": 1.0 / N, "memory_budget": budget})
    assert rec.schedule == "steps"
    registry.register_budget_candidate(SegmentsSchedule)
    _, rec, _ = _solve(field, {"step_size": 1.0 / N, "memory_budget": budget})
    assert (rec.schedule, rec.segment_steps) == ("segments", 16)


def test_a_new_family_is_one_class_and_one_registration(registry):
    """A schedule written outside the engine: segments of 32 steps, fewer VJPs than 16.  It predicts
    its peak through the inherited predict_peak, offers its instance, registers -- and is chosen where
    it fits, with a gradient equal to the unbudgeted one and the budget kept."""

    class LongSegments(SegmentsSchedule):
        @classmethod
        def budget_instances(cls, m):
            return (cls(32),) if m.n > 32 else ()

    field = _field()
    ref, _, _ = _solve(field, {"step_size": 1.0 / N})
    m, _ = _measure(field, {"step_size": 1.0 / N})
    budget = LongSegments(32).predict_peak(m)
    _, rec, _ = _solve(field, {"step_size": 1.0 / N, "memory_budget": budget})
    assert rec.segment_steps == 16  # not registered: not a candidate
    registry.register_budget_candidate(LongSegments)
    got, rec, meter = _solve(field, {"step_size": 1.0 / N, "memory_budget": budget}, meter=True)
    assert (rec.schedule, rec.segment_steps, rec.checkpoints) == ("segments", 32, 2)
    assert rel(got, ref) <= 1e-12
    _check_peak(rec, meter, budget, _y0().numel() * 8)
    with pytest.raises(TypeError, match="CheckpointSchedule class"):
        registry.register_budget_candidate(LongSegments(32))
