"""memlm.utils.malloc: with the tuning, a large freed block is reused instead of being page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# 64 MiB malloc'd, written and freed three times (what a training step does with its large buffers); prints whether
# the tuning took effect and the page faults of the last two rounds
PROBE = """
import ctypes, resource
from memlm.utils.malloc import keep_freed_memory_in_heap
on = keep_freed_memory_in_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = 0
for i in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
    faults += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) if i else 0
print(int(on), faults)
"""


def _probe(tuning: str) -> tuple[bool, int]:
    env = {**os.environ, "MEMLM_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    on, faults = out.split()
    return on == "1", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning (Linux)")
def test_freed_blocks_stay_in_heap_and_opt_out():
    on, faults = _probe("1")
    if not on:
        pytest.skip("mallopt not available (not glibc)")
    off, faults_off = _probe("0")
    assert not off
    assert faults < 1000 < faults_off  # 64 MiB = 16k pages: mmapped and faulted in again every round without it
