"""Triton kernels for the weighted value lookup of memory layers (PKM / Memory+ EmbeddingBag, "sum" mode).

Forward: ``out[m] = sum_k w[m, k] * table[idx[m, k]]``, one program per (bag, column tile), fp32 accumulation.

Backward (never materializes an (M, K, D) intermediate), deterministic: the flat indices are stably sorted by row;
one program per table row (dense gradient, no memset: untouched rows get zeros) or per touched row (row-sparse
gradient: unique rows + their gradient rows) sums ``w * grad_out[bag]`` over the row's occurrences in sorted order,
and in the same pass computes ``grad_w[m, k] = <grad_out[m], table[idx[m, k]]>``, reading each touched table row
once. Rows read more than ``CONFIG["bwd_cap"]`` times are split into chunks (fp32 partial rows, then summed in a
fixed order), so one hot slot does not serialize the backward (costs one host sync per backward).
``CONFIG["bwd_kernel"] = "ranges"`` swaps the per-row pass for the experimental range pass of :mod:`.lookup_ranges`
(several rows per program, their occurrences loaded together, segmented scan).
``mode="atomic"`` (``deterministic=False``) is the alternative dense backward with fp32 atomics into an (N, D)
buffer: order-dependent and, on H100, 2-3x slower than the sorted path; kept as a measured baseline.

Dtypes: the table may be fp32 or bf16 (or fp16); the output and the table gradient have the table's dtype (as with
``F.embedding_bag``; under autocast the output is NOT cast to the autocast dtype - the next op does that); weights
stay in their own dtype (no rounding to bf16 as the reference does) and their gradient has the weights' dtype.
Any D (column masks) and any K (loop over K tiles). Indices must lie in [0, N): they are not range-checked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_kernel(
    table_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    stride_t,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAB_EVICT: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        kmask = ks < K
        rows = tl.load(idx_ptr + bag * K + ks, mask=kmask, other=0).to(tl.int64)  # (BLOCK_K,)
        wk = tl.load(w_ptr + bag * K + ks, mask=kmask, other=0.0).to(tl.float32)  # (BLOCK_K,)
        vals = tl.load(
            table_ptr + rows[:, None] * stride_t + cols[None, :],
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
            eviction_policy=TAB_EVICT,
        )  # (BLOCK_K, BLOCK_D) gathered rows
        acc += tl.sum(vals.to(tl.float32) * wk[:, None], axis=0)
    tl.store(out_ptr + bag * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_rows_kernel(
    table_ptr, gout_ptr, w_ptr, perm_ptr, seg_row_ptr, seg_start_ptr, seg_end_ptr, out_ptr, gw_ptr,
    K, D, L, stride_t, CAP,
    ROW_IS_SEG: tl.constexpr, NEED_GT: tl.constexpr, NEED_GW: tl.constexpr, EAGER_ROW: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, TAB_EVICT: tl.constexpr,
):  # fmt: skip
    """One program per segment (a table row, or a chunk of a heavy row's occurrences) and column tile.

    Sums ``w * grad_out[bag]`` over the sorted occurrences [start, end) in order into ``out[seg]`` and writes the
    partial weight gradients. Segments longer than CAP are skipped (the chunked pass handles them).
    """
    seg = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    cmask = cols < D
    if ROW_IS_SEG:
        row = seg
    else:
        row = tl.load(seg_row_ptr + seg).to(tl.int64)
    if EAGER_ROW and NEED_GW:  # issue the row read before the offsets are known (may read an untouched row)
        trow = tl.load(table_ptr + row * stride_t + cols, mask=cmask, other=0.0, eviction_policy=TAB_EVICT).to(
            tl.float32
        )  # (BLOCK_D,)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    if end - start <= CAP:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        if end > start:
            if not EAGER_ROW and NEED_GW:
                trow = tl.load(table_ptr + row * stride_t + cols, mask=cmask, other=0.0, eviction_policy=TAB_EVICT).to(
                    tl.float32
                )  # (BLOCK_D,)
            for j0 in range(start, end, BLOCK_J):
                js = j0 + tl.arange(0, BLOCK_J)  # (BLOCK_J,) positions in the sorted order
                jmask = js < end
                pos = tl.load(perm_ptr + js, mask=jmask, other=0)  # (BLOCK_J,) flat bag*K + k
                bag = pos // K
                g = tl.load(
                    gout_ptr + bag[:, None] * D + cols[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0
                ).to(tl.float32)  # (BLOCK_J, BLOCK_D) grad_out of the bags that read this row
                if NEED_GT:
                    wj = tl.load(w_ptr + pos, mask=jmask, other=0.0).to(tl.float32)  # (BLOCK_J,)
                    acc += tl.sum(g * wj[:, None], axis=0)
                if NEED_GW:
                    gw = tl.sum(g * trow[None, :], axis=1)  # (BLOCK_J,) partial dot over this column tile
                    tl.store(gw_ptr + pd.to(tl.int64) * L + pos, gw, mask=jmask)
        if NEED_GT:
            tl.store(out_ptr + seg * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask, eviction_policy=TAB_EVICT)


@triton.jit
def _sum_chunks_kernel(part_ptr, off_ptr, dst_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[dst[h]] = sum of the fp32 chunk partials part[off[h]:off[h+1]] in order (heavy rows)."""
    h = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    cmask = cols < D
    a = tl.load(off_ptr + h)
    b = tl.load(off_ptr + h + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q in range(a, b):
        acc += tl.load(part_ptr + q * D + cols, mask=cmask, other=0.0)
    dst = tl.load(dst_ptr + h).to(tl.int64)
    tl.store(out_ptr + dst * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_bags_kernel(
    table_ptr,
    gout_ptr,
    idx_ptr,
    w_ptr,
    gbuf_ptr,
    gw_ptr,
    K,
    D,
    L,
    stride_t,
    NEED_GT: tl.constexpr,
    NEED_GW: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per bag and column tile: weight gradient by dot products; table gradient by fp32 atomics."""
    bag = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    cmask = cols < D
    g = tl.load(gout_ptr + bag * D + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        kmask = ks < K
        rows = tl.load(idx_ptr + bag * K + ks, mask=kmask, other=0).to(tl.int64)  # (BLOCK_K,)
        m2 = kmask[:, None] & cmask[None, :]
        if NEED_GW:
            vals = tl.load(table_ptr + rows[:, None] * stride_t + cols[None, :], mask=m2, other=0.0)  # (BLOCK_K, BD)
            gw = tl.sum(vals.to(tl.float32) * g[None, :], axis=1)  # (BLOCK_K,)
            tl.store(gw_ptr + pd.to(tl.int64) * L + bag * K + ks, gw, mask=kmask)
        if NEED_GT:
            wk = tl.load(w_ptr + bag * K + ks, mask=kmask, other=0.0).to(tl.float32)  # (BLOCK_K,)
            tl.atomic_add(
                gbuf_ptr + rows[:, None] * D + cols[None, :], wk[:, None] * g[None, :], mask=m2, sem="relaxed"
            )


# ----------------------------------------------------------------------------------------------------------------------
# launch configuration (fixed, no autotuning: the same inputs give the same bits in every process)


def _block_d(d: int, cap: int = 1024) -> int:
    return min(triton.next_power_of_2(d), cap)


# chosen by sweeps on H100s (bf16 and fp32 tables of 64k / 1M x 1024 rows, 16k bags x 128, uniform and skewed indices;
# eval/tune_kernels.py re-runs the backward sweep); tests may change entries (e.g. bwd_cap) with monkeypatch
CONFIG = dict(
    fwd_tile_bytes=16384,  # gathered bytes per K tile of a forward program
    fwd_warps=2,
    bwd_block_j=1,  # occurrences of a row handled per step of the segmented backward
    bwd_warps=1,  # one warp per (row, 512-column tile): the per-occurrence weight-gradient dot needs no barrier
    bwd_block_d=512,  # column tile of the backward (max); 2.9 vs 3.3 ms for 1024 columns x 4 warps (H100, 1M x 1024)
    bwd_eager_row=True,  # dense backward: read the table row before its offsets are known (hides one latency)
    bwd_cap=64,  # rows read more often than this go through the chunked pass
    chunk_block_j=8,  # occurrences per step in the chunked pass
    bwd_table_evict="evict_first",  # table rows read / gradient rows written once by the backward: stream them
    bwd_kernel="rows",  # table-gradient pass: "rows" (one program per row) or "ranges" (experimental, lookup_ranges)
    range_rows=8,  # "ranges": segments per program
    range_block_p=16,  # "ranges": occurrences loaded at once
    range_warps=4,
    table_evict="",  # L2 eviction hint for the forward's gathered rows ("" or "evict_first")
)


def _fwd_config(k: int, d: int, elem: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) for the forward."""
    bd = _block_d(d)
    bk = max(1, min(triton.next_power_of_2(k), (CONFIG["fwd_tile_bytes"] // elem) // bd))
    return bk, bd, CONFIG["fwd_warps"]


def _flat(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).contiguous()  # (M, K)
    w = weights.reshape(-1, k).contiguous()  # (M, K)
    return idx, w


def _table2d(table: torch.Tensor) -> torch.Tensor:
    if table.dim() != 2:
        raise ValueError(f"value table must be 2-D (N, D), got shape {tuple(table.shape)}")
    return table if table.stride(1) == 1 else table.contiguous()


def lookup_forward(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fused forward: (N, D), (..., K), (..., K) -> (..., D) in the table's dtype."""
    table = _table2d(table)
    n, d = table.shape
    lead, k = indices.shape[:-1], indices.shape[-1]
    idx, w = _flat(indices, weights)  # (M, K)
    m = idx.shape[0]
    out = torch.empty(m, d, device=table.device, dtype=table.dtype)  # (M, D)
    if m == 0:
        return out.view(*lead, d)
    if k == 0:
        return out.zero_().view(*lead, d)
    bk, bd, nw = _fwd_config(k, d, table.element_size())
    _fwd_kernel[(m, triton.cdiv(d, bd))](
        table,
        idx,
        w,
        out,
        k,
        d,
        table.stride(0),
        BLOCK_K=bk,
        BLOCK_D=bd,
        TAB_EVICT=CONFIG["table_evict"],
        num_warps=nw,
    )
    return out.view(*lead, d)


def _sort_rows(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flat indices: (sorted row ids (L,), positions perm (L,) into the flat (M*K,) order)."""
    flat = idx.reshape(-1)  # (L,)
    if n < 2**31:
        flat = flat.to(torch.int32)  # radix sort over half the bits
    return torch.sort(flat, stable=True)


def _heavy_rows(table, go, w, perm, seg_rows, seg_off, gtab, gw_part, k, big_l, dense, common) -> None:
    """Rows read more than CAP times: split their occurrences into chunks of CAP (one program each, fp32 partial
    rows), then sum each row's chunks in order. Keeps a hot row from serializing the backward. One host sync."""
    cap = CONFIG["bwd_cap"]
    counts = seg_off[1:] - seg_off[:-1]  # (S,)
    heavy = torch.nonzero(counts > cap).squeeze(1)  # (H,) segment ids (host sync)
    if heavy.numel() == 0:
        return
    d = table.shape[1]
    n_ch = (counts[heavy] + cap - 1) // cap  # (H,) chunks per heavy segment
    ch_off = torch.zeros(heavy.numel() + 1, device=go.device, dtype=torch.long)  # (H+1,)
    torch.cumsum(n_ch, 0, out=ch_off[1:])
    n_q = int(ch_off[-1])
    owner = torch.repeat_interleave(torch.arange(heavy.numel(), device=go.device), n_ch, output_size=n_q)  # (Q,)
    q_start = seg_off[heavy][owner] + (torch.arange(n_q, device=go.device) - ch_off[owner]) * cap  # (Q,)
    q_end = torch.minimum(q_start + cap, seg_off[heavy + 1][owner])  # (Q,)
    q_row = heavy[owner] if dense else seg_rows[heavy][owner].long()  # (Q,) table row of each chunk
    part = torch.empty(n_q, d, device=go.device, dtype=torch.float32)  # (Q, D) fp32 partial sums
    n_dt = triton.cdiv(d, common["BLOCK_D"])
    _bwd_rows_kernel[(n_q, n_dt)](
        table, go, w, perm, q_row, q_start, q_end, part, gw_part, k, d, big_l, table.stride(0), cap,
        ROW_IS_SEG=False, EAGER_ROW=False, BLOCK_J=CONFIG["chunk_block_j"], **common,
    )  # fmt: skip
    _sum_chunks_kernel[(heavy.numel(), n_dt)](part, ch_off, heavy, gtab, d, BLOCK_D=common["BLOCK_D"])


def lookup_backward(
    table: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    mode: str = "dense",
    need_table: bool = True,
    need_weights: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the lookup.

    Args:
        table, indices, weights: the forward inputs ((N, D), (..., K), (..., K)).
        grad_out: (..., D) gradient of the output.
        mode: "dense" (sorted, deterministic, (N, D) gradient), "sparse" (sorted, deterministic, touched rows only)
            or "atomic" ((N, D) gradient via fp32 atomics; not deterministic).
    Returns:
        (rows, grad_table, grad_weights): ``rows`` is None for dense modes, else the sorted unique touched rows (U,)
        int64 with ``grad_table`` (U, D); dense modes give ``grad_table`` (N, D). ``grad_weights`` (..., K) in the
        weights' dtype. Entries not asked for are None.
    """
    if mode not in ("dense", "sparse", "atomic"):
        raise ValueError(f"mode must be 'dense', 'sparse' or 'atomic', got {mode!r}")
    table = _table2d(table)
    n, d = table.shape
    k = indices.shape[-1]
    idx, w = _flat(indices, weights)  # (M, K)
    m = idx.shape[0]
    big_l = m * k
    go = grad_out.reshape(m, d).contiguous()  # (M, D)
    dev = table.device
    bd = _block_d(d, CONFIG["bwd_block_d"])  # column tile: the weight-gradient dots reduce within it
    n_dt = triton.cdiv(d, bd)
    gw_part = torch.empty(n_dt if need_weights else 0, big_l, device=dev, dtype=torch.float32)  # (n_dt, L)
    rows = gtab = gw = None
    if big_l == 0:  # nothing was read: zero gradients
        if need_table:
            gtab = torch.zeros(0 if mode == "sparse" else n, d, device=dev, dtype=table.dtype)
            rows = torch.empty(0, device=dev, dtype=torch.long) if mode == "sparse" else None
        if need_weights:
            gw = torch.zeros_like(weights)
        return rows, gtab, gw
    if mode == "atomic" or not need_table:
        gbuf = gw_part  # placeholder pointer when the table gradient is not needed
        if need_table:
            gbuf = torch.zeros(n, d, device=dev, dtype=torch.float32)  # (N, D) fp32 accumulation buffer
        bk = max(1, min(triton.next_power_of_2(k), 4096 // bd))
        _bwd_bags_kernel[(m, n_dt)](
            table,
            go,
            idx,
            w,
            gbuf,
            gw_part,
            k,
            d,
            big_l,
            table.stride(0),
            NEED_GT=need_table,
            NEED_GW=need_weights,
            BLOCK_K=bk,
            BLOCK_D=bd,
            num_warps=4,
        )
        if need_table:
            gtab = gbuf if table.dtype == torch.float32 else gbuf.to(table.dtype)
    else:
        sorted_rows, perm = _sort_rows(idx, n)  # (L,), (L,)
        if mode == "dense":
            seg_rows = sorted_rows  # unused: segment s is table row s
            # offsets[r] = first sorted position with row >= r; untouched rows get empty segments (zero gradient)
            seg_off = torch.searchsorted(sorted_rows, torch.arange(n + 1, device=dev, dtype=sorted_rows.dtype))
            pos_seg = sorted_rows  # (L,) segment of each sorted position
        else:
            seg_rows, pos_seg, counts = torch.unique_consecutive(sorted_rows, return_inverse=True, return_counts=True)
            seg_off = torch.zeros(seg_rows.numel() + 1, device=dev, dtype=torch.long)  # (U+1,)
            torch.cumsum(counts, 0, out=seg_off[1:])
            rows = seg_rows.long()
        n_seg = seg_off.numel() - 1
        gtab = torch.empty(n_seg, d, device=dev, dtype=table.dtype)  # (N or U, D)
        cap = CONFIG["bwd_cap"]
        common = dict(
            NEED_GT=True,
            NEED_GW=need_weights,
            BLOCK_D=bd,
            TAB_EVICT=CONFIG["bwd_table_evict"],
            num_warps=CONFIG["bwd_warps"],
        )
        if CONFIG["bwd_kernel"] == "ranges":
            from memlm.model.memory.kernels import lookup_ranges

            lookup_ranges.table_grad_ranges(
                table, go, w, perm, pos_seg, seg_rows, seg_off, gtab, gw_part, k, big_l, mode == "dense",
                need_weights, bd, CONFIG,
            )  # fmt: skip
        else:
            _bwd_rows_kernel[(n_seg, n_dt)](
                table, go, w, perm, seg_rows, seg_off[:-1], seg_off[1:], gtab, gw_part, k, d, big_l, table.stride(0),
                cap, ROW_IS_SEG=mode == "dense", EAGER_ROW=mode == "dense" and CONFIG["bwd_eager_row"],
                BLOCK_J=CONFIG["bwd_block_j"], **common,
            )  # fmt: skip
        _heavy_rows(table, go, w, perm, seg_rows, seg_off, gtab, gw_part, k, big_l, mode == "dense", common)
    if need_weights:
        gw_flat = gw_part[0] if n_dt == 1 else gw_part.sum(0)  # (L,) fixed-order sum over column tiles
        gw = gw_flat.to(weights.dtype).view(weights.shape)
    return rows, gtab, gw


class ValueLookupFunction(torch.autograd.Function):
    """Autograd wrapper: forward with :func:`lookup_forward`, backward with :func:`lookup_backward`.

    ``sparse=True`` returns the table gradient as a coalesced sparse COO tensor (unique sorted rows), like
    ``F.embedding_bag(..., sparse=True)``; ``deterministic=False`` uses the atomic dense backward (slower).
    """

    @staticmethod
    def forward(ctx, table, indices, weights, sparse: bool, deterministic: bool):  # noqa: D102
        ctx.save_for_backward(table, indices, weights)
        ctx.sparse, ctx.deterministic = sparse, deterministic
        return lookup_forward(table, indices, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        table, indices, weights = ctx.saved_tensors
        need_t, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_t or need_w):
            return None, None, None, None, None
        mode = "sparse" if ctx.sparse else ("dense" if ctx.deterministic else "atomic")
        rows, gtab, gw = lookup_backward(
            table, indices, weights, grad_out, mode=mode, need_table=need_t, need_weights=need_w
        )
        if need_t and ctx.sparse:
            gtab = torch.sparse_coo_tensor(
                rows[None], gtab, table.shape, is_coalesced=True, check_invariants=False
            )  # (N, D) sparse, U rows
        return (gtab if need_t else None), None, gw, None, None


def value_lookup(
    table: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse: bool = False,
    deterministic: bool = True,
) -> torch.Tensor:
    """Differentiable fused lookup: (N, D), (..., K) int, (..., K) float -> (..., D) in the table's dtype."""
    if indices.shape != weights.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have the same shape")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    return ValueLookupFunction.apply(table, indices, weights, sparse, deterministic)
