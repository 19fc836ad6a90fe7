"""What the CPU peak RSS of one rampde training iteration is made of, measured row by row.

    python benchmarks/rss_floor.py [--steps 400] [--batch 256] [--loop 8] [--only KEY,...] [--smoke] [--out PATH]

One training iteration (forward + ``loss.backward()``) of an RK4 solve of an MLP field (state 64,
``Linear(64, 512) - Tanh - Linear(512, 64)``, ``h = 1/steps``, loss = mean square of the final state
minus a fixed target).  Every row runs in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc returns every freed block of 64 KiB or more to the system at once, so RSS follows the
tensors) and ``OMP_NUM_THREADS=1``.  A row's number is the growth of the kernel's high-water mark
(VmHWM, reset just before) over the RSS before the iteration, after one warm-up iteration of the
same configuration in the same process -- except the *cold* rows, which measure the first
iteration of a process, and the *loop* rows, which measure several iterations back to back.

Next to it: the live-tensor peak of the same iteration (``live_memory.LiveTensorMeter``: bytes of
tensor storages alive; taken in a later iteration, since the meter itself costs memory and its
first use imports ``torch._dynamo``), the RSS still held right after the iteration (before any
garbage collection), and the phase in which the peak happened.  The phases are separate VmHWM
readings (reset between them): forward, backward and, in rampde rows, the stored-state overflow
check at the end of the forward (``_engine._problem._check_storage``, wrapped).

A few rows change one thing inside their own child process (``Row.patches``: a torch setting,
rampde's hidden-tensor walk or its ``FieldWatch`` dynamo wrapper taken out, an optimizer built
first) to measure what that part costs; the library itself is not modified.  The Markdown table and
an account computed from the numbers (against the memory targets ``TARGETS``) go to
``benchmarks/results/rss-floor-cpu.md``.  ``--smoke`` runs four rows at tiny sizes (a plumbing check,
``tests/test_rss_floor.py``); ``main`` returns the report's text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "RSS_FLOOR_RESULT "
MB, MIB = 1e6, 2.0**20
WIDTH = 64  # the field's state width (Linear(WIDTH, 512) - Tanh - Linear(512, WIDTH))
# Peak RSS growth of one warm rampde bf16 iteration over torchdiffeq fp32's (row "td_fp32"): the
# suite's CPU memory targets for the default schedule and for checkpoint=20 (about sqrt(400) checkpoints).
TARGETS = {"bf16": ("default schedule", 0.02), "bf16_c20": ("checkpoint=20", 0.01)}


# -- the rows -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    title: str
    kind: str  # "solve", "loop", "cold", "vjp", "step", "import"
    method: str = ""  # "rk4" (torchdiffeq) or "rampde_rk4"
    precision: str = ""  # rampde precision, or the VJP rows' mode
    checkpoint: object = "steps"
    patches: tuple = ()  # names known to _apply_patches, applied in the child before anything runs
    env: dict = field(default_factory=dict)
    smoke: bool = False  # part of --smoke
    note: str = ""


ROWS = {
    # one iteration after a warm-up iteration of the same configuration
    "td_fp32": Row("torchdiffeq rk4 fp32 (plain autograd)", "solve", "rk4", smoke=True),
    "bf16": Row("rampde bf16, default schedule (steps)", "solve", "rampde_rk4", "bf16", smoke=True),
    "bf16_c20": Row("rampde bf16, checkpoint=20", "solve", "rampde_rk4", "bf16", 20),
    "fp32": Row("rampde fp32, default schedule", "solve", "rampde_rk4", "fp32"),
    "fp32_c20": Row("rampde fp32, checkpoint=20", "solve", "rampde_rk4", "fp32", 20),
    "bf16_noscan": Row("rampde bf16 default, hidden-tensor walk disabled (patch)", "solve", "rampde_rk4", "bf16",
                       patches=("no_scan",)),
    "bf16_thp": Row("rampde bf16 default, THP_MEM_ALLOC_ENABLE=1 (torch madvises >= 2 MiB blocks to huge pages)",
                    "solve", "rampde_rk4", "bf16", env={"THP_MEM_ALLOC_ENABLE": "1"}),
    # several iterations back to back (SGD step + zero_grad), Python's garbage collector left alone
    "bf16_loop": Row("rampde bf16 default, {loop} iterations back to back (peak over the loop)", "loop", "rampde_rk4",
                     "bf16", smoke=True),
    "td_fp32_loop": Row("torchdiffeq rk4 fp32, {loop} iterations back to back", "loop", "rk4"),
    # the first iteration of a process (no warm-up)
    "td_fp32_cold": Row("torchdiffeq rk4 fp32, first iteration of the process", "cold", "rk4"),
    "bf16_cold": Row("rampde bf16 default, first iteration of the process", "cold", "rampde_rk4", "bf16"),
    "bf16_c20_cold": Row("rampde bf16 checkpoint=20, first iteration of the process", "cold", "rampde_rk4", "bf16", 20),
    "bf16_c20_cold_nodynamo": Row("the same, FieldWatch.__torch_dispatch__ not wrapped by torch._disable_dynamo "
                                  "(patch)", "cold", "rampde_rk4", "bf16", 20, patches=("watch_no_dynamo",)),
    "bf16_c20_cold_optim": Row("the same as bf16 c=20 cold, a torch.optim.SGD built first (as a training script does)",
                               "cold", "rampde_rk4", "bf16", 20, patches=("optimizer_first",)),
    "import_dynamo": Row("`import torch._dynamo` alone (after import torch, rampde, torchdiffeq)", "import"),
    # the field alone, no solver: one forward + VJP at the solve's batch
    "vjp_bf16": Row("field VJP, autocast bf16", "vjp", precision="bf16", smoke=True),
    "vjp_bf16_nocache": Row("field VJP, autocast bf16, cache_enabled=False", "vjp", precision="bf16_nocache"),
    "vjp_bf16_precast": Row("field VJP, weights and input pre-cast to bf16, no autocast", "vjp", precision="bf16_precast"),
    "vjp_fp32": Row("field VJP, fp32", "vjp", precision="fp32"),
    "vjp_bf16_mkldnn_off": Row("field VJP, autocast bf16, torch.backends.mkldnn disabled", "vjp", precision="bf16",
                               patches=("mkldnn_off",)),
    "vjp_bf16_primcache0": Row("field VJP, autocast bf16, ONEDNN_PRIMITIVE_CACHE_CAPACITY=0", "vjp", precision="bf16",
                               env={"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}),
    "vjp_bf16_cold": Row("field VJP, autocast bf16, first call of the process", "vjp", precision="bf16",
                         patches=("cold",)),
    "vjp_bf16_cold_mkldnn_off": Row("field VJP, autocast bf16, first call, mkldnn disabled", "vjp", precision="bf16",
                                    patches=("cold", "mkldnn_off")),
    "vjp_fp32_cold": Row("field VJP, fp32, first call of the process", "vjp", precision="fp32", patches=("cold",)),
    "step_bf16": Row("one RK4 step forward + VJP, autocast bf16 (no solver)", "step", precision="bf16"),
    "step_fp32": Row("one RK4 step forward + VJP, fp32 (no solver)", "step", precision="fp32"),
}


# -- the child: one row ---------------------------------------------------------------------------
class Phases:
    """VmHWM growth per phase: each ``mark(name)`` reads the high-water mark since the last reset
    and resets it, so the phases' maxima together give the iteration's peak."""

    def __init__(self):
        from _common import current_rss_bytes, release_free_memory, reset_peak_rss

        release_free_memory()
        reset_peak_rss()
        self.before = current_rss_bytes()
        self.peaks: dict[str, int] = {}
        self.entry: dict[str, int] = {}
        self.thp_kb = 0

    def now(self) -> int:
        from _common import current_rss_bytes

        return current_rss_bytes() - self.before

    def mark(self, name: str) -> None:
        from _common import peak_rss_bytes, reset_peak_rss

        grow = peak_rss_bytes()[0] - self.before
        self.peaks[name] = max(self.peaks.get(name, grow), grow)
        self.thp_kb = max(self.thp_kb, _anon_huge_kb())
        reset_peak_rss()

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def where(self) -> str:
        return max(self.peaks, key=self.peaks.get)


def _anon_huge_kb() -> int:
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


PHASES: list = [None]  # the Phases of the measured iteration (the wrapped overflow check reads it)


def _apply_patches(row: Row) -> None:
    import torch

    for name in row.patches:
        if name == "no_scan":  # the per-step hidden-tensor walk does nothing
            from rampde_plugins import _probe

            _probe.GraphCheck.scan = lambda self, roots, passed=(), mark=None: ([], [])
        elif name == "mkldnn_off":
            torch.backends.mkldnn.enabled = False
        elif name == "watch_no_dynamo":  # as if FieldWatch defined _should_skip_dynamo() -> False
            from rampde_plugins._watch import FieldWatch

            raw = FieldWatch.__dict__["__torch_dispatch__"]
            FieldWatch.__torch_dispatch__ = getattr(raw, "__wrapped__", raw)
        elif name in ("optimizer_first", "cold"):
            pass  # handled where the iteration is built / run
        else:
            raise ValueError(name)


def _wrap_check() -> None:
    """Measure the stored-state overflow check as its own phase (the library's check, unchanged)."""
    from rampde_plugins._engine import _api, _drivers, _problem

    inner = _problem._check_storage

    def timed(prob, keeper, grid):
        ph = PHASES[0]
        if ph is None:
            return inner(prob, keeper, grid)
        ph.mark("forward (steps)")
        ph.entry["overflow check"] = ph.now()
        try:
            return inner(prob, keeper, grid)
        finally:
            ph.mark("overflow check")

    _drivers._check_storage = _api._check_storage = timed


def _field(batch: int):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(WIDTH, 512), nn.Tanh(), nn.Linear(512, WIDTH))

        def forward(self, t, y):
            return self.net(y)

    torch.manual_seed(0)
    f = MLP()
    g = torch.Generator().manual_seed(1)
    return f, torch.randn(batch, WIDTH, generator=g), torch.randn(batch, WIDTH, generator=g)


def _solve_iteration(row: Row, f, y0, target, steps: int):
    import torch
    from torchdiffeq import odeint

    t = torch.tensor([0.0, 1.0])
    options = {"step_size": 1.0 / steps}
    if row.method == "rampde_rk4":
        options.update(precision=row.precision, checkpoint=row.checkpoint)

    def iteration():
        ph = PHASES[0]
        y = odeint(f, y0, t, method=row.method, options=options)[-1]
        if ph is not None:
            ph.mark("forward")
        loss = (y.float() - target).square().mean()
        loss.backward()
        del y, loss
        if ph is not None:
            ph.mark("backward")

    return iteration


def _vjp_iteration(row: Row, f, y0, steps: int):
    """One forward + VJP of the field (``kind == "vjp"``) or of one RK4 step (``"step"``), no solver."""
    import copy

    import torch

    mode = row.precision
    net = f
    y = y0.clone()
    if mode == "bf16_precast":
        net = copy.deepcopy(f).to(torch.bfloat16)
        y = y.to(torch.bfloat16)
    y.requires_grad_()
    params = list(net.parameters())
    cot = torch.randn(y0.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    autocast = mode in ("bf16", "bf16_nocache")
    cache = mode != "bf16_nocache"
    h = 1.0 / steps
    t0 = torch.tensor(0.0)

    def evaluate():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=cache):
            if row.kind == "vjp":
                return net(t0, y)
            k1 = net(t0, y).float()
            k2 = net(t0, y + 0.5 * h * k1).float()
            k3 = net(t0, y + 0.5 * h * k2).float()
            k4 = net(t0, y + h * k3).float()
            return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def iteration():
        ph = PHASES[0]
        out = evaluate()
        if ph is not None:
            ph.mark("forward")
        grads = torch.autograd.grad(out, [y, *params], cot.to(out.dtype))
        del out, grads
        if ph is not None:
            ph.mark("backward")

    return iteration


def child(args) -> dict:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        raise SystemExit("the child must be started with MALLOC_MMAP_THRESHOLD_=65536 (run the script without --child)")
    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(1)
    import rampde_plugins  # noqa: F401  (installs the rampde methods)
    import torchdiffeq  # noqa: F401

    from _common import release_free_memory

    row = ROWS[args.child]
    res = {"row": args.child, "threads": torch.get_num_threads()}
    if row.kind == "import":
        modules = len(sys.modules)
        PHASES[0] = ph = Phases()
        import torch._dynamo  # noqa: F401

        ph.mark("import")
        res.update(peak=ph.peak, where="import", phases=ph.peaks, retained=ph.now(),
                   modules=len(sys.modules) - modules, live=None)
        return res

    _apply_patches(row)
    if row.method == "rampde_rk4":
        _wrap_check()
    f, y0, target = _field(args.batch)
    if row.kind in ("vjp", "step"):
        iteration = _vjp_iteration(row, f, y0, args.steps)
    else:
        iteration = _solve_iteration(row, f, y0, target, args.steps)
    opt = None
    if row.kind == "loop" or "optimizer_first" in row.patches:
        opt = torch.optim.SGD(f.parameters(), lr=1e-3)

    def zero():
        for p in f.parameters():
            p.grad = None

    cold = row.kind == "cold" or "cold" in row.patches
    if not cold:  # warm-up: one-time initialisation is not the iteration's memory
        if row.method == "rampde_rk4":
            with rampde_plugins.collect_stats() as stats:
                iteration()
            rec = stats.last
            res.update(stored_bytes=rec.stored_bytes, checkpoints=rec.checkpoints)
        else:
            iteration()
        if opt is not None:
            opt.step()
        zero()
    res["dynamo_before"] = "torch._dynamo" in sys.modules
    modules = len(sys.modules)

    if row.kind == "loop":
        PHASES[0] = None
        release_free_memory()
        ph = Phases()
        per_iter = []
        for _ in range(args.loop):  # the garbage collector runs as it would in a training loop
            iteration()
            opt.step()
            opt.zero_grad()
            ph.mark(f"iteration {len(per_iter) + 1}")
            per_iter.append(ph.now())
        import gc

        collected = gc.collect()  # what only the cyclic collector frees
        res.update(peak=ph.peak, where=ph.where, phases=ph.peaks, retained=per_iter[0], retained_each=per_iter,
                   after_gc=ph.now(), gc_collected=collected, live=None)
        return res

    PHASES[0] = ph = Phases()
    iteration()
    PHASES[0] = None
    res.update(peak=ph.peak, where=ph.where, phases=ph.peaks, entry=ph.entry, retained=ph.now(), thp_kb=ph.thp_kb,
               modules=len(sys.modules) - modules, dynamo_after="torch._dynamo" in sys.modules)
    zero()
    # The live-tensor peak of another iteration (the meter's own objects would show in RSS).
    from live_memory import LiveTensorMeter

    meter = LiveTensorMeter()
    with meter:
        iteration()
    res["live"] = meter.peak
    zero()
    return res


# -- the parent -----------------------------------------------------------------------------------
def run_row(key: str, args) -> dict:
    row = ROWS[key]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", **row.env}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--steps", str(args.steps),
           "--batch", str(args.batch), "--loop", str(args.loop)]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    took = time.time() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            res = json.loads(line[len(RESULT):])
            res["seconds"] = took
            return res
    return {"row": key, "error": (proc.stderr or proc.stdout)[-1500:], "seconds": took}


def _mb(x) -> str:
    return "-" if x is None else f"{x / MB:.1f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.2f}"


def report(results: dict, args, elapsed: float) -> str:
    import torch
    import torchdiffeq

    R = {k: v for k, v in results.items() if "error" not in v}
    base = R.get("td_fp32", {}).get("peak")
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    threads = sorted({r.get("threads") for r in R.values()})
    lines = [
        "# What the CPU peak RSS of one rampde iteration is made of", "",
        f"MLP field {WIDTH}-512-{WIDTH}, batch {args.batch}, {args.steps} RK4 steps (h = 1/{args.steps}), loss = mean square "
        f"of the final state minus a target{' (SMOKE sizes)' if args.smoke else ''}.  torch {torch.__version__}, "
        f"torchdiffeq {torchdiffeq.__version__}, python {platform.python_version()}, {platform.machine()}; torch "
        f"threads per child {', '.join(map(str, threads))}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"(at the end; {args.load_start} at the start); transparent huge pages: `{thp}`.  Each row is a fresh process "
        "with `MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1`; "
        f"`python benchmarks/rss_floor.py{' --smoke' if args.smoke else ''}` ({elapsed:.0f} s).", "",
        "Peak RSS growth: VmHWM (reset before) minus RSS before the iteration, in MB (10^6 B); one warm-up "
        "iteration of the same configuration first, except the cold rows (the process's first iteration) and "
        f"the loop rows ({args.loop} iterations with an SGD step each, Python's gc left alone: peak over the "
        "loop).  Live-tensor peak: `live_memory.LiveTensorMeter` on a later iteration, MiB.  Retained: RSS right "
        "after the iteration minus before, no gc run (loop rows: after the first iteration).  Peak in: the phase "
        "whose VmHWM was largest; `overflow check` is `_engine._problem._check_storage` at the end of the forward.",
        "",
        "| row | peak RSS growth MB | live-tensor peak MiB | ratio to torchdiffeq fp32 RSS | retained MB | peak in | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, res in results.items():
        title = ROWS[key].title.format(loop=args.loop)
        if "error" in res:
            err = res["error"].strip().splitlines()[-1] if res["error"].strip() else "failed"
            lines.append(f"| {title} | error: {err} | | | | | {res['seconds']:.0f} |")
            continue
        ratio = f"{res['peak'] / base:.4f}x" if base else "-"
        lines.append(f"| {title} | {_mb(res['peak'])} | {_mib(res.get('live'))} | {ratio} | {_mb(res.get('retained'))} "
                     f"| {res.get('where', '-')} | {res['seconds']:.0f} |")
    lines += ["", "Phases (VmHWM growth over the RSS before the iteration, MB):", ""]
    for key, res in R.items():
        ph = ", ".join(f"{k} {_mb(v)}" for k, v in res.get("phases", {}).items())
        extra = []
        if res.get("entry"):
            extra.append("RSS at the check's entry " + ", ".join(_mb(v) for v in res["entry"].values()))
        if res.get("stored_bytes"):
            extra.append(f"stored states {_mb(res['stored_bytes'])} ({res['checkpoints']} checkpoints, SolveStats)")
        if res.get("modules"):
            extra.append(f"{res['modules']} modules imported during it")
        if "dynamo_after" in res:
            extra.append(f"torch._dynamo imported before/after: {res['dynamo_before']}/{res['dynamo_after']}")
        if res.get("thp_kb"):
            extra.append(f"AnonHugePages {res['thp_kb']} kB")
        if res.get("retained_each"):
            extra.append("RSS after each iteration " + " ".join(_mb(v) for v in res["retained_each"])
                         + f", after gc.collect() {_mb(res['after_gc'])} ({res['gc_collected']} objects collected)")
        lines.append(f"- {key}: {ph}" + (f"; {'; '.join(extra)}" if extra else ""))
    lines += ["", "## Account", ""] + account(R, args)
    return "\n".join(lines) + "\n"


def _verdict(ratio: float, target: float) -> str:
    return f"target {target:g}x: {'met' if ratio <= target else 'not met'}"


def _span(values) -> str:
    values = sorted(values)
    return _mb(values[0]) if values[0] == values[-1] else f"{_mb(values[0])}-{_mb(values[-1])}"


def account(R: dict, args) -> list[str]:
    """Sentences computed from the measured rows ``R`` (row key -> the child's result).

    Every number is read from ``R`` (or is ``args``' sizes, or a target from ``TARGETS``); a row the
    run did not measure leaves its sentence out or says so."""
    out: list[str] = []
    g = lambda k, f="peak": R.get(k, {}).get(f)  # noqa: E731
    base = g("td_fp32")
    if base is None:
        return ["(the torchdiffeq fp32 row is missing: no account)"]
    per_state = args.batch * WIDTH  # elements of one stored state
    step, vjp = g("step_bf16"), g("vjp_bf16")

    parts = []
    for key, (name, target) in TARGETS.items():
        peak = g(key)
        parts.append(f"{name}: not measured in this run (target {target:g}x)" if peak is None else
                     f"{name} {peak / base:.4f}x ({_verdict(peak / base, target)})")
    out.append(f"**rampde bf16, peak RSS growth of one warm training iteration over torchdiffeq fp32's "
               f"({_mb(base)} MB):** " + "; ".join(parts) + ".")

    def decompose(key: str, what: str, check_line: bool) -> None:
        peak = g(key)
        if peak is None:
            return
        name, target = TARGETS[key]
        stored, n = g(key, "stored_bytes") or 0, g(key, "checkpoints")
        per = f", {stored / (n * per_state):.0f} bytes per element" if n else ""
        terms = [f"(a) stored states {_mb(stored)} MB ({n} {what}{per}; SolveStats)"]
        if step is not None:
            terms.append(f"(b) one RK4 step's bf16 forward + VJP {_mb(step)} MB (row `step_bf16`: that step alone, "
                         "no solver)")
            terms.append(f"(c) the rest {_mb(peak - stored - step)} MB (the peak minus (a) and (b): the solver's own "
                         "vectors -- state, adjoint, cotangents, the solution -- and allocator slack, not measured apart)")
        else:
            terms.append(f"the rest {_mb(peak - stored)} MB (the one-step row was not measured in this run, so one step's "
                         "forward + VJP is in it)")
        out.append(f"**rampde bf16 {name}: {_mb(peak)} MB = {peak / base:.4f}x torchdiffeq fp32 "
                   f"({_verdict(peak / base, target)})**, peak in phase `{R[key]['where']}`: "
                   + " + ".join(terms) + ".")
        check, entry = R[key]["phases"].get("overflow check"), R[key].get("entry", {}).get("overflow check")
        if check_line and check is not None and entry is not None and stored:
            out.append(f"- the stored-state overflow check at the end of the forward (`_check_storage`, in blocks of "
                       f"about 1 MiB) reaches {_mb(check)} MB, {_mb(check - entry)} MB above the RSS at its entry "
                       f"({(check - entry) / stored:.2f}x the stored states).")

    decompose("bf16", "states in one preallocated tensor, resident as the forward writes it", True)
    if step is not None or vjp is not None:
        bits = []
        if step is not None:
            bits.append(f"one RK4 step's bf16 forward + VJP alone: {_mb(step)} MB RSS, "
                        f"{_mib(g('step_bf16', 'live'))} MiB live tensors"
                        + (f" (fp32: {_mb(g('step_fp32'))} MB)" if g("step_fp32") is not None else ""))
        if vjp is not None:
            variants = [(label, g(k)) for label, k in (
                ("fp32", "vjp_fp32"), ("weights and input pre-cast to bf16", "vjp_bf16_precast"),
                ("autocast cache off", "vjp_bf16_nocache"), ("mkldnn disabled", "vjp_bf16_mkldnn_off"),
                ("oneDNN primitive cache 0", "vjp_bf16_primcache0")) if g(k) is not None]
            text = (f"one bf16 field VJP alone (row `vjp_bf16`): {_mb(vjp)} MB RSS, {_mib(g('vjp_bf16', 'live'))} MiB "
                    "live tensors")
            if variants:
                text += (" -- " + ", ".join(f"{label} {_mb(v)} MB" for label, v in variants)
                         + f": warm, no variant moves it by more than {_mb(max(abs(v - vjp) for _, v in variants))} MB")
            bits.append(text)
        out.append("- the step and the field alone (no solver): " + "; ".join(bits) + ".")
    # (a checkpointing keeper hands the overflow check no stored-state tensor: no check line)
    decompose("bf16_c20", "checkpoints", False)
    if g("fp32") is not None and g("fp32_c20") is not None:
        above = lambda k: g(k) - (g(k, "stored_bytes") or 0)  # noqa: E731
        line = (f"- rampde fp32 for comparison (no overflow check: storage dtype = state dtype): default "
                f"{_mb(g('fp32'))} MB ({_mb(g('fp32', 'stored_bytes'))} MB of states), checkpoint=20 "
                f"{_mb(g('fp32_c20'))} MB; above the stored states fp32 holds {_mb(above('fp32'))} MB (default) and "
                f"{_mb(above('fp32_c20'))} MB (checkpoint=20)")
        if g("bf16") is not None and g("bf16_c20") is not None:
            line += f", bf16 {_mb(above('bf16'))} MB and {_mb(above('bf16_c20'))} MB"
        out.append(line + ".")
    if g("bf16") is not None and (g("bf16_noscan") is not None or g("bf16_thp") is not None):
        bits = []
        if g("bf16_noscan") is not None:
            bits.append(f"rampde's hidden-tensor walk disabled {_mb(g('bf16_noscan'))} MB")
        if g("bf16_thp") is not None:
            bits.append(f"torch's THP_MEM_ALLOC_ENABLE=1 {_mb(g('bf16_thp'))} MB (AnonHugePages "
                        f"{R['bf16_thp'].get('thp_kb', '-')} kB)")
        out.append(f"- controls, against the default's {_mb(g('bf16'))} MB: " + "; ".join(bits) + ".")

    loop, td_loop = g("bf16_loop"), g("td_fp32_loop")
    if loop is not None:
        each = R["bf16_loop"].get("retained_each", [])
        line = (f"**Training loop ({args.loop} iterations back to back, an SGD step each, Python's gc left alone): "
                f"rampde bf16 default peaks at {_mb(loop)} MB over the loop"
                + (f" = {loop / td_loop:.4f}x torchdiffeq fp32's loop ({_mb(td_loop)} MB)**" if td_loop else
                   "** (torchdiffeq fp32's loop row was not run)")
                + f"; RSS after each iteration {' '.join(_mb(v) for v in each)} MB, after one `gc.collect()` "
                f"{_mb(R['bf16_loop'].get('after_gc'))} MB.")
        one, stored = g("bf16"), g("bf16_loop", "stored_bytes") or 0
        if one is not None and stored:
            line += (f"  The loop's peak is {_mb(loop - one)} MB above one iteration's ({_mb(one)} MB), "
                     + ("less than one iteration's stored states (" if loop - one < stored else
                        "at least one iteration's stored states (")
                     + f"{_mb(stored)} MB): "
                     + ("no iteration's states outlive its backward." if loop - one < stored else
                        "stored states outlive the iteration that made them."))
        out.append(line)

    cold20, warm20 = g("bf16_c20_cold"), g("bf16_c20")
    td_cold = g("td_fp32_cold")
    if cold20 is not None:
        parts = [f"rampde bf16 checkpoint=20 {_mb(cold20)} MB" + (f" (warm: {_mb(warm20)})" if warm20 else "")]
        if g("bf16_cold") is not None:
            parts.append(f"default {_mb(g('bf16_cold'))} MB" + (f" (warm: {_mb(g('bf16'))})" if g("bf16") else ""))
        if td_cold is not None:
            parts.append(f"torchdiffeq fp32 {_mb(td_cold)} MB (warm: {_mb(base)})")
        out.append("**First iteration of a process** (no warm-up; most of it stays resident, see the retained "
                   "column): " + ", ".join(parts) + ".")
        nodyn, optim = g("bf16_c20_cold_nodynamo"), g("bf16_c20_cold_optim")
        vc, vw = g("vjp_bf16_cold"), vjp
        if warm20 is not None and nodyn is not None:
            once = cold20 - warm20
            dyn = cold20 - nodyn
            first = vc - vw if vc is not None and vw is not None else None
            out.append(f"- checkpoint=20's first iteration costs {_mb(once)} MB more than a warm one.  Not rampde's "
                       f"memory, torch's one-time costs:")
            imp = g("import_dynamo")
            out.append(f"  - {_mb(dyn)} MB: importing `torch._dynamo` (cold minus the row with the `torch._disable_dynamo` "
                       f"wrapper taken off rampde's `FieldWatch.__torch_dispatch__`: {_mb(nodyn)} MB"
                       + (f"; `import torch._dynamo` alone: {_mb(imp)} MB, "
                          f"{R['import_dynamo'].get('modules', '-')} modules" if imp is not None else "")
                       + ").  `FieldWatch` is a TorchDispatchMode; torch wraps every such mode's `__torch_dispatch__` "
                       "in `torch._disable_dynamo`, which imports dynamo at its first call.  Building any "
                       "torch.optim optimizer imports it as well"
                       + (f": with an SGD built before the first iteration, as a training script does, that iteration "
                          f"grows by {_mb(optim)} MB" if optim is not None else "") + ".")
            if first is not None:
                line = (f"  - {_mb(first)} MB: kernel and oneDNN first-use state of the process's first bf16 field VJP "
                        f"({_mb(vc)} MB on its first call, {_mb(vw)} MB warm")
                if g("vjp_bf16_cold_mkldnn_off") is not None:
                    line += f"; {_mb(g('vjp_bf16_cold_mkldnn_off'))} MB first call with mkldnn disabled"
                if g("vjp_fp32_cold") is not None:
                    line += f"; fp32 first call {_mb(g('vjp_fp32_cold'))} MB"
                line += "), paid once by any program that runs these bf16 kernels"
                if td_cold is not None:
                    line += f"; torchdiffeq fp32's own first iteration costs {_mb(td_cold - base)} MB more than its warm one"
                out.append(line + ".")
            own = once - dyn - (first or 0)
            out.append(f"- rampde's own first-call state: the remaining {_mb(own)} MB (lazy imports -- "
                       f"{R['bf16_c20_cold_nodynamo'].get('modules', '-')} modules are imported during the iteration "
                       "without dynamo -- and first-call caches)"
                       + ("; the oneDNN part is an estimate from the field VJP alone" if first is not None else
                          "; the field VJP rows were not run, so the oneDNN first use is in it") + ".")
            if optim is not None and td_cold:
                out.append(f"- A training script that builds its optimizer first sees a first rampde bf16 checkpoint=20 "
                           f"iteration of {_mb(optim)} MB = {optim / td_cold:.4f}x torchdiffeq fp32's first iteration.")
    return out


def select_rows(smoke: bool, only: str | None) -> list[str]:
    """The row keys a run measures: ``--only``'s (torchdiffeq fp32 first, the ratios' base), else the
    ``smoke=True`` rows for ``--smoke``, else all."""
    if only:
        keys = [k for k in only.split(",") if k in ROWS]
        unknown = [k for k in only.split(",") if k and k not in ROWS]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
        return keys if "td_fp32" in keys else ["td_fp32", *keys]
    return [k for k, r in ROWS.items() if r.smoke or not smoke]


def main(argv=None) -> str | None:
    """Run the rows (each in its own process), print and write the report; returns its text."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="RK4 steps (default 400; smoke 16)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--loop", type=int, default=None, help="iterations of the loop rows (default 8; smoke 2)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few rows (tests)")
    p.add_argument("--only", default=None, help="comma-separated row keys")
    p.add_argument("--out", default=None, help="Markdown output (default benchmarks/results/rss-floor-cpu.md; "
                   "not written for --smoke unless given)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 16 if args.smoke else 400
    if args.loop is None:
        args.loop = 2 if args.smoke else 8
    if args.child:
        res = child(args)
        print(RESULT + json.dumps(res), flush=True)
        return None
    start = time.time()
    args.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    keys = select_rows(args.smoke, args.only)
    results = {}
    for key in keys:
        res = run_row(key, args)
        results[key] = res
        msg = res.get("error", "").strip().splitlines()[-1:] if "error" in res else [
            f"peak {_mb(res['peak'])} MB, live {_mib(res.get('live'))} MiB, in {res.get('where')}"]
        print(f"[{time.time() - start:5.0f} s] {key}: {' '.join(msg)} ({res['seconds']:.0f} s)", flush=True)
    text = report(results, args, time.time() - start)
    print(text)
    out = args.out or (None if args.smoke else str(HERE / "results" / "rss-floor-cpu.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    if any("error" in r for r in results.values()):
        raise SystemExit("some rows failed (see the table)")
    return text


if __name__ == "__main__":
    main()
