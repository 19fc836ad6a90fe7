"""Measurement helpers shared by the main job and the benchmark suite."""

from __future__ import annotations

import os
import platform

import torch


def machine_info(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torchdiffeq": version("torchdiffeq"),
        "torchode": version("torchode"),
        "rampde_plugins": version("rampde-plugins"),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def runnable_others(samples: int = 5, interval: float = 0.05) -> float:
    """Other processes' threads runnable right now: the median over a few samples of the kernel's
    running-task count (``/proc/loadavg``'s 4th field) minus this one; 0.0 where there is no /proc.

    The load average follows a load that has just started with a one-minute lag: a program started
    together with its competitors would see a quiet machine."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as fh:
                counts.append(max(0, int(fh.read().split()[3].split("/")[0]) - 1))
        except (OSError, IndexError, ValueError):
            return 0.0
        if i + 1 < samples:
            time.sleep(interval)
    return float(statistics.median(counts))


def choose_threads(spec: str | int = "auto") -> tuple[int, str]:
    """The torch thread count for a benchmark process, and why.

    ``"auto"``: the cores this process may run on minus the load other processes already put on them
    (the larger of the 1-minute load average and the threads runnable right now, rounded), at least 1.
    OpenMP threads that outnumber the free cores oversubscribe them: every parallel region then waits
    for its slowest thread, descheduled behind another process, and a torch program runs many times
    slower (10x and more measured here with two competing torch processes on 2 cores).  An integer is
    taken as given."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        cores = os.cpu_count() or 1
    avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if spec != "auto":
        try:
            n = int(spec)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ValueError(f"--threads {spec!r}: a positive integer or 'auto'")
        return n, f"{n} as asked ({cores} cores, load average {avg:.2f})"
    now = runnable_others()
    load = max(avg, now)
    n = max(1, min(cores, int(cores - load + 0.5)))
    return n, (f"{n} of {cores} cores: load average {avg:.2f}, {now:.0f} other threads runnable now "
               f"(more threads than free cores oversubscribe them; --threads N to choose)")


def round_robin(fns: dict, rounds: int, sync=None) -> dict[str, list[float]]:
    """Seconds per call of each ``label -> fn``: one warm-up call each, then ``rounds`` rounds with the
    order rotated every round, so that a load that comes and goes hits every configuration alike.
    ``sync``: called before and after each timed call (``torch.cuda.synchronize`` on a GPU)."""
    import time

    items = list(fns.items())
    for _, fn in items:
        fn()
    times: dict[str, list[float]] = {label: [] for label, _ in items}
    for r in range(rounds):
        for label, fn in items[r % len(items):] + items[: r % len(items)]:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[label].append(time.perf_counter() - t0)
    return times


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def default_precision(device: torch.device) -> str:
    """bf16 on CPUs (fast bf16 matmul, fp16 is emulated and slow); fp16 on CUDA (tensor cores)."""
    return "fp16" if device.type == "cuda" else "bf16"


# -- process memory (the benchmark suite) ------------------------------------------------------------
def current_rss_bytes() -> int:
    """Resident set size now (/proc/self/statm; falls back to the peak where /proc is missing)."""
    import os

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where impossible.

    Without the reset, a peak set earlier (imports, building the model) would hide a smaller
    iteration's peak.  The reset moves /proc/self/status VmHWM; it does not move ``ru_maxrss`` in a
    child process, which also keeps the high-water mark of the *parent* at fork/exec time.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> tuple[int, str]:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else ``ru_maxrss``; with the source."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return ru_maxrss_bytes(), "ru_maxrss"


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the OS (glibc ``malloc_trim``).

    So that an iteration's allocations show up as RSS growth instead of being served from pages
    that happen to be resident already.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
