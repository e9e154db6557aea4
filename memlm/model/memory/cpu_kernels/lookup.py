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
    def _lookup_backward_kernel(table, grad_out, k, perm, weights, starts, uniq, grad_rows, dots, want_rows,
                                want_dots, ahead):  # fmt: skip
        """Per touched row u (its occurrences o in [starts[u], starts[u + 1]), each the flat position p = perm[o] of
        bag p // k, weight weights[p]): grad_rows[u] = sum_o weights[p] grad_out[p // k] and dots[p] =
        <table[uniq[u]], grad_out[p // k]>, both from one read of each grad_out row. ``table`` is read only when
        ``want_dots``; its row ``ahead`` rows on is prefetched (0: none)."""
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
                p = perm[o]
                g = grad_out[p // k]
                w = weights[p]
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
                    dots[p] = dot

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
    perm, uniq, starts = _runs(indices)
    return uniq, perm // indices.shape[1], perm, starts


def _runs(indices: torch.Tensor, n_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions of the flat ``indices`` grouped by row, each row's in order (L,), sorted unique rows (U,), their
    segment starts in the positions (U + 1,)). ``n_rows``: the table's row count, when known."""
    # (a counting sort in numba was no faster than torch's sort here: its scattered writes miss the cache; an LSD
    # radix sort with 8-bit digits saved ~0.5 ms of a ~13 ms lookup backward, not worth its code)
    keys = indices.reshape(-1)
    if n_rows is not None and n_rows <= 2**31:  # int32 keys: the 65k reads of the tiny model sort in 1.5, not 2.2 ms
        keys = keys.to(torch.int32)
    rows, perm = torch.sort(keys, stable=True)  # (L,): each row's occurrences, in order
    uniq, counts = torch.unique_consecutive(rows, return_counts=True)  # (U,), (U,)
    starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return perm, uniq.to(indices.dtype), starts


def lookup_backward(table, indices, weights, grad_out, want_rows: bool, want_dots: bool):
    """Gradients of ``out[m] = sum_k w[m, k] table[idx[m, k]]`` given ``grad_out`` (M, D): (sorted unique rows (U,),
    their gradient rows (U, D) or None, the weights' gradient (M, K) or None). One pass per touched row.
    ``table`` (N, D) is only read for the weights' gradient (None is fine without it); the math runs in its dtype
    (else in grad_out's)."""
    m, k = indices.shape
    n_rows = None if table is None else table.shape[0]
    if table is None:
        table = grad_out[:1]  # never read: the kernel indexes the table only for the dots
    table = table.detach().contiguous()
    grad_out = grad_out.detach().to(table.dtype).contiguous()
    perm, uniq, starts = _runs(indices, n_rows)
    w = weights.detach().reshape(-1).to(table.dtype).contiguous()  # (L,) read through perm by the kernel
    d = grad_out.shape[1]
    grad_rows = grad_out.new_empty(uniq.numel() if want_rows else 1, d)
    grad_w = grad_out.new_empty(m * k if want_dots else 0)  # written through perm: every position once
    _threads()
    _lookup_backward_kernel(_np(table), _np(grad_out), k, _np(perm), _np(w), _np(starts), _np(uniq), _np(grad_rows),
                            _np(grad_w), want_rows, want_dots, PREFETCH_AHEAD)  # fmt: skip
    return uniq, (grad_rows if want_rows else None), (grad_w.view(m, k) if want_dots else None)


def row_dots(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M, K) ``<table[indices[m, k]], x[m]>`` for (N, D) table, (M, K) indices, (M, D) x."""
    table, indices = table.detach().contiguous(), indices.contiguous()
    x = x.detach().to(table.dtype).contiguous()
    out = x.new_empty(indices.shape)
    _threads()
    _row_dots_kernel(_np(table), _np(indices), _np(x), _np(out))
    return out
