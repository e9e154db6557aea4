"""Every Triton kernel compiles for an H100 (sm_90) as its wrapper launches it - checked on machines without a GPU.

The interpreter-mode tests (test_kernels.py) check the kernels' results but not that the real compiler accepts them;
this compiles each recorded launch to a cubin (``memlm.model.memory.kernels.compile_check``), in a fresh process
without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "memlm.model.memory.kernels.compile_check", "--arch", "90"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kernels = {line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("ok")}
    assert kernels == {"_fwd_kernel", "_bwd_rows_kernel", "_sum_chunks_kernel", "_bwd_bags_kernel", "_bwd_kernel",
                       "_adam_rows_kernel", "_bwd_ranges_kernel"}  # fmt: skip
