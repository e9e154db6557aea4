"""The weighted value lookup's backward on CPU (both gradients from one pass per touched row), and row dots."""

from __future__ import annotations

import torch

from memlm.model.memory.cpu_kernels._base import PREFETCH_AHEAD, _np, _threads, numba

if numba is not None:
    import numpy as np
    from numba import njit, prange

    from memlm.model.memory.cpu_kernels._base import prefetch_row

    # dots: reassociation lets LLVM vectorize the reduction (the sum's order differs from a sequential one by rounding)
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _lookup_backward_kernel(
        table, grad_out, bags, occ_w, starts, uniq, grad_rows, occ_dots, want_rows, want_dots, ahead
    ):
        """Per touched row u (its occurrences o in [starts[u], starts[u + 1]), bag bags[o], weight occ_w[o]):
        grad_rows[u] = sum_o occ_w[o] grad_out[bags[o]] and occ_dots[o] = <table[uniq[u]], grad_out[bags[o]]>,
        both from one read of each grad_out row. ``table`` is read only when ``want_dots``; its row ``ahead`` rows
        on is prefetched (0: none)."""
        d = grad_out.shape[1]
        zero = np.zeros(1, grad_out.dtype)[0]  # accumulate in the table's dtype
        u_count = uniq.shape[0]
        for u in prange(u_count):
            if want_dots and ahead > 0 and u + ahead < u_count:
                prefetch_row(table, uniq[u + ahead])
            out = grad_rows[u] if want_rows else grad_rows[0]  # (a placeholder row, never written)
            if want_rows:
                for j in range(d):
                    out[j] = zero
            value = table[uniq[u]] if want_dots else table[0]  # (never read)
            for o in range(starts[u], starts[u + 1]):
                g = grad_out[bags[o]]
                w = occ_w[o]
                dot = zero
                if want_rows and want_dots:
                    for j in range(d):
                        gj = g[j]
                        dot += value[j] * gj
                        out[j] += w * gj
                elif want_dots:
                    for j in range(d):
                        dot += value[j] * g[j]
                else:
                    for j in range(d):
                        out[j] += w * g[j]
                if want_dots:
                    occ_dots[o] = dot

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _row_dots_kernel(table, idx, x, out):
        m_count, k = idx.shape
        d = x.shape[1]
        zero = np.zeros(1, x.dtype)[0]
        for m in prange(m_count):
            xm = x[m]
            for c in range(k):
                row = table[idx[m, c]]
                dot = zero
                for j in range(d):
                    dot += row[j] * xm[j]
                out[m, c] = dot


def segments(indices: torch.Tensor):
    """The occurrences of each touched row of (M, K) ``indices``: (sorted unique rows (U,), bag of each occurrence
    grouped by row (L,), their positions in the flat (M*K) indices (L,), segment starts (U + 1,)). Plain torch, any
    device (also the PyTorch path of ``values.table_grad_rows``)."""
    k = indices.shape[1]
    # (a counting sort in numba was no faster than torch's sort here: its scattered writes miss the cache)
    rows, perm = torch.sort(indices.reshape(-1), stable=True)  # (L,): each row's occurrences, in order
    uniq, counts = torch.unique_consecutive(rows, return_counts=True)  # (U,), (U,)
    starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return uniq, perm // k, perm, starts


def lookup_backward(table, indices, weights, grad_out, want_rows: bool, want_dots: bool):
    """Gradients of ``out[m] = sum_k w[m, k] table[idx[m, k]]`` given ``grad_out`` (M, D): (sorted unique rows (U,),
    their gradient rows (U, D) or None, the weights' gradient (M, K) or None). One pass per touched row.
    ``table`` (N, D) is only read for the weights' gradient (None is fine without it); the math runs in its dtype
    (else in grad_out's)."""
    m, k = indices.shape
    if table is None:
        table = grad_out[:1]  # never read: the kernel indexes the table only for the dots
    table = table.detach().contiguous()
    grad_out = grad_out.detach().to(table.dtype).contiguous()
    uniq, bags, perm, starts = segments(indices)
    occ_w = weights.reshape(-1)[perm].to(table.dtype).contiguous()  # (L,) the weight of each occurrence
    d = grad_out.shape[1]
    grad_rows = grad_out.new_empty(uniq.numel() if want_rows else 1, d)
    occ_dots = grad_out.new_empty(perm.numel() if want_dots else 0)
    _threads()
    _lookup_backward_kernel(_np(table), _np(grad_out), _np(bags), _np(occ_w), _np(starts), _np(uniq), _np(grad_rows),
                            _np(occ_dots), want_rows, want_dots, PREFETCH_AHEAD)  # fmt: skip
    grad_w = None
    if want_dots:
        grad_w = grad_out.new_empty(m * k).index_copy_(0, perm, occ_dots).view(m, k)
    return uniq, (grad_rows if want_rows else None), grad_w


def row_dots(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M, K) ``<table[indices[m, k]], x[m]>`` for (N, D) table, (M, K) indices, (M, D) x."""
    table, indices = table.detach().contiguous(), indices.contiguous()
    x = x.detach().to(table.dtype).contiguous()
    out = x.new_empty(indices.shape)
    _threads()
    _row_dots_kernel(_np(table), _np(indices), _np(x), _np(out))
    return out
