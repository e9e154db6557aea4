"""(a) Weighted value lookup forward+backward vs. the bandwidth floor and vs. stock PyTorch."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memlm.benchmarks.timing import maybe_oom, print_table, profile_kernels, time_ms
from memlm.model.memory import kernels


def _lookup_bytes(n: int, d: int, m: int, k: int, u: int, elem: int) -> dict[str, int]:
    """Bytes that must move. fwd: gather L = M*K rows + write M outputs (+ indices int64, weights fp32).
    bwd: read grad_out, read each touched row once (weight grad), write the table gradient (N rows dense, U sparse),
    read indices/weights, write weight grads."""
    big_l = m * k
    fwd = big_l * d * elem + m * d * elem + big_l * 12
    bwd_common = m * d * elem + u * d * elem + big_l * 16
    return dict(fwd=fwd, bwd_dense=bwd_common + n * d * elem, bwd_sparse=bwd_common + u * (d * elem + 8))


def _fwd_bwd(f: Callable, tab: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        tab.grad = None
        weights.grad = None
        f(tab, weights).backward(grad)

    return run


def _lookup_case(args: argparse.Namespace, device: torch.device, bandwidth: float, n: int, use_triton: bool) -> dict:
    """Time every implementation for one table size; returns the JSON entry."""
    d, t, h, k = args.dim, args.tokens, args.heads, args.knn
    m, kk = t, h * k  # heads are summed (PKM / Memory+): one bag of H*K slots per token
    torch.manual_seed(0)
    table = (torch.randn(n, d, device=device) * d**-0.5).to(torch.bfloat16).requires_grad_()  # (N, D)
    idx = torch.randint(0, n, (m, kk), device=device)  # (T, H*K) uniform slots
    w = torch.softmax(torch.randn(m, h, k, device=device), dim=-1).view(m, kk).requires_grad_()  # (T, H*K) fp32
    gout = torch.randn(m, d, device=device, dtype=torch.bfloat16)  # (T, D)
    u = int(torch.unique(idx).numel())
    b16, b32 = _lookup_bytes(n, d, m, kk, u, 2), _lookup_bytes(n, d, m, kk, u, 4)
    f16 = {key: v / bandwidth * 1e3 for key, v in b16.items()}  # ms
    f32 = {key: v / bandwidth * 1e3 for key, v in b32.items()}
    entry: dict = dict(
        rows=n, dim=d, tokens=t, heads=h, knn=k, unique_rows=u, bytes_bf16=b16, bytes_fp32=b32,
        floor_ms=dict(fwd=f16["fwd"], fwd_bwd_dense=f16["fwd"] + f16["bwd_dense"],
                      fwd_bwd_sparse=f16["fwd"] + f16["bwd_sparse"], fp32_fwd=f32["fwd"],
                      fp32_fwd_bwd_dense=f32["fwd"] + f32["bwd_dense"]),
        # PAPERS.md's simpler floor: gather K rows per bag three times (fwd, weight grad, table-grad scatter)
        naive_floor_ms=dict(bf16=3 * m * kk * d * 2 / bandwidth * 1e3, fp32=3 * m * kk * d * 4 / bandwidth * 1e3),
        ms={},
    )  # fmt: skip
    ms = entry["ms"]
    it = dict(warmup=args.warmup, iters=args.iters)
    if use_triton:
        from memlm.model.memory.kernels import lookup

        with torch.no_grad():
            ms["triton_fwd"] = time_ms(lambda: lookup.lookup_forward(table, idx, w), device, **it)
        for name, kw in [("dense", {}), ("sparse", dict(sparse=True)), ("atomic", dict(deterministic=False))]:
            fn = _fwd_bwd(lambda tb, ww, kw=kw: lookup.value_lookup(tb, idx, ww, **kw), table, w, gout)
            ms[f"triton_fwd_bwd_{name}"] = maybe_oom(lambda fn=fn: time_ms(fn, device, **it))
            if args.profile and name != "atomic" and n == max(args.rows):
                profile_kernels(fn, device, f"(a) Triton lookup fwd+bwd, {name} grad, {n} rows")
        other = "ranges" if lookup.CONFIG["bwd_kernel"] == "rows" else "rows"  # the other table-gradient pass
        saved = lookup.CONFIG["bwd_kernel"]
        lookup.CONFIG["bwd_kernel"] = other
        try:
            fn = _fwd_bwd(lambda tb, ww: lookup.value_lookup(tb, idx, ww), table, w, gout)
            ms[f"triton_fwd_bwd_dense_{other}_pass"] = maybe_oom(lambda: time_ms(fn, device, **it))
        finally:
            lookup.CONFIG["bwd_kernel"] = saved
    # stock PyTorch, bf16: embedding_bag forward (no bf16 CUDA backward with per-sample weights) + the gather path
    with torch.no_grad():
        ms["torch_bf16_embbag_fwd"] = maybe_oom(
            lambda: time_ms(
                lambda: F.embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum"), device, **it
            )
        )

    def gather(tb, ww):
        return (tb[idx] * ww.to(tb.dtype)[..., None]).sum(-2)  # (T, H*K, D) intermediate -> (T, D)

    ms["torch_bf16_gather_fwd_bwd"] = maybe_oom(lambda: time_ms(_fwd_bwd(gather, table, w, gout), device, **it))
    table32 = table.detach().float().requires_grad_()  # (N, D) fp32
    g32 = gout.float()  # (T, D)
    if use_triton:
        fn = _fwd_bwd(lambda tb, ww: lookup.value_lookup(tb, idx, ww), table32, w, g32)
        ms["triton_fp32_fwd_bwd_dense"] = maybe_oom(lambda: time_ms(fn, device, **it))
    for sparse in (False, True):

        def emb(tb, ww, sparse=sparse):
            return F.embedding_bag(idx, tb, per_sample_weights=ww, mode="sum", sparse=sparse)

        key = f"torch_fp32_embbag_fwd_bwd_{'sparse' if sparse else 'dense'}"
        ms[key] = maybe_oom(lambda emb=emb: time_ms(_fwd_bwd(emb, table32, w, g32), device, **it))
    return entry


def section_lookup(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(a) value-lookup forward+backward: Triton kernels vs. bandwidth floor vs. stock PyTorch."""
    use_triton = device.type == "cuda" and kernels.available(torch.empty(1, device=device, dtype=torch.bfloat16))
    results = []
    for n in args.rows:
        results.append(_lookup_case(args, device, bandwidth, n, use_triton))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    lines = []  # one line per (rows, implementation)
    for e in results:
        fl, ms = e["floor_ms"], e["ms"]
        for name, val in ms.items():
            fp32 = "fp32" in name
            if "bwd" not in name:
                floor_ms, naive, base = fl["fwd"], None, None
            else:
                floor_ms = (
                    fl["fp32_fwd_bwd_dense"] if fp32 else fl["fwd_bwd_sparse" if "sparse" in name else "fwd_bwd_dense"]
                )
                naive = e["naive_floor_ms"]["fp32" if fp32 else "bf16"]
                base = ms.get("torch_fp32_embbag_fwd_bwd_dense" if fp32 else "torch_bf16_gather_fwd_bwd")
            lines.append([
                str(e["rows"]), name, val, floor_ms, None if val is None else val / floor_ms,
                None if val is None or naive is None else val / naive,
                None if val is None or base is None else base / val,
            ])  # fmt: skip
    print_table(
        f"(a) value lookup, D={args.dim}, {args.tokens} tokens x {args.heads} heads x {args.knn} slots, bf16 table "
        f"(fp32 rows: fp32 table); copy bandwidth {bandwidth / 1e12:.3g} TB/s",
        ["rows", "implementation", "ms", "floor ms", "x floor", "x naive floor", "speedup vs stock"],
        lines,
    )
    print(
        "floor: bytes that must move / copy bandwidth (fwd: L gathered rows + outputs; bwd: grad_out, each touched "
        "row once, the table gradient); naive floor: 3 x L gathered rows (PAPERS.md); stock: bf16 gather fallback "
        "for bf16 rows, fp32 embedding_bag dense for fp32 rows"
    )
    return dict(results=results)
