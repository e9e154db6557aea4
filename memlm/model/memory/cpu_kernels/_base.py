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

# rows gathered by id are prefetched this many rows ahead (the hardware prefetcher cannot guess them). On the
# development machine: 15-35 % off the lookup backward's and the lazy Adam step's kernels over 57k of 262k rows of
# 128-wide fp32 tables, cold cache, in one process (4 and 8 rows ahead did equally well)
PREFETCH_AHEAD = 4

if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch_row(typingctx, arr, row):
        """A software prefetch (read, keep in all cache levels) of every 64-byte line of ``arr[row]``, for a 2-D
        C-contiguous array: a row gathered by id is the next thing a kernel will read, and the hardware prefetcher
        cannot guess it. A hint only: it never faults, so the row id need not be valid."""
        if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C"):
            return None
        sig = types.void(arr, row)

        def codegen(context, builder, signature, args):
            aty, ity = signature.args
            ary = context.make_array(aty)(context, builder, args[0])
            i64, i32, i8p = ir.IntType(64), ir.IntType(32), ir.IntType(8).as_pointer()
            r = context.cast(builder, args[1], ity, types.intp)
            width = builder.extract_value(ary.shape, 1)
            item = context.get_abi_sizeof(context.get_data_type(aty.dtype))
            start = builder.mul(builder.mul(r, width), ir.Constant(i64, item))  # byte offset of the row
            base = builder.bitcast(ary.data, i8p)
            nbytes = builder.mul(width, ir.Constant(i64, item))
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch")  # fmt: skip
            with cgutils.for_range_slice(builder, ir.Constant(i64, 0), nbytes, ir.Constant(i64, 64)) as (off, _):
                addr = builder.gep(base, [builder.add(start, off)])
                builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    MASK_WIDTH = 64  # the scores one above_mask call compares

    @intrinsic
    def above_mask(typingctx, arr, start, thr):
        """A uint64 whose bit j says ``arr[start + j] > thr`` (j < 64; False for NaN) for a 1-D C-contiguous float
        array, which must hold the 64 elements from ``start``: one vector compare and a sign-bit gather per 8 floats
        (vcmpps + vmovmskps on AVX2), where a scalar loop spends a branch or a store on every score."""
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"):
            return None
        if not isinstance(arr.dtype, types.Float):
            return None
        sig = types.uint64(arr, start, thr)

        def codegen(context, builder, signature, args):
            aty, sty, tty = signature.args
            ary = context.make_array(aty)(context, builder, args[0])
            fty = context.get_data_type(aty.dtype)
            vty = ir.VectorType(fty, MASK_WIDTH)
            first = builder.gep(ary.data, [context.cast(builder, args[1], sty, types.intp)])
            item = context.get_abi_sizeof(fty)
            block = builder.load(builder.bitcast(first, vty.as_pointer()), align=item)  # an unaligned load
            t = context.cast(builder, args[2], tty, aty.dtype)
            splat = ir.Constant(vty, ir.Undefined)
            for i in range(MASK_WIDTH):
                splat = builder.insert_element(splat, t, ir.Constant(ir.IntType(32), i))
            bits = builder.fcmp_ordered(">", block, splat)  # ordered: NaN compares False, as `x > thr` does
            return builder.bitcast(bits, ir.IntType(MASK_WIDTH))

        return sig, codegen

    @intrinsic
    def lowest_bit(typingctx, x):
        """The index of the lowest set bit of a nonzero uint64 (``llvm.cttz``: one tzcnt / bsf)."""
        if not isinstance(x, types.Integer):
            return None
        sig = types.uint64(x)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            v = context.cast(builder, args[0], signature.args[0], types.uint64)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                                "llvm.cttz.i64")  # fmt: skip
            return builder.call(fn, [v, ir.Constant(ir.IntType(1), 1)])  # 1: undefined for 0 (never passed)

        return sig, codegen


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
