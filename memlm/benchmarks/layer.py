"""(e) One Memory+ layer forward+backward at the reference size vs. a dense 4x FFN: time and peak memory."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from memlm.benchmarks.timing import maybe_oom, print_table, profile_kernels, time_ms
from memlm.config import MemoryConfig
from memlm.model.memory.pkm import ProductKeyMemory


class _FFN(torch.nn.Module):
    """The dense reference of PAPERS.md: Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(dim, 4 * dim, bias=False), torch.nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _layer_case(layer: torch.nn.Module, x: torch.Tensor, device: torch.device, it: dict) -> tuple[float, float | None]:
    """(median fwd+bwd ms, peak memory in GiB over a step incl. the layer's parameters) under bf16 autocast."""

    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = layer(x)
        y.float().square().mean().backward()

    ms = time_ms(run, device, **it)
    peak = None
    if device.type == "cuda":
        layer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) - sum(p.numel() * p.element_size() for p in layer.parameters())
        run()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return ms, peak


def section_layer(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(e) a whole Memory+ layer (query net, retrieval, lookup, swilu gate, output) vs. a dense 4x FFN."""
    dim, t = (64, 256) if args.quick else (1024, 16384)
    n_keys = 32 if args.quick else 1024
    it = dict(warmup=args.warmup, iters=args.iters)
    torch.manual_seed(0)
    x = torch.randn(t, dim, device=device, requires_grad=True)  # (T, dim): one flat batch of tokens
    ffn = _FFN(dim).to(device)
    rows = [dict(layer="dense FFN 4x", table="-")]
    rows[0]["ms"], rows[0]["peak_gib"] = _layer_case(ffn, x, device, it)
    del ffn
    for table_dtype in (torch.float32, torch.bfloat16):
        for sparse in (False, True):
            mem = MemoryConfig(kind="memory_plus", n_keys=n_keys, heads=args.heads, knn=min(args.knn, n_keys),
                               k_dim=min(256, dim), sparse_grad=sparse)  # fmt: skip
            with torch.device(device):
                layer = ProductKeyMemory(dim, mem)
            layer.value_table.to(table_dtype)
            layer.record = False
            r = dict(layer=f"Memory+ {n_keys**2} slots", table=str(table_dtype).split(".")[-1],
                     grad="sparse" if sparse else "dense")  # fmt: skip
            r["ms"], r["peak_gib"] = maybe_oom(lambda layer=layer: _layer_case(layer, x, device, it)) or (None, None)
            if args.profile and r["ms"] is not None and table_dtype == torch.bfloat16:
                profile_kernels(lambda layer=layer: _layer_case(layer, x, device, dict(warmup=0, iters=1)), device,
                                f"(e) {r['layer']}, {r['table']} table, {r['grad']} grad")  # fmt: skip
            rows.append(r)
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        r["x_ffn_time"] = None if r["ms"] is None else r["ms"] / rows[0]["ms"]
        r["x_ffn_mem"] = (
            None if r["peak_gib"] is None or rows[0]["peak_gib"] is None else r["peak_gib"] / rows[0]["peak_gib"]
        )
    print_table(
        f"(e) one layer forward+backward, d={dim}, {t} tokens, {args.heads} heads x {args.knn} slots, bf16 autocast "
        "(PAPERS.md target for 1M slots: <= 8 ms, <= 8 GiB, <= 4x the FFN)",
        ["layer", "table", "table grad", "ms", "x FFN", "peak GiB", "x FFN mem"],
        [[r["layer"], r["table"], r.get("grad", "-"), r["ms"], r["x_ffn_time"], r["peak_gib"], r["x_ffn_mem"]]
         for r in rows],
    )  # fmt: skip
    print("peak: max allocated during one step minus what was allocated before it, plus the layer's own parameters")
    return dict(dim=dim, tokens=t, slots=n_keys**2, results=rows)
