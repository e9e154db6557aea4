"""Compile every Triton kernel, as the wrappers launch it, for a GPU architecture - no GPU needed.

Without a GPU (CI, laptops) the kernels only run through Triton's interpreter, which accepts code the real compiler
rejects (e.g. layouts a Triton version cannot lower). This runs each wrapper on small CPU tensors with the kernel
launches intercepted, then compiles every recorded launch (signature from the argument dtypes, the same constexprs
and num_warps) to a cubin for the target, e.g. sm_90 (H100). Run it in a process without ``TRITON_INTERPRET=1``:

    python -m memlm.model.memory.kernels.compile_check            # sm_90
    python -m memlm.model.memory.kernels.compile_check --arch 80  # A100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}  # fmt: skip


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "u1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {v!r}")


def _record_launches(kernels: list, run: Callable[[], object]) -> list[tuple]:
    """Run ``run`` with the launches of ``kernels`` recorded instead of executed: [(kernel, args, kwargs)]."""
    launches = []
    for k in kernels:
        k.run = lambda *args, _k=k, grid=None, warmup=False, **kw: launches.append((_k, args, kw))
    try:
        run()
    finally:
        for k in kernels:
            del k.run
    return launches


def _compile(kernel, args: tuple, kw: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kw = dict(kw)
    options = {o: kw.pop(o) for o in ("num_warps", "num_stages") if o in kw}
    names = kernel.arg_names
    const_names = {p.name for p in kernel.params if p.is_constexpr}
    values = dict(zip(names, args)) | kw
    signature = {n: ("constexpr" if n in const_names else _arg_type(values[n])) for n in names}
    constexprs = {n: values[n] for n in names if n in const_names}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return dict(kernel=kernel.fn.__name__, constexprs=constexprs, options=options, seconds=time.perf_counter() - t0,
                shared_bytes=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]))  # fmt: skip


def _cases() -> list[tuple[str, list, Callable[[], object]]]:
    """(name, kernels, run) per wrapper configuration; run calls the wrapper on small CPU tensors."""
    from memlm.model.memory.kernels import adam_rows, lookup, lookup_ranges, topk

    g = torch.Generator().manual_seed(0)
    cases = []
    # odd D (masked columns) and the reference width D = 1024 with K = 128 (production block sizes); fp16 tables and
    # int32 indices too
    for dtype, d, k, idx_dtype in (
        (torch.bfloat16, 100, 8, torch.int64),
        (torch.float32, 100, 8, torch.int64),
        (torch.bfloat16, 1024, 128, torch.int64),
        (torch.float16, 1024, 128, torch.int32),
    ):
        table = torch.randn(64, d, generator=g).to(dtype)
        idx = torch.randint(0, 64, (6, k), generator=g).to(idx_dtype)
        idx[:, :3] = 5  # a row read more often than bwd_cap (set below): the chunked pass launches too
        w = torch.rand(6, k, generator=g)
        gout = torch.randn(6, d, generator=g).to(dtype)
        lk = [lookup._fwd_kernel, lookup._bwd_rows_kernel, lookup._sum_chunks_kernel, lookup._bwd_bags_kernel,
              lookup_ranges._bwd_ranges_kernel]  # fmt: skip
        cases.append((f"lookup forward {dtype}", lk, lambda t=table, i=idx, w=w: lookup.lookup_forward(t, i, w)))
        for mode, kernel in (("dense", "rows"), ("sparse", "rows"), ("atomic", "rows"), ("dense", "ranges"),
                             ("sparse", "ranges")):  # fmt: skip
            for need_w in (True, False):  # the table's gradient alone (weights that need none) compiles other code

                def bwd(t=table, i=idx, w=w, go=gout, mode=mode, kernel=kernel, need_w=need_w):
                    saved = dict(lookup.CONFIG)
                    lookup.CONFIG.update(bwd_cap=4, bwd_kernel=kernel)
                    try:
                        lookup.lookup_backward(t, i, w, go, mode=mode, need_weights=need_w)
                    finally:
                        lookup.CONFIG.update(saved)

                cases.append((f"lookup backward {mode} {kernel} {dtype} D={d} grad_w={need_w}", lk, bwd))
    for dtype in (torch.bfloat16, torch.float32):
        s = torch.randn(5, 4, 2, 64, generator=g).to(dtype)  # (T, heads, 2, n_keys)
        tk = [topk._fwd_kernel, topk._bwd_kernel]
        cases.append((f"top-k forward {dtype}", tk, lambda s=s: topk.topk_forward(s, 8)))
        gs, ids = torch.randn(5, 4, 8, generator=g), torch.randint(0, 64 * 64, (5, 4, 8), generator=g)
        cases.append((f"top-k backward {dtype}", tk, lambda s=s, gs=gs, ids=ids: topk.topk_backward(gs, ids, s)))
    for dtype in (torch.float32, torch.bfloat16):
        for per_row in (False, True):
            p, m, v = torch.randn(32, 100).to(dtype), torch.zeros(32, 100), torch.zeros(32, 100)
            rows, gr = torch.arange(0, 32, 3), torch.randn(11, 100)
            ss = torch.full((11,), 1e-3) if per_row else 1e-3
            bc = torch.full((11,), 0.5) if per_row else 0.5

            def adam(p=p, m=m, v=v, rows=rows, gr=gr, ss=ss, bc=bc):
                adam_rows.adam_rows(p, rows, gr, m, v, ss, bc, 0.9, 0.999, 1e-8)

            cases.append((f"row-sparse Adam {dtype} per-row step {per_row}", [adam_rows._adam_rows_kernel], adam))
    return cases


# shared memory a block may use (bytes), where known; a launch needing more fails with OutOfResources on the device
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def check(arch: int = 90) -> list[dict]:
    """Compile every launch of every case for ``sm_<arch>``; raises on the first kernel that does not compile or
    needs more shared memory than the architecture has. Not reproduced: the divisibility-by-16 hints the real launch
    derives from argument values (they change vectorization, rarely whether a kernel compiles)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs the real Triton compiler: unset TRITON_INTERPRET")
    results, seen = [], set()
    for name, kernels, run in _cases():
        for kernel, args, kw in _record_launches(kernels, run):
            key = (kernel.fn.__name__, tuple(_arg_type(a) for a in args), tuple(sorted(kw.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                res = _compile(kernel, args, kw, arch)
            except Exception as e:
                raise RuntimeError(f"{name}: {kernel.fn.__name__} does not compile for sm_{arch}: {e}") from e
            limit = SHARED_LIMIT.get(arch)
            if limit is not None and res["shared_bytes"] > limit:
                raise RuntimeError(f"{name}: {kernel.fn.__name__} needs {res['shared_bytes']} B of shared memory, "
                                   f"sm_{arch} has {limit}")  # fmt: skip
            results.append(dict(case=name, **res))
    return results


def main(argv: list[str] | None = None) -> int:
    from memlm.utils.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100, 80: A100)")
    args = p.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, target sm_{args.arch}")
    try:
        results = check(args.arch)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in results:
        print(f"  ok  {r['kernel']:<20} {r['case']:<40} shared {r['shared_bytes']:>6} B  {r['seconds']:.1f} s")
    print(f"{len(results)} kernel configurations compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
