"""Keep freed memory in the process heap (glibc): CPU training allocates and frees the same large buffers every step.

glibc serves allocations above a (dynamic, at most 32 MiB) threshold with a fresh ``mmap`` and returns them to the OS
on ``free``, so every step page-faults its large activations and gradients back in (logits of 16 x 128 tokens x a
4096 vocabulary are 32 MiB). Raising the mmap threshold and the trim threshold keeps those blocks in the heap for
reuse: the default tiny CPU training step went from 165-205 to 126-145 ms (2 cores, 5x fewer page faults). The cost:
the process does not hand freed memory back to the OS until it exits (its RSS stays at its peak), which is the usual
trade for training processes (PyTorch's CPU performance guides suggest jemalloc / tcmalloc for the same reason).

Called by the command-line entry points (``train.py``, the continual script, ``eval/run.py``, ``eval/speed.py``);
library imports never change the allocator. ``MEMLM_MALLOC_TUNING=0`` turns it off. No-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from (and return to) the heap


def keep_freed_memory_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; returns whether both settings took effect."""
    if os.environ.get("MEMLM_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # older glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): fall back to that cap
    mmap_ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) or bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    trim_ok = bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return mmap_ok and trim_ok
