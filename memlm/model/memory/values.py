"""Value tables and the one weighted value-lookup function shared by every memory layer.

``value_lookup(table, indices, weights)`` computes ``out[m] = sum_k weights[m, k] * table[indices[m, k]]``
(an EmbeddingBag in "sum" mode with per-sample weights, as in PKM / Memory+). The reference path is
``F.embedding_bag``; on CUDA a fused Triton kernel is used when available (``memlm.model.memory.kernels``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def value_lookup_reference(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """Reference weighted lookup with ``F.embedding_bag`` (any device).

    Args:
        table: (N, D) value rows.
        indices: (..., K) int64 row ids in [0, N).
        weights: (..., K) weights, any float dtype (cast to the table dtype, as embedding_bag requires).
        sparse: return a sparse gradient for ``table``.
    Returns:
        (..., D) in the table's dtype.
    """
    lead = indices.shape[:-1]
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k)  # (M, K)
    flat_w = weights.reshape(-1, k).to(table.dtype)  # (M, K)
    out = F.embedding_bag(flat_idx, table, per_sample_weights=flat_w, mode="sum", sparse=sparse)  # (M, D)
    return out.view(*lead, table.shape[-1])


def table_grad_rows(indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor):
    """The table gradient of a weighted lookup, per touched row: (sorted unique rows (U,), rows (U, D)).

    ``indices``, ``weights`` (M, K), ``grad_out`` (M, D): row u gets ``sum w[m, k] * grad_out[m]`` over the (m, k)
    with ``indices[m, k] == u``. Sort the (row, bag) pairs by row and sum each row's segment with one embedding bag.
    """
    k = indices.shape[1]
    rows, perm = torch.sort(indices.reshape(-1), stable=True)  # (L,): each row's occurrences, in order
    uniq, counts = torch.unique_consecutive(rows, return_counts=True)  # (U,), (U,)
    bags = perm // k  # (L,) the bag of each occurrence, grouped by row
    starts = torch.cumsum(counts, 0) - counts  # (U,) segment offsets
    grad_rows = F.embedding_bag(
        bags, grad_out, starts, mode="sum", per_sample_weights=weights.reshape(-1)[perm].to(grad_out.dtype)
    )  # (U, D)
    return uniq, grad_rows


def shard_of(table: torch.Tensor):
    """The memory-parallel :class:`~memlm.model.memory.parallel.ShardSpec` of a table shard (or of a view of one,
    e.g. UltraMem's per-core view), or None for a whole table."""
    spec = getattr(table, "memory_shard", None)
    if spec is None and table._base is not None:
        spec = getattr(table._base, "memory_shard", None)
    return spec


class _TableGradBySegments(torch.autograd.Function):
    """Identity on the lookup's output whose backward adds the table's gradient, computed per touched row.

    ``F.embedding_bag``'s own table backward (with per-sample weights) materializes an (M*K, D) tensor of weighted
    grad rows and then sorts or coalesces it. This computes the same rows as one more embedding bag instead: sort
    the (row, bag) pairs by row, and sum ``w * grad_out[bag]`` over each row's segment. The result is the U touched
    rows (U, D), with no (M*K, D) intermediate. The weights' gradient stays with ``F.embedding_bag``.
    """

    @staticmethod
    def forward(ctx, out, table, indices, weights, sparse: bool):  # noqa: D102
        ctx.save_for_backward(indices, weights)
        ctx.table_shape, ctx.sparse = table.shape, sparse
        return out.view_as(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        indices, weights = ctx.saved_tensors  # (M, K), (M, K) in the table's dtype
        uniq, grad_rows = table_grad_rows(indices, weights, grad_out)  # (U,), (U, D)
        if ctx.sparse:
            grad_table = torch.sparse_coo_tensor(
                uniq.unsqueeze(0), grad_rows, ctx.table_shape, is_coalesced=True, check_invariants=False
            )
        else:
            grad_table = grad_rows.new_zeros(ctx.table_shape).index_copy_(0, uniq, grad_rows)
        return grad_out, grad_table, None, None, None


def value_lookup_segmented(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """:func:`value_lookup_reference` with the table gradient computed per touched row (the PyTorch fast path).

    Same values and gradients as the reference; it avoids the reference's (M*K, D) backward intermediate.
    """
    lead, k = indices.shape[:-1], indices.shape[-1]
    flat_idx = indices.reshape(-1, k)  # (M, K)
    flat_w = weights.reshape(-1, k).to(table.dtype)  # (M, K)
    out = F.embedding_bag(flat_idx, table.detach(), per_sample_weights=flat_w, mode="sum")  # (M, D): grad to weights
    if table.requires_grad and torch.is_grad_enabled():
        out = _TableGradBySegments.apply(out, table, flat_idx, flat_w.detach(), sparse)
    return out.view(*lead, table.shape[-1])


def value_lookup(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False, impl: str = "auto"
) -> torch.Tensor:
    """Weighted sum of value rows; picks the fastest correct implementation for the device.

    ``impl``: "auto" (Triton on CUDA when installed, else :func:`value_lookup_segmented`), "torch" (that PyTorch
    path), "reference" (plain ``F.embedding_bag``) or "triton". A memory-parallel shard (``shard_of``) is read with
    :func:`memlm.model.memory.parallel.sharded_value_lookup` (collectives over its group).
    """
    spec = shard_of(table)
    if spec is not None:
        from memlm.model.memory.parallel import sharded_value_lookup

        return sharded_value_lookup(table, indices, weights, spec, sparse=sparse)
    if impl == "reference":
        return value_lookup_reference(table, indices, weights, sparse=sparse)
    if impl == "torch" or (impl == "auto" and not table.is_cuda):
        return value_lookup_segmented(table, indices, weights, sparse=sparse)
    from memlm.model.memory import kernels  # local import: Triton is optional

    if impl == "triton" or kernels.available(table):
        return kernels.triton_value_lookup(table, indices, weights, sparse=sparse)
    return value_lookup_segmented(table, indices, weights, sparse=sparse)


class _RowDot(torch.autograd.Function):
    """out[..., k] = <table[indices[..., k]], x>; saves only indices and x for backward (not the gathered rows)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        rows = F.embedding(indices, table)  # (..., K, D): transient, not saved
        out = torch.einsum("...kd,...d->...k", rows, x.to(rows.dtype))  # (..., K)
        ctx.save_for_backward(indices, x)
        ctx.table_shape, ctx.table_dtype, ctx.sparse = table.shape, table.dtype, sparse
        ctx.table = table  # parameter (not an activation): kept by reference for grad_x
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        indices, x = ctx.saved_tensors
        grad_table = grad_x = None
        if ctx.needs_input_grad[2]:
            # d out / d x = sum_k grad_k table[idx_k]: exactly the shared weighted lookup
            grad_x = value_lookup(ctx.table.detach(), indices, grad).to(x.dtype)  # (..., D)
        if ctx.needs_input_grad[0]:
            d = ctx.table_shape[-1]
            contrib = (grad.unsqueeze(-1) * x.unsqueeze(-2).to(grad.dtype)).reshape(-1, d)  # (M*K, D)
            flat = indices.reshape(-1)  # (M*K,)
            if ctx.sparse:
                grad_table = torch.sparse_coo_tensor(
                    flat.unsqueeze(0), contrib.to(ctx.table_dtype), ctx.table_shape, check_invariants=False
                ).coalesce()
            else:
                grad_table = torch.zeros(ctx.table_shape, dtype=ctx.table_dtype, device=contrib.device)
                grad_table.index_add_(0, flat, contrib.to(ctx.table_dtype))
        return grad_table, None, grad_x, None


def row_dot(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """Dot products of selected table rows with a per-position vector (PEER's input experts, UltraMemV2 pre-values).

    Args:
        table: (N, D) rows u_i.
        indices: (..., K) row ids.
        x: (..., D) one vector per position.
        sparse: return a sparse gradient for ``table``.
    Returns:
        (..., K) with ``out[..., k] = <table[indices[..., k]], x>``. The (..., K, D) gathered rows exist only
        transiently: backward recomputes nothing from them (grad of x is ``value_lookup(table, indices, grad)``,
        grad of the table a row scatter of ``grad * x``), so activation memory is O(K), not O(K * D), per position.
    A memory-parallel shard is read with :func:`memlm.model.memory.parallel.sharded_row_dot`.
    """
    spec = shard_of(table)
    if spec is not None:
        from memlm.model.memory.parallel import sharded_row_dot

        return sharded_row_dot(table, indices, x, spec, sparse=sparse)
    return _RowDot.apply(table, indices, x, sparse)


class ValueTable(nn.Module):
    """An (N, D) table of memory values; may be shared by several memory layers (Memory+ value pool)."""

    def __init__(self, n_slots: int, dim: int) -> None:
        super().__init__()
        self.n_slots, self.dim = n_slots, dim
        self.weight = nn.Parameter(torch.empty(n_slots, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PKM: values ~ N(0, v_dim^-0.5)
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(self.dim))

    def forward(self, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        return value_lookup(self.weight, indices, weights, sparse=sparse)

    def extra_repr(self) -> str:
        return f"n_slots={self.n_slots}, dim={self.dim}"
