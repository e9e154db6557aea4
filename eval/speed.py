"""Speed benchmarks for memlm memory layers (issue 8): prints a table per section and writes JSON.

Sections (``--sections a,b,c,d``):
  a  value lookup forward+backward vs. the bandwidth floor (bytes that must move / device copy bandwidth measured in
     the same run) and vs. stock PyTorch (fp32 F.embedding_bag; the bf16 gather fallback, since PyTorch has no bf16
     CUDA backward for embedding_bag with per-sample weights).
  b  Memory+ training tokens/s vs. its equal-FLOP dense baseline            (not implemented yet)
  c  training-step time as slots grow 16x, dense Adam vs. row-sparse        (not implemented yet)
  d  retrieval time vs. slot count                                         (not implemented yet)

Usage:
    python eval/speed.py --sections a --out runs/speed.json           # GPU reference sizes
    python eval/speed.py --sections a --device cpu --quick            # tiny CPU smoke run

Each section is a function ``(args, device, bandwidth) -> dict`` registered in ``SECTIONS``; it prints its own table
and returns JSON-able rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from memlm.model.memory import kernels  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
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


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s: (read + write) bytes of ``y.copy_(x)`` / time."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3)


def _maybe_oom(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _print_table(title: str, cols: list[str], rows: list[list[object]]) -> None:
    cells = [[c if isinstance(c, str) else ("-" if c is None else f"{c:.3g}") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(cols, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


# ----------------------------------------------------------------------------------------------------------------------
# (a) value lookup


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
            ms[f"triton_fwd_bwd_{name}"] = _maybe_oom(lambda fn=fn: time_ms(fn, device, **it))
    # stock PyTorch, bf16: embedding_bag forward (no bf16 CUDA backward with per-sample weights) + the gather path
    with torch.no_grad():
        ms["torch_bf16_embbag_fwd"] = _maybe_oom(
            lambda: time_ms(
                lambda: F.embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum"), device, **it
            )
        )

    def gather(tb, ww):
        return (tb[idx] * ww.to(tb.dtype)[..., None]).sum(-2)  # (T, H*K, D) intermediate -> (T, D)

    ms["torch_bf16_gather_fwd_bwd"] = _maybe_oom(lambda: time_ms(_fwd_bwd(gather, table, w, gout), device, **it))
    table32 = table.detach().float().requires_grad_()  # (N, D) fp32
    g32 = gout.float()  # (T, D)
    if use_triton:
        fn = _fwd_bwd(lambda tb, ww: lookup.value_lookup(tb, idx, ww), table32, w, g32)
        ms["triton_fp32_fwd_bwd_dense"] = _maybe_oom(lambda: time_ms(fn, device, **it))
    for sparse in (False, True):

        def emb(tb, ww, sparse=sparse):
            return F.embedding_bag(idx, tb, per_sample_weights=ww, mode="sum", sparse=sparse)

        key = f"torch_fp32_embbag_fwd_bwd_{'sparse' if sparse else 'dense'}"
        ms[key] = _maybe_oom(lambda emb=emb: time_ms(_fwd_bwd(emb, table32, w, g32), device, **it))
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
    _print_table(
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


def _not_implemented(name: str) -> Callable[[argparse.Namespace, torch.device, float], dict]:
    def run(args, device, bandwidth):
        print(f"\n({name}) not implemented yet (issue 8)")
        return dict(status="not implemented")

    return run


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device, float], dict]] = {
    "a": section_lookup,
    "b": _not_implemented("b"),
    "c": _not_implemented("c"),
    "d": _not_implemented("d"),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="a", help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument(
        "--rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="table sizes for (a), comma-separated (default 65536,262144,1048576)",
    )
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    quick = args.quick
    args.rows = args.rows or ([4096, 16384] if quick else [65536, 262144, 1048576])
    args.dim = args.dim or (64 if quick else 1024)
    args.tokens = args.tokens or (256 if quick else 16384)
    args.iters = args.iters or (3 if quick else 10)

    bandwidth = copy_bandwidth(device, (64 if quick else 1024) * 2**20)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.3g} TB/s")
    out = dict(
        device=gpu, torch=torch.__version__, copy_bandwidth_Bps=bandwidth, args=vars(args) | {"out": None}, sections={}
    )
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    for s in sections:
        out["sections"][s] = SECTIONS[s](args, device, bandwidth)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
