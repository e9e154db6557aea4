"""What every CPU kernel module shares: the optional numba import, the switch, the thread count and the numpy views
of tensors."""

from __future__ import annotations

import ctypes
import os

import torch

try:  # optional at import time: the PyTorch paths stay complete without it
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

FLOATS = (torch.float32, torch.float64)


def available(*tensors: torch.Tensor) -> bool:
    """numba is importable, not switched off (``MEMLM_CPU_KERNELS=0``), not under torch.compile (which cannot trace
    into numba, and fuses the PyTorch paths itself) or CPU autocast, and every tensor is a CPU float32 / float64
    tensor or an int64 index tensor."""
    if torch.compiler.is_compiling() or numba is None or os.environ.get("MEMLM_CPU_KERNELS", "1") == "0":
        return False
    if torch.is_autocast_enabled("cpu"):  # ops inside the kernels' wrappers would autocast to bf16
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (*FLOATS, torch.int64):
            return False
    return True


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


_NP_TYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}


def _np(t: torch.Tensor):
    """A numpy view of a contiguous CPU tensor's memory (the kernels read and write it in place), made from its data
    pointer. ``Tensor.numpy()`` would mark the storage as shared with numpy and so not resizable, and FSDP frees a
    parameter's unsharded storage by resizing it to 0. The caller keeps ``t`` alive while the view is in use."""
    if not t.is_contiguous():
        raise ValueError("cpu_kernels._np needs a contiguous tensor")
    dtype = np.dtype(_NP_TYPES[t.dtype])
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=dtype)
    buf = (ctypes.c_byte * (t.numel() * dtype.itemsize)).from_address(t.data_ptr())
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(t.shape))
