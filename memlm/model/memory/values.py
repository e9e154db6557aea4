"""Value tables and the one weighted value-lookup function shared by every memory layer.

``value_lookup(table, indices, weights)`` computes ``out[m] = sum_k weights[m, k] * table[indices[m, k]]``
(an EmbeddingBag in "sum" mode with per-sample weights, as in PKM / Memory+). The reference path is
``F.embedding_bag``; on CUDA a fused Triton kernel is used when available (``memlm.model.memory.kernels``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.model.memory import cpu_kernels


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
    with ``indices[m, k] == u``. Sort the (row, bag) pairs by row and sum each row's segment with one embedding bag
    (on CPU: :func:`memlm.model.memory.cpu_kernels.lookup_backward`, one numba pass per touched row).
    """
    if cpu_kernels.available(grad_out, indices):  # one pass per touched row (numba)
        uniq, grad_rows, _ = cpu_kernels.lookup_backward(None, indices, weights, grad_out, True, False)
        return uniq, grad_rows
    uniq, bags, perm, starts = cpu_kernels.segments(indices)  # each row's occurrences, grouped and in order
    grad_rows = F.embedding_bag(
        bags, grad_out, starts[:-1], mode="sum", per_sample_weights=weights.reshape(-1)[perm].to(grad_out.dtype)
    )  # (U, D)
    return uniq, grad_rows


def shard_of(table: torch.Tensor):
    """The memory-parallel :class:`~memlm.model.memory.parallel.ShardSpec` of a table shard (or of a view of one,
    e.g. UltraMem's per-core view), or None for a whole table."""
    spec = getattr(table, "memory_shard", None)
    if spec is None and table._base is not None:
        spec = getattr(table._base, "memory_shard", None)
    return spec


# elements of the transient (tokens, K, D) row gather of the chunked row_dots fallback: cache-sized on CPU; on a GPU
# large enough that the chunk loop does not become a launch-bound loop of small kernels
_CHUNK_ELEMS = 2**22
_CHUNK_ELEMS_CUDA = 2**25  # 128 MB of fp32 rows per chunk


def row_dots(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M, K) ``<table[indices[m, k]], x[m]>`` for (N, D) ``table``, (M, K) ``indices``, (M, D) ``x``.

    The weights' gradient of a lookup (``x`` = the output gradient) and PEER's / UltraMemV2's row dots. For fp32 /
    fp64 on CPU this is one sampled dense-dense matmul (``torch.sparse.sampled_addmm``: ``x @ table.T`` at the
    (m, indices[m, k]) entries only), without the (M, K, D) gathered rows; ~2x faster on CPU than the weights'
    gradient of ``F.embedding_bag`` and multi-threaded. With numba on CPU:
    :func:`memlm.model.memory.cpu_kernels.row_dots`. Other dtypes / devices gather rows in chunks of tokens.
    """
    m, k = indices.shape
    x = x.to(table.dtype)
    if cpu_kernels.available(table, x, indices) and m * k:
        return cpu_kernels.row_dots(table, indices, x)
    if not table.is_cuda and table.dtype in (torch.float32, torch.float64) and m * k:
        cols, order = indices.sort(dim=1)  # (M, K): CSR's row-sorted column order (the CPU kernel computes each
        # entry on its own, so duplicate columns are fine, though torch's invariant check would call them invalid)
        crow = torch.arange(0, m * k + 1, k, device=indices.device)  # (M + 1,) every row holds K entries
        with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice, on every run otherwise
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), x.new_zeros(m * k), (m, table.shape[0]),
                                              check_invariants=False)  # fmt: skip
        vals = torch.sparse.sampled_addmm(pattern, x, table.t(), beta=0.0).values().view(m, k)  # sorted order
        return torch.empty_like(vals).scatter_(1, order, vals)
    out = x.new_empty(m, k)
    step = max(1, (_CHUNK_ELEMS_CUDA if table.is_cuda else _CHUNK_ELEMS) // max(1, k * table.shape[1]))
    for a in range(0, m, step):
        rows = F.embedding(indices[a : a + step], table)  # (chunk, K, D)
        out[a : a + step] = torch.einsum("mkd,md->mk", rows, x[a : a + step])
    return out


def table_grad(indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, shape, sparse: bool,
               scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """The (``shape``) table gradient of a weighted lookup from :func:`table_grad_rows`: a coalesced sparse COO tensor
    (``sparse``, sorted unique rows) or a dense one; optionally times ``scale``."""
    uniq, grad_rows = table_grad_rows(indices, weights, grad_out)  # (U,), (U, D)
    if scale is not None:
        grad_rows = grad_rows * scale
    return _rows_to_grad(uniq, grad_rows, shape, sparse)


def _rows_to_grad(uniq: torch.Tensor, grad_rows: torch.Tensor, shape, sparse: bool) -> torch.Tensor:
    """(sorted unique rows (U,), their gradient rows (U, D)) -> the (``shape``) table gradient, sparse or dense."""
    if sparse:
        return torch.sparse_coo_tensor(uniq.unsqueeze(0), grad_rows, shape, is_coalesced=True, check_invariants=False)
    return grad_rows.new_zeros(shape).index_copy_(0, uniq, grad_rows)


class _WeightedLookup(torch.autograd.Function):
    """out (M, D) = sum_k w[m, k] table[idx[m, k]], with a backward that computes each gradient the cheap way.

    Forward: ``F.embedding_bag`` on detached inputs (its forward-only kernel; nothing of it is kept). Backward: the
    table's gradient per touched row (:func:`table_grad_rows`: one more embedding bag over the rows' segments, no
    (M*K, D) intermediate, unlike ``F.embedding_bag``'s own backward) and the weights' gradient as row dots
    (:func:`row_dots`, a sampled matmul on CPU, instead of ``F.embedding_bag``'s single-threaded kernel). With numba
    on CPU both come from one pass per touched row (:func:`memlm.model.memory.cpu_kernels.lookup_backward`).
    """

    @staticmethod
    def forward(ctx, table, indices, weights, sparse: bool):  # noqa: D102
        ctx.save_for_backward(indices, weights)
        ctx.table, ctx.sparse = table, sparse  # a parameter, kept by reference (for the weights' gradient)
        return F.embedding_bag(indices, table.detach(), per_sample_weights=weights.detach(), mode="sum")  # (M, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        indices, weights = ctx.saved_tensors  # (M, K), (M, K) in the table's dtype
        table = ctx.table.detach()
        grad_table = grad_w = None
        want_table, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if cpu_kernels.available(table, grad_out, indices) and (want_table or want_w):  # both in one pass (numba)
            uniq, grad_rows, grad_w = cpu_kernels.lookup_backward(table, indices, weights, grad_out, want_table, want_w)
            if want_table:
                grad_table = _rows_to_grad(uniq, grad_rows, table.shape, ctx.sparse)
            return grad_table, None, grad_w, None
        if ctx.needs_input_grad[0]:
            grad_table = table_grad(indices, weights, grad_out, table.shape, ctx.sparse)
        if ctx.needs_input_grad[2]:
            grad_w = row_dots(table, indices, grad_out)  # (M, K)
        return grad_table, None, grad_w, None


class _TableGradOnly(torch.autograd.Function):
    """Identity on a lookup's output whose backward adds the table's gradient (:func:`table_grad`); the weights'
    gradient stays with ``F.embedding_bag`` (CUDA without Triton: its native kernel, not the chunked row dots)."""

    @staticmethod
    def forward(ctx, out, table, indices, weights, sparse: bool):  # noqa: D102
        ctx.save_for_backward(indices, weights)
        ctx.table_shape, ctx.sparse = table.shape, sparse
        return out.view_as(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        indices, weights = ctx.saved_tensors
        return grad_out, table_grad(indices, weights, grad_out, ctx.table_shape, ctx.sparse), None, None, None


def value_lookup_segmented(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """:func:`value_lookup_reference` with the gradients computed the cheap way (the PyTorch fast path). Same values
    and gradients as the reference. CPU: :class:`_WeightedLookup` (both gradients); CUDA: the table gradient per
    touched row, the weights' gradient from ``F.embedding_bag`` (:class:`_TableGradOnly`)."""
    lead, k = indices.shape[:-1], indices.shape[-1]
    flat_idx = indices.reshape(-1, k)  # (M, K)
    flat_w = weights.reshape(-1, k).to(table.dtype)  # (M, K)
    if not (torch.is_grad_enabled() and (table.requires_grad or flat_w.requires_grad)):
        out = F.embedding_bag(flat_idx, table, per_sample_weights=flat_w, mode="sum")  # (M, D)
    elif not table.is_cuda:
        out = _WeightedLookup.apply(table, flat_idx, flat_w, sparse)
    else:
        out = F.embedding_bag(flat_idx, table.detach(), per_sample_weights=flat_w, mode="sum")  # grad to weights
        if table.requires_grad:
            out = _TableGradOnly.apply(out, table, flat_idx, flat_w.detach(), sparse)
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
        lead, k = indices.shape[:-1], indices.shape[-1]
        if x.shape[:-1] != lead:
            raise ValueError(f"row_dot: x {tuple(x.shape)} must have the indices' leading shape {tuple(lead)} + (D,)")
        flat_idx, flat_x = indices.reshape(-1, k), x.reshape(-1, x.shape[-1])  # (M, K), (M, D)
        out = row_dots(table.detach(), flat_idx, flat_x).view(*lead, k)  # (..., K)
        ctx.save_for_backward(flat_idx, flat_x)
        ctx.table, ctx.sparse, ctx.x_shape = table, sparse, x.shape  # the table: a parameter, kept by reference
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat_idx, flat_x = ctx.saved_tensors
        table = ctx.table.detach()
        g = grad.reshape(flat_idx.shape).to(table.dtype)  # (M, K)
        grad_table = grad_x = None
        if ctx.needs_input_grad[2]:  # d out / d x = sum_k grad_k table[idx_k]: exactly the shared weighted lookup
            grad_x = value_lookup(table, flat_idx, g).to(flat_x.dtype).view(ctx.x_shape)  # (..., D)
        if ctx.needs_input_grad[0]:  # row idx_k gets grad_k x: a lookup's table gradient with x as the output grad
            grad_table = table_grad(flat_idx, g, flat_x.to(table.dtype), table.shape, ctx.sparse)
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
