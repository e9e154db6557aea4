"""(g) CPU throughput targets (issue 19), each a ratio measured in one run at 1 and at 2 threads, cases interleaved.

1. one layer forward+backward, x = 4 x 512 x 256, 4 heads x top-32: memlm ``pkm`` (dense and sparse table
   gradient) and ``memory_plus`` (sparse) vs the PyPI ``product-key-memory`` PKM, at 65k and 262k slots; PEER vs
   ``PEER-pytorch`` and UltraMem vs ``ultra-mem`` at 65k as information. The peers are an optional extra
   (``pip install -e ".[peers]"``); without them the memlm rows are timed alone and no ratio is printed.
   Target: memlm / PKM <= 0.7.
2. the value table's optimizer step, 262,144 x 256 fp32, the rows that one batch's reads touch (uniform reads:
   the tiny model's batch and the layer benchmark's batch), the gradient flagged as autograd leaves it:
   ``RowSparseAdam`` vs torch's fused dense Adam on the whole table. Target: <= 1. As a diagnostic, each step's
   effective memory bandwidth (the bytes Adam must move: the touched rows of the parameter and both moments read
   and written, the gradient rows read) beside a plain copy of the table, timed in the same rounds: how close the
   step is to the machine's memory limit.
3. training tokens/s of the tiny Memory+ model with 262,144 slots (row-sparse values) vs its equal-FLOP dense twin
   (``dense_matched_config``, AdamW), 16 x 128 tokens per step. Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memlm.benchmarks.timing import print_table
from memlm.config import MemoryConfig, ModelConfig
from memlm.model import dense_matched_config

ROOT = Path(__file__).resolve().parents[2]
THREADS = (1, 2)


def interleaved_ms(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each case, the cases called in turn for ``rounds`` rounds (slow drifts of a shared
    machine hit all of them alike)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------- 1. layers
def _peer_layers(dim: int, n_keys: int, heads: int, knn: int) -> dict[str, torch.nn.Module]:
    """The PyPI layers that are installed, configured like memlm's (query half width 128 = memlm k_dim 256)."""
    out = {}
    try:
        from product_key_memory import PKM

        out["PyPI PKM"] = PKM(dim, heads=heads, num_keys=n_keys, topk=knn, dim_head=128)
    except ImportError:
        pass
    if n_keys == 256:
        try:
            from PEER_pytorch import PEER

            out["PyPI PEER"] = PEER(dim, heads=heads, num_experts=n_keys**2, num_experts_per_head=16, dim_key=128)
        except ImportError:
            pass
        try:
            from ultra_mem import UltraMem

            out["PyPI UltraMem"] = UltraMem(dim, num_memories=n_keys**2, topk=knn, dim_queries_keys=128)
        except ImportError:
            pass
    return out


def _memlm_layers(dim: int, n_keys: int, heads: int, knn: int) -> dict[str, torch.nn.Module]:
    from memlm.model.memory import PEER, ProductKeyMemory, UltraMem

    def make(kind: str, sparse: bool, k: int = knn) -> torch.nn.Module:
        cfg = MemoryConfig(kind=kind, n_keys=n_keys, heads=heads, knn=k, k_dim=256, sparse_grad=sparse)
        if kind == "peer":
            layer = PEER(dim, cfg)
        elif kind == "ultramem":
            layer = UltraMem(dim, cfg, dim, seed=0)
        else:
            layer = ProductKeyMemory(dim, cfg)  # its own value table (no model-level pool)
        layer.record = False
        return layer

    out = {"memlm pkm (dense grad)": make("pkm", False), "memlm pkm (sparse grad)": make("pkm", True),
           "memlm memory_plus (sparse grad)": make("memory_plus", True)}  # fmt: skip
    if n_keys == 256:
        out["memlm peer (sparse grad)"] = make("peer", True, k=16)
        out["memlm ultramem (dense grad)"] = make("ultramem", False)  # cores > 1 reads the table in core slices
    return out


def _fwd_bwd(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        y.square().mean().backward()

    return run


def _peer_of(name: str) -> str | None:
    for kind, peer in (("peer", "PyPI PEER"), ("ultramem", "PyPI UltraMem")):
        if name.startswith(f"memlm {kind} "):
            return peer
    return "PyPI PKM" if name.startswith("memlm") else None


def _layers_case(args: argparse.Namespace) -> list[dict]:
    dim, heads, knn = 256, 4, 32
    b, t = (2, 64) if args.quick else (4, 512)
    rows = []
    for n_keys in (64, 128) if args.quick else (256, 512):
        torch.manual_seed(0)
        layers = _memlm_layers(dim, n_keys, heads, knn) | _peer_layers(dim, n_keys, heads, knn)
        x = torch.randn(b, t, dim, requires_grad=True)
        for th in THREADS:
            torch.set_num_threads(th)
            ms = interleaved_ms({k: _fwd_bwd(m, x) for k, m in layers.items()}, args.iters)
            for k, v in ms.items():
                peer = _peer_of(k)
                ratio = v / ms[peer] if peer in ms else None
                rows.append(dict(slots=n_keys**2, threads=th, layer=k, ms=v, vs_peer=ratio,
                                 peer=peer if ratio else None))  # fmt: skip
    print_table(
        f"(g1) one layer fwd+bwd, x = {b} x {t} x {dim}, {heads} heads x top-{knn}, fp32 (target: memlm pkm / "
        "memory_plus <= 0.7 x PyPI PKM)",
        ["slots", "threads", "layer", "ms", "x peer"],
        [[str(r["slots"]), str(r["threads"]), r["layer"], r["ms"], r["vs_peer"]] for r in rows],
    )
    return rows


# ---------------------------------------------------------------------------------------------- 2. optimizer step
def _touched_rows(n: int, reads: int, gen: torch.Generator) -> torch.Tensor:
    """The sorted distinct rows of ``reads`` uniform reads of an n-row table (what one batch's lookups touch)."""
    return torch.randint(0, n, (reads,), generator=gen).unique()


def _optimizer_case(args: argparse.Namespace) -> list[dict]:
    from memlm.model.memory.sparse_update import RowSparseAdam

    n, d = (16384, 64) if args.quick else (262144, 256)
    batches = {"tiny model batch (16 x 128 tokens x 4 x 8 reads)": 16 * 128 * 4 * 8,
               "layer batch (4 x 512 tokens x 4 x 32 reads)": 4 * 512 * 4 * 32}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for label, reads in batches.items():
        rows = _touched_rows(n, reads, gen)  # (U,)
        vals = torch.randn(rows.numel(), d, generator=gen)  # (U, D)
        sparse_p = torch.nn.Parameter(torch.randn(n, d, generator=gen))
        dense_p = torch.nn.Parameter(sparse_p.detach().clone())
        dense_grad = torch.zeros(n, d).index_copy_(0, rows, vals)
        rsa = RowSparseAdam([{"params": [sparse_p], "row_sparse": True}], lr=1e-3)
        dense = torch.optim.Adam([dense_p], lr=1e-3, fused=True)

        def sparse_step() -> None:
            # flagged uncoalesced, as autograd stores a stolen sparse gradient (the lookups build it coalesced)
            sparse_p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (n, d), check_invariants=False)
            rsa.step()

        def recoalesce_step() -> None:  # what the step cost when every step re-coalesced the gradient
            sparse_p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (n, d), check_invariants=False).coalesce()
            rsa.step()

        def dense_step() -> None:
            dense_p.grad = dense_grad
            dense.step()

        copy_dst = torch.empty_like(dense_grad)

        def copy() -> None:  # the bandwidth reference: read one table, write another
            copy_dst.copy_(dense_grad)

        row_bytes = d * 4  # fp32
        sparse_bytes = rows.numel() * row_bytes * 7  # parameter, exp_avg, exp_avg_sq read and written; grad read
        dense_bytes = n * row_bytes * 7
        for th in THREADS:
            torch.set_num_threads(th)
            ms = interleaved_ms({"row-sparse": sparse_step, "row-sparse + coalesce": recoalesce_step,
                                 "dense fused": dense_step, "copy": copy}, args.iters)  # fmt: skip
            sparse_ms, dense_ms = ms["row-sparse"], ms["dense fused"]
            copy_gbs = 2 * n * row_bytes / ms["copy"] / 1e6
            rows_out.append(dict(batch=label, rows_touched=rows.numel(), frac=rows.numel() / n, threads=th,
                                 sparse_ms=sparse_ms, coalesce_ms=ms["row-sparse + coalesce"] - sparse_ms,
                                 dense_ms=dense_ms, vs_dense=sparse_ms / dense_ms, copy_gbs=copy_gbs,
                                 sparse_gbs=sparse_bytes / sparse_ms / 1e6,
                                 dense_gbs=dense_bytes / dense_ms / 1e6))  # fmt: skip
    print_table(
        f"(g2) value-table optimizer step, {n} x {d} fp32, rows of one batch's uniform reads (target: row-sparse <= "
        "dense fused Adam on the whole table); GB/s: the bytes each step must move / its time, beside a table copy",
        ["batch", "rows", "frac", "threads", "row-sparse ms", "+coalesce ms", "dense ms", "x dense", "row-sparse GB/s",
         "dense GB/s", "copy GB/s"],
        [[r["batch"], str(r["rows_touched"]), r["frac"], str(r["threads"]), r["sparse_ms"], r["coalesce_ms"],
          r["dense_ms"], r["vs_dense"], r["sparse_gbs"], r["dense_gbs"], r["copy_gbs"]] for r in rows_out],
    )  # fmt: skip
    return rows_out


# ---------------------------------------------------------------------------------------------- 3. training
def _tiny_262k() -> ModelConfig:
    cfg = ModelConfig.from_yaml(ROOT / "configs" / "model" / "tiny_memory_plus.yaml")
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, n_keys=512))


def _training_case(args: argparse.Namespace) -> list[dict]:
    from memlm.benchmarks.training import _TrainStep

    mem = _tiny_262k()
    if args.quick:
        mem = dataclasses.replace(mem, n_layers=2, memory=dataclasses.replace(mem.memory, layers=[1], n_keys=64))
    dense = dense_matched_config(mem)
    batch, seq = (4, 32) if args.quick else (16, 128)
    mem, dense = dataclasses.replace(mem, max_seq_len=seq), dataclasses.replace(dense, max_seq_len=seq)
    cpu = torch.device("cpu")
    steps = {"dense (AdamW)": _TrainStep(dense, "adamw", cpu, batch, seq),
             f"memory_plus {mem.memory.n_keys ** 2} slots (row-sparse)": _TrainStep(mem, "row_sparse_adam", cpu, batch,
                                                                                     seq)}  # fmt: skip
    rows = []
    for th in THREADS:
        torch.set_num_threads(th)
        ms = interleaved_ms(steps, args.iters)
        base = ms["dense (AdamW)"]
        for k, v in ms.items():
            rows.append(dict(threads=th, model=k, step_ms=v, tokens_per_s=batch * seq / v * 1e3, vs_dense=base / v))
    for s in steps.values():
        s.close()
    print_table(
        f"(g3) training tokens/s, tiny model, {batch} x {seq} tokens per step, fp32; dense twin ffn_hidden "
        f"{dense.hidden_dim} (target: memory >= 0.9 x dense)",
        ["threads", "model", "step ms", "tokens/s", "x dense"],
        [[str(r["threads"]), r["model"], r["step_ms"], r["tokens_per_s"], r["vs_dense"]] for r in rows],
    )
    return rows


def section_cpu_targets(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(g) the three CPU targets at 1 and 2 threads (CPU only; the thread count is restored afterwards)."""
    if device.type != "cpu":
        print("(g) is a CPU benchmark: skipped on", device)
        return {}
    before = torch.get_num_threads()
    try:
        return dict(layers=_layers_case(args), optimizer=_optimizer_case(args), training=_training_case(args))
    finally:
        torch.set_num_threads(before)
