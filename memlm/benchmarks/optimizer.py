"""(f) The value table's optimizer step: row-sparse Adam implementations vs. the bandwidth floor and dense Adam."""

from __future__ import annotations

import argparse

import torch

from memlm.benchmarks.timing import print_table, time_ms
from memlm.config import ModelConfig
from memlm.model.memory import kernels
from memlm.model.memory.sparse_update import adam_rows_

# fractions of the table's rows that a step touches: sparse finetuning / small batches, and nearly all (uniform reads
# of (b)'s 32 x 512 tokens x 2 layers x 4 heads x 32 slots would touch 98 % of 1M rows; at random init the reads
# concentrate on far fewer)
TOUCHED = (0.1, 0.9)


def _table_shape(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """(rows, dim) of ``--model_config``'s value table (one shared table for all memory layers)."""
    if args.quick:
        return 16384, 64
    cfg = ModelConfig.from_yaml(args.model_config)
    n = cfg.memory.n_keys**2
    if device.type == "cpu":  # p, m, v, a dense gradient and the gathered rows of a 1M x 512 table: ~16 GB
        n = min(n, 262144)
    return n, cfg.dim


def section_value_optimizer(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(f) one optimizer step of the value table (fp32 params, fp32 moments): dense Adam (torch fused, every row)
    vs. the lazy Adam on the touched rows: "reference" (op by op), "torch" (gather + torch's fused Adam + scatter),
    "triton" (one fused gather-update-scatter pass, CUDA)."""
    n, d = _table_shape(args, device)
    it = dict(warmup=args.warmup, iters=args.iters)
    impls = ["reference", "torch"] + (["triton"] if kernels.adam_rows_available(torch.empty(1, device=device)) else [])
    torch.manual_seed(0)
    p = torch.randn(n, d, device=device)  # (N, D)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    rows_out = []
    row_bytes = d * 4 * 7  # read g, p, m, v; write p, m, v (fp32)
    # dense Adam on every row (what AdamW on the value group costs; torch's fused kernel)
    g = torch.randn_like(p)
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)
    p.grad = g

    ms = time_ms(opt.step, device, **it)
    rows_out.append(dict(impl="dense fused Adam", touched=n, ms=ms, floor_ms=n * row_bytes / bandwidth * 1e3))
    del opt, g
    p.grad = None
    for frac in TOUCHED:
        u = int(n * frac)
        rows = torch.randperm(n, device=device)[:u].sort().values  # (U,) unique, sorted like a coalesced gradient
        g = torch.randn(u, d, device=device)  # (U, D)
        floor = u * row_bytes / bandwidth * 1e3
        for impl in impls:

            def step(impl=impl, rows=rows, g=g):
                adam_rows_(p, rows, g, m, v, 10, lr=1e-3, impl=impl)

            rows_out.append(dict(impl=f"row-sparse {impl}", touched=u, ms=time_ms(step, device, **it), floor_ms=floor))
        del rows, g
    for r in rows_out:
        r["vs_floor"] = r["ms"] / r["floor_ms"]
    print_table(
        f"(f) value-table optimizer step, {n} x {d} fp32 table, fp32 moments; floor = 28 bytes per element of the "
        "touched rows (read g, p, m, v; write p, m, v) / copy bandwidth",
        ["implementation", "rows", "ms", "floor ms", "x floor"],
        [[r["impl"], str(r["touched"]), r["ms"], r["floor_ms"], r["vs_floor"]] for r in rows_out],
    )
    return dict(rows=n, dim=d, results=rows_out)
