"""(d) Product-key retrieval time vs. slot count: stock PyTorch top-k vs. the fused Triton top-k."""

from __future__ import annotations

import argparse

import torch

from memlm.benchmarks.timing import print_table, time_ms
from memlm.model.memory import kernels
from memlm.model.memory.product_keys import ProductKeys


def section_retrieval(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(d) product-key top-k time vs. slot count (forward, and forward+backward into queries and keys), stock
    PyTorch top-k vs. the fused Triton top-k (CUDA)."""
    heads, knn = args.heads, args.knn
    k_dim = 32 if args.quick else 256
    n_keys = [256, 512, 1024]  # 65k -> 1M slots (also in --quick: only the token count is smaller)
    knn = min(knn, n_keys[0])
    t = args.tokens
    fused = kernels.topk_available(torch.empty(0, device=device), n_keys[-1], knn)
    impls = ["torch"] + (["triton"] if fused else [])
    rows = []
    it = dict(warmup=args.warmup, iters=args.iters)
    for impl in impls:
        for n in n_keys:
            torch.manual_seed(0)
            keys = ProductKeys(heads, n, k_dim, qk_norm=True).to(device)
            q = torch.randn(t, heads, k_dim, device=device, requires_grad=True)  # (T, heads, k_dim)

            def fwd(keys=keys, q=q):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    keys.retrieve(q, knn, impl=impl)

            def fwd_bwd(keys=keys, q=q):
                keys.zero_grad(set_to_none=True)
                q.grad = None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    scores, _ = keys.retrieve(q, knn, impl=impl)  # (T, heads, knn)
                scores.float().sum().backward()

            rows.append(dict(impl=impl, slots=n * n, n_keys=n, fwd_ms=time_ms(fwd, device, **it),
                             fwd_bwd_ms=time_ms(fwd_bwd, device, **it)))  # fmt: skip
    first = {r["impl"]: r for r in rows if r["n_keys"] == n_keys[0]}
    for r in rows:
        r["fwd_vs_smallest"] = r["fwd_ms"] / first[r["impl"]]["fwd_ms"]
        r["fwd_bwd_vs_smallest"] = r["fwd_bwd_ms"] / first[r["impl"]]["fwd_bwd_ms"]
        r["sqrt_n_ratio"] = (r["slots"] / n_keys[0] ** 2) ** 0.5
    print_table(
        f"(d) product-key retrieval (query scores + top-k), {t} tokens x {heads} heads, top-{knn}, k_dim {k_dim}, "
        "qk-norm",
        ["top-k", "slots", "fwd ms", "x smallest", "fwd+bwd ms", "x smallest", "sqrt(N) ratio"],
        [[r["impl"], str(r["slots"]), r["fwd_ms"], r["fwd_vs_smallest"], r["fwd_bwd_ms"], r["fwd_bwd_vs_smallest"],
          r["sqrt_n_ratio"]] for r in rows],
    )  # fmt: skip
    return dict(tokens=t, heads=heads, knn=knn, k_dim=k_dim, results=rows)
