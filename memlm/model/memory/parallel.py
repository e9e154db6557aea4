"""Memory-parallel value tables: dimension-wise sharding over a group of ranks, on ``torch.distributed`` collectives.

Memory+ (Berges et al. 2024, "Memory Layers at Scale", section on memory parallelism) shards each value table along
its embedding dimension: in a memory-parallel group of W ranks, rank r holds ``V[:, its D/W columns]`` for ALL rows.
A lookup of the group's tokens then goes:

forward (per lookup)
    1. all-gather the group's (token, slot) indices and weights           (every rank: all M_all tokens)
    2. each rank sums its columns of the selected rows for all tokens     ``part (M_all, D/W)``, no communication
    3. all-to-all: rank r sends token-owner j the rows of j's tokens      -> each rank its own tokens' full (M, D)
backward
    4. all-to-all of ``grad_out``, the inverse of 3                       -> each rank all tokens' grads, its columns
    5. the table gradient of the shard from (indices, weights, grads)     stays LOCAL (never all-reduced), x 1/W
    6. the weights' gradient: per-column partial dots, summed over ranks and returned to the token owners
       (an all-to-all + sum, i.e. a reduce-scatter over tokens)

The table's gradient is scaled by 1/W: the group's loss is the mean of the W ranks' losses (as DDP averages the dense
gradients), while step 5 sums the gradients of all W ranks' tokens. Optimizer state lives with each shard (Adam moments
(N, D/W) per rank). ``row_dot`` (PEER's u table, UltraMemV2's pre-values) is the transpose: the input vectors' columns
are exchanged (all-to-all), the partial dots reduce-scattered; its backward all-gathers the (M, K) gradient.

Simplifications vs the paper (see docs/scale_out.md): the memory-parallel group is the whole world (no hybrid
"memory-parallel inside data-parallel replicas"); the table is initialized in full on every rank and then sliced
(same values as one process; transient memory of one full table); checkpoints and exports gather the full table
(world-size-independent files); row-wise sharding (UltraMem's all-to-all of indices) is costed in
:func:`comm_bytes_per_step` but not implemented.

Every function here that takes a ``ShardSpec`` runs a collective: all ranks of its group call it, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import ConfigError
from memlm.model.memory.values import row_dots, shard_of, table_grad

PARALLEL_MODES = ("none", "dim")


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """Where a table shard sits: rank ``rank`` of ``world`` in ``group`` holds columns of a (N, ``full_dim``) table.

    Column layout: the full table viewed as (N, blocks, W, full_dim / (blocks W)); rank r holds ``[:, :, r, :]``. With
    ``blocks == 1`` that is the contiguous column range ``[r D/W, (r+1) D/W)``. UltraMem with ``cores`` > 1 reads the
    table as (N * cores, D / cores) (core c's slice of each row); ``blocks = cores`` makes the shard, viewed the same
    way, the column shard of that view, so the lookup needs no special case.
    """

    group: Any
    rank: int
    world: int
    full_dim: int
    blocks: int = 1

    @property
    def local_dim(self) -> int:
        return self.full_dim // self.world


# ---------------------------------------------------------------------------------------------- collectives
def _sizes(m: int, spec: ShardSpec, device) -> list[int]:
    """Token counts (bags) of every rank of the group (they may differ, e.g. a last, shorter batch)."""
    t = torch.tensor([m], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(spec.world)]
    dist.all_gather(out, t, group=spec.group)
    return [int(x) for x in out]


def _gather_rows(x: torch.Tensor, sizes: list[int], spec: ShardSpec) -> torch.Tensor:
    """All-gather along dim 0 with per-rank sizes: (sizes[rank], ...) -> (sum(sizes), ...) in rank order."""
    big = max(sizes)
    if x.shape[0] < big:  # gloo / nccl all_gather need equal shapes: pad, then trim
        x = torch.cat([x, x.new_zeros(big - x.shape[0], *x.shape[1:])])
    out = [torch.empty_like(x) for _ in range(spec.world)]
    dist.all_gather(out, x.contiguous(), group=spec.group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def _to_owners(part: torch.Tensor, sizes: list[int], spec: ShardSpec) -> torch.Tensor:
    """(M_all, C) rows of all tokens in rank order -> (W, M_own, C): block j = what rank j computed for my tokens."""
    m = sizes[spec.rank]
    out = part.new_empty(spec.world * m, *part.shape[1:])
    dist.all_to_all_single(out, part.contiguous(), [m] * spec.world, sizes, group=spec.group)
    return out.view(spec.world, m, *part.shape[1:])


def _from_owners(blocks: torch.Tensor, sizes: list[int], spec: ShardSpec) -> torch.Tensor:
    """Inverse of :func:`_to_owners`: (W, M_own, C), block j for rank j -> (M_all, C) all tokens, rank order."""
    m = sizes[spec.rank]
    out = blocks.new_empty(sum(sizes), *blocks.shape[2:])
    dist.all_to_all_single(out, blocks.reshape(spec.world * m, *blocks.shape[2:]).contiguous(), sizes,
                           [m] * spec.world, group=spec.group)  # fmt: skip
    return out


def _split_columns(x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """(M, W * C) -> (W, M, C): block j = the columns rank j holds (of a table, or of its per-core view)."""
    m = x.shape[0]
    return x.reshape(m, spec.world, -1).permute(1, 0, 2).contiguous()


def _join_columns(blocks: torch.Tensor) -> torch.Tensor:
    """(W, M, C) -> (M, W * C): inverse of :func:`_split_columns`."""
    w, m, c = blocks.shape
    return blocks.permute(1, 0, 2).reshape(m, w * c)


class _ShardedLookup(torch.autograd.Function):
    """out (M, W*C) = sum_k w[m, k] V[idx[m, k]] for this rank's M tokens, from a (N, C) column shard (steps 1-6)."""

    @staticmethod
    def forward(ctx, table, idx, w, spec: ShardSpec, sparse: bool):  # noqa: D102
        sizes = _sizes(idx.shape[0], spec, idx.device)
        idx_all = _gather_rows(idx, sizes, spec)  # (M_all, K)
        w_all = _gather_rows(w.detach(), sizes, spec)  # (M_all, K) in the table's dtype
        part = F.embedding_bag(idx_all, table.detach(), per_sample_weights=w_all, mode="sum")  # (M_all, C)
        out = _join_columns(_to_owners(part, sizes, spec))  # (M, W*C): my tokens, every rank's columns
        ctx.save_for_backward(idx_all, w_all)
        ctx.table, ctx.spec, ctx.sizes, ctx.sparse = table, spec, sizes, sparse
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        idx_all, w_all = ctx.saved_tensors
        spec, sizes, table = ctx.spec, ctx.sizes, ctx.table.detach()
        g_all = _from_owners(_split_columns(grad_out, spec), sizes, spec)  # (M_all, C): all tokens, my columns
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_table = table_grad(idx_all, w_all, g_all.to(table.dtype), table.shape, ctx.sparse, 1.0 / spec.world)
        if ctx.needs_input_grad[2]:
            part = row_dots(table, idx_all, g_all)  # (M_all, K) partial over my columns
            grad_w = _to_owners(part, sizes, spec).sum(0)  # (M, K): summed over the ranks' columns
        return grad_table, None, grad_w, None, None


class _ShardedRowDot(torch.autograd.Function):
    """out (M, K) = <V[idx[m, k]], x[m]> for this rank's tokens, from a (N, C) column shard; x is (M, W*C)."""

    @staticmethod
    def forward(ctx, table, idx, x, spec: ShardSpec, sparse: bool):  # noqa: D102
        sizes = _sizes(idx.shape[0], spec, idx.device)
        idx_all = _gather_rows(idx, sizes, spec)  # (M_all, K)
        x_all = _from_owners(_split_columns(x.detach(), spec), sizes, spec)  # (M_all, C): all tokens, my columns
        part = row_dots(table.detach(), idx_all, x_all)  # (M_all, K) partial over my columns
        out = _to_owners(part, sizes, spec).sum(0)  # (M, K)
        ctx.save_for_backward(idx_all, x_all)
        ctx.table, ctx.spec, ctx.sizes, ctx.sparse, ctx.x_dtype = table, spec, sizes, sparse, x.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        idx_all, x_all = ctx.saved_tensors
        spec, sizes, table = ctx.spec, ctx.sizes, ctx.table.detach()
        g_all = _gather_rows(grad.contiguous(), sizes, spec)  # (M_all, K)
        grad_table = grad_x = None
        if ctx.needs_input_grad[2]:
            part = F.embedding_bag(idx_all, table, per_sample_weights=g_all.to(table.dtype), mode="sum")  # (M_all, C)
            grad_x = _join_columns(_to_owners(part, sizes, spec)).to(ctx.x_dtype)  # (M, W*C)
        if ctx.needs_input_grad[0]:
            grad_table = table_grad(idx_all, g_all, x_all.to(table.dtype), table.shape, ctx.sparse, 1.0 / spec.world)
        return grad_table, None, grad_x, None, None


def sharded_value_lookup(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, spec: ShardSpec, sparse: bool = False
) -> torch.Tensor:
    """:func:`memlm.model.memory.values.value_lookup` on a column shard: (..., K) indices / weights of this rank's
    tokens -> (..., W * C) full vectors. A collective: every rank of ``spec.group`` calls it for the same lookup."""
    lead, k = indices.shape[:-1], indices.shape[-1]
    flat_idx = indices.reshape(-1, k)  # (M, K)
    flat_w = weights.reshape(-1, k).to(table.dtype)  # (M, K)
    out = _ShardedLookup.apply(table, flat_idx, flat_w, spec, sparse)  # (M, W*C)
    return out.view(*lead, out.shape[-1])


def sharded_row_dot(
    table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, spec: ShardSpec, sparse: bool = False
) -> torch.Tensor:
    """:func:`memlm.model.memory.values.row_dot` on a column shard: (..., K) indices, (..., D) x -> (..., K)."""
    lead, k = indices.shape[:-1], indices.shape[-1]
    flat_idx = indices.reshape(-1, k)  # (M, K)
    flat_x = x.reshape(-1, x.shape[-1])  # (M, D)
    out = _ShardedRowDot.apply(table, flat_idx, flat_x, spec, sparse)  # (M, K)
    return out.view(*lead, k)


# ---------------------------------------------------------------------------------------------- shard / unshard
def local_columns(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """(N, D) full table -> (N, D / W) the columns rank ``spec.rank`` holds (a copy)."""
    n, d_b = full.shape[0], spec.full_dim // (spec.blocks * spec.world)
    return full.reshape(n, spec.blocks, spec.world, d_b)[:, :, spec.rank, :].reshape(n, spec.blocks * d_b).clone()


def gather_full(local: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """(N, D / W) shards of every rank -> (N, D) the full table, on every rank (a collective)."""
    parts = [torch.empty_like(local) for _ in range(spec.world)]
    dist.all_gather(parts, local.detach().contiguous(), group=spec.group)
    n, d_b = local.shape[0], spec.full_dim // (spec.blocks * spec.world)
    full = torch.stack(parts).view(spec.world, n, spec.blocks, d_b).permute(1, 2, 0, 3)  # (N, blocks, W, d_b)
    return full.reshape(n, spec.full_dim)


def _table_blocks(model: nn.Module) -> dict[int, int]:
    """id(table) -> column blocks the layers read it in (UltraMem with cores > 1: its cores; else 1)."""
    from memlm.model.memory.ultramem import UltraMem

    return {id(m.values): m.n_cores for m in model.memory_layers if isinstance(m, UltraMem) and m.n_cores > 1}


def check_shardable(model_cfg, world: int) -> None:
    """Refuse (ConfigError naming the setting) a memory config whose tables cannot be split over ``world`` ranks."""
    mem = model_cfg.memory
    if mem is None or mem.parallel == "none" or world <= 1:
        return
    widths = {"the value width (model.memory.v_dim, or model.dim)": model_cfg.value_dim}
    if mem.kind == "peer":
        widths = {"model.dim (PEER's expert width)": model_cfg.dim}
    if mem.kind == "ultramem_v2":
        widths["model.memory.pre_dim"] = mem.pre_dim
    blocks = mem.cores if mem.kind == "ultramem" else 1
    for what, d in widths.items():
        if d % (world * blocks):
            per = f"{world} ranks" + (f" x {blocks} cores (memory.cores)" if blocks > 1 else "")
            raise ConfigError(
                f"model.memory.parallel=dim: {what} = {d} is not divisible by {per}; pick a width that is a multiple "
                f"of {world * blocks}, or another number of devices"
            )


def shard_model(model: nn.Module, group=None) -> int:
    """Replace every value table of ``model`` (``model.value_tables()``) by this rank's column shard, in place.

    A no-op (returns 0) without an initialized process group or with one rank. Creates a dedicated memory-parallel
    group over all ranks unless ``group`` is given (its collectives never interleave with DDP's all-reduces). Returns
    the number of tables sharded. Every rank must call it (a collective when it creates the group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    tables = [t for t in model.value_tables() if shard_of(t.weight) is None]
    if not tables:
        return 0
    check_shardable(model.cfg, dist.get_world_size(group))
    group = group if group is not None else dist.new_group(list(range(dist.get_world_size())))
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = _table_blocks(model)
    for t in tables:
        full = t.weight
        spec = ShardSpec(group, rank, world, full.shape[1], blocks.get(id(t), 1))
        shard = nn.Parameter(local_columns(full.detach(), spec), requires_grad=full.requires_grad)
        shard.memory_shard = spec
        t.weight = shard  # the layers read ``table.weight`` at every forward: they now read the shard
    return len(tables)


def sharded_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every table shard in ``module`` (names as in its state dict)."""
    return [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if shard_of(p) is not None]


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A single-process copy of a sharded ``MemLM`` with the full tables (a collective; every rank gets one). The
    original is left as it is. Used for the export (``memlm.load_pretrained``'s format) and end-of-run probes."""
    state = model.state_dict()
    for name, p in sharded_parameters(model):
        state[name] = gather_full(p, shard_of(p))
    copy = type(model)(model.cfg)
    copy.load_state_dict(state)
    return copy.to(next(model.parameters()).device)


def _optimizer_slots(opt_state: dict, params: list[nn.Parameter]) -> list[tuple[int, nn.Parameter]]:
    return [(i, p) for i, p in enumerate(params) if shard_of(p) is not None and i in opt_state["state"]]


def unshard_checkpoint(module: nn.Module, checkpoint: dict, optimizers: list) -> None:
    """In a Lightning checkpoint being saved (``on_save_checkpoint``, every rank): the full tables and the full
    optimizer state of each table (moments gathered over the group), so the file is the one a single process writes.
    The live optimizer state is not modified."""
    for name, p in sharded_parameters(module):
        checkpoint["state_dict"][name] = gather_full(p, shard_of(p))
    for opt, saved in zip(optimizers, checkpoint.get("optimizer_states", [])):
        params = [p for g in opt.param_groups for p in g["params"]]  # torch numbers the state in this order
        for i, p in _optimizer_slots(saved, params):
            spec = shard_of(p)
            saved["state"][i] = {k: gather_full(v, spec) if torch.is_tensor(v) and v.shape == p.shape else v
                                 for k, v in saved["state"][i].items()}  # fmt: skip


def shard_checkpoint(module: nn.Module, checkpoint: dict, value_group: str = "memory_values") -> None:
    """The inverse, on a checkpoint being loaded (``on_load_checkpoint``, before the weights and the optimizer are
    restored): full tables and moments -> this rank's columns. The checkpoint may come from any world size."""
    for name, p in sharded_parameters(module):
        full = checkpoint["state_dict"].get(name)
        if full is not None and full.dim() == 2 and full.shape[1] == shard_of(p).full_dim:
            checkpoint["state_dict"][name] = local_columns(full, shard_of(p))
    shards = [p for p in module.parameters() if shard_of(p) is not None and p.requires_grad]  # the value group order
    for saved in checkpoint.get("optimizer_states", []):
        for g in saved.get("param_groups", []):
            if g.get("name") != value_group or len(g["params"]) != len(shards):
                continue
            for pid, p in zip(g["params"], shards):
                spec, st = shard_of(p), saved["state"].get(pid)
                if st is None:
                    continue
                full_shape = (p.shape[0], spec.full_dim)
                saved["state"][pid] = {k: local_columns(v, spec) if torch.is_tensor(v) and tuple(v.shape) == full_shape
                                       else v for k, v in st.items()}  # fmt: skip


def group_sum_of_squares(sq: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """All-reduce (sum) a squared gradient norm over the memory-parallel group of ``params`` (the first shard's)."""
    spec = next(shard_of(p) for p in params if shard_of(p) is not None)
    dist.all_reduce(sq, group=spec.group)
    return sq


# ---------------------------------------------------------------------------------------------- accounting
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def table_bytes_per_rank(rows: int, dim: int, dtype: str | torch.dtype, world: int,
                         optimizer: str = "row_sparse_adam") -> dict[str, int]:  # fmt: skip
    """Bytes one rank holds for a (rows, dim) table sharded dimension-wise over ``world`` ranks.

    ``params``: rows x dim / world x dtype; ``optimizer``: Adam's two moments, fp32 with ``row_sparse_adam``
    (:class:`RowSparseAdam` keeps fp32 moments for any table dtype) or in the table's dtype with ``adamw`` (torch);
    ``grad``: a dense gradient shard (``adamw``; a row-sparse gradient holds only the touched rows, counted 0 here).
    The test of this module checks ``params`` and ``optimizer`` against the real shard and optimizer state.
    """
    b = dtype.itemsize if isinstance(dtype, torch.dtype) else _DTYPE_BYTES[dtype]
    if dim % world:
        raise ValueError(f"table width {dim} is not divisible by {world} ranks")
    elems = rows * (dim // world)
    moments = 2 * elems * (4 if optimizer == "row_sparse_adam" else b)
    grad = 0 if optimizer == "row_sparse_adam" else elems * b
    return {"params": elems * b, "optimizer": moments, "grad": grad, "total": elems * b + moments + grad}


def comm_bytes_per_step(tokens: int, reads: int, dim: int, world: int, mode: str = "dim", rows: int | None = None,
                        act_bytes: int = 2, index_bytes: int = 8, weight_bytes: int = 2) -> int:  # fmt: skip
    """Bytes one rank SENDS per lookup per step (forward + backward), ``tokens`` tokens per rank, ``reads`` slots
    per token (heads x knn), a (rows, ``dim``) table over ``world`` ranks.

    ``dim`` (implemented): all-gather of indices + weights (each rank sends its own to W-1 ranks), the output
    all-to-all (its (W-1)/W share of (W T, D/W)), the gradient all-to-all (same size) and the weights' gradient
    reduce-scatter ((W-1) T x reads). ``row`` (UltraMem's row-wise partition, not implemented here): indices +
    weights all-to-all to the rows' owners ((W-1)/W of T x reads), then every shard a token touches returns a full
    partial vector (expected shards touched per token ``W (1 - (1 - 1/W)^reads)`` under uniform access), the same
    again for the output gradient; the weights' gradient comes back with the indices.
    """
    w, t, k, d = world, tokens, reads, dim
    if w == 1:
        return 0
    if mode == "dim":
        idx = (w - 1) * t * k * (index_bytes + weight_bytes)  # all-gather: my (T, K) to W-1 ranks
        out = (w - 1) * t * (d // w) * act_bytes  # all-to-all: my columns of the other ranks' tokens
        return idx + 2 * out + (w - 1) * t * k * weight_bytes  # + grad_out all-to-all + weight-grad reduce-scatter
    if mode == "row":
        idx = (w - 1) / w * t * k * (index_bytes + weight_bytes)
        touched = w * (1 - (1 - 1 / w) ** k)  # shards a token's reads land on
        remote = touched * (w - 1) / w  # ... of which are not the token's own rank
        vec = remote * t * d * act_bytes  # partial vectors back (forward) and gradients out (backward)
        return int(idx + 2 * vec + (w - 1) / w * t * k * weight_bytes)
    raise ValueError(f"mode must be 'dim' or 'row', got {mode!r}")


def fits_table(rows: int, dim: int, dtype: str, worlds=(1, 8, 64), tokens: int = 8192, reads: int = 128) -> list[dict]:
    """Rows of the docs table: per-rank bytes and per-step traffic for each world size (``docs/scale_out.md``)."""
    out = []
    for w in worlds:
        b = table_bytes_per_rank(rows, dim, dtype, w) if dim % w == 0 else None
        out.append({
            "world": w, "params": b and b["params"], "with_adam": b and b["total"],
            "dim_bytes": comm_bytes_per_step(tokens, reads, dim, w, "dim"),
            "row_bytes": comm_bytes_per_step(tokens, reads, dim, w, "row", rows),
        })  # fmt: skip
    return out


def human(n: float | None) -> str:
    """Bytes as a short string (binary units)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


__all__ = [
    "PARALLEL_MODES", "ShardSpec", "check_shardable", "comm_bytes_per_step", "fits_table", "gather_full", "human",
    "local_columns", "shard_checkpoint", "shard_model", "sharded_parameters", "sharded_row_dot",
    "sharded_value_lookup", "table_bytes_per_rank", "unshard_checkpoint", "unsharded_copy",
]  # fmt: skip
