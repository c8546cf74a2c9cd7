"""Timing and memory primitives of the benchmarks: interleaved rounds, paired ratios, FLOPs, peak memory.

Everything here is independent of bundles and trainers: :func:`time_interleaved` runs named calls one of each per
round (so the load of other processes affects all of them alike), :func:`paired_ratio` divides them round by
round, :func:`peak_memory_mib` measures what a call allocates (CUDA allocator or CPU profiler memory events).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "MIB",
    "synchronize",
    "summarize",
    "time_interleaved",
    "minor_faults",
    "keep_freed_memory",
    "paired_ratio",
    "flops_per_input",
    "peak_memory_mib",
    "autocast",
    "ratio",
]

MIB = 2.0**20


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, mean, quartiles and inter-quartile range, in milliseconds, of repeated timings given in seconds (the
    samples are kept, in order, under ``"samples_ms"``)."""
    samples = [1e3 * s for s in seconds]
    ms = sorted(samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),  # what amortised schedules (a step every n iterations) cost on average
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "n": len(ms),
        "samples_ms": samples,
    }


def time_interleaved(
    calls: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Time every call ``repeats`` times after ``warmup`` untimed runs, one call of each per round.

    Interleaving spreads the load of other processes over all calls alike, so their ratios stay meaningful on a
    shared machine; the order is rotated by one call each round so that no call always runs first or last.

    Returns:
        ``{name: summarize(seconds)}``; ``samples_ms[r]`` of every call comes from round ``r``.
    """
    names = list(calls)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    faults: dict[str, list[int]] = {name: [] for name in calls}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            faults_before = minor_faults()
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - faults_before)
    return {name: {**summarize(s), "page_faults": statistics.median(faults[name])} for name, s in samples.items()}


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is not available)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's allocator to keep freed memory instead of returning it to the system (Linux only).

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``limit`` bytes with ``mallopt``, as the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would: large tensors are then reused from the
    heap rather than mapped, zero-filled page by page (minor page faults) and unmapped at every step. Returns
    whether both settings were accepted.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):
        return False


def paired_ratio(numerator: Sequence[float], *denominator: Sequence[float]) -> dict[str, float]:
    """Median and quartiles over rounds of ``numerator[r] / sum(d[r] for d in denominator)``.

    Pairing the calls of one round cancels slow changes of the machine's load between rounds.
    """
    ratios = sorted(n / sum(d) for n, *d in zip(numerator, *denominator))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


def flops_per_input(network: nn.Module, example: torch.Tensor, amp: bool = False) -> float:
    """FLOPs of one forward pass per input item (``FlopCounterMode`` counts, divided by the batch size)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast(example.device, amp), counter:
        network(example)
    return counter.get_total_flops() / example.shape[0]


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory (MiB) allocated by ``fn()`` beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset, minus the memory allocated before. CPU: the
    running sum of the profiler's memory events (allocations and frees of tensor memory) during the call, at its
    maximum; allocations made before the call are not counted.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.device("cpu").type or str(event.device_type()).endswith("CPU"):
            current += event.nbytes()
            peak = max(peak, current)
    return peak / MIB


def autocast(device: torch.device, enabled: bool) -> Any:
    """``torch.autocast`` on ``device`` when ``enabled``, else a context that does nothing."""
    return torch.autocast(device_type=device.type, enabled=True) if enabled else nullcontext()


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when either is not finite or ``den`` is 0."""
    return num / den if den and math.isfinite(num) and math.isfinite(den) else float("nan")
