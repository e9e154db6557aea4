"""Timers (CUDA events on GPU), copy bandwidth, kernel profiles and plain-text tables for the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def throughput_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Mean time per call of ``iters`` back-to-back calls with one sync at the end: the host queues work ahead of the
    device, as in training, so launch overhead overlaps device work instead of adding to it."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s: (read + write) bytes of ``y.copy_(x)`` / time."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3)


def profile_kernels(fn: Callable[[], object], device: torch.device, label: str, top: int = 14) -> None:
    """Print the ``top`` device kernels of three calls of ``fn`` by total time (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {label} (3 calls)")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70))


def maybe_oom(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def print_table(title: str, cols: list[str], rows: list[list[object]]) -> None:
    cells = [[c if isinstance(c, str) else ("-" if c is None else f"{c:.3g}") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(cols, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
