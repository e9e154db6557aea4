"""The product-key search on CPU: the exact top-k of the pair sums (forward) and the selected scores' gradients."""

from __future__ import annotations

import functools
import math
import statistics

import torch

from memlm.model.memory.cpu_kernels._base import _np, _threads, numba

# candidates up to which a half's top-k ranks them branch-free (O(c^2) compares) instead of insertion-sorting them;
# up to RANK_FIXED of them in a fixed-width block (k + 4 pass on average at the tight threshold)
RANK_MAX = 64
RANK_FIXED = 16

if numba is not None:
    import numpy as np
    from numba import njit, prange

    from memlm.model.memory.cpu_kernels._base import MASK_WIDTH, above_mask, lowest_bit

    @njit(inline="always")
    def _insert(vals, ids, p, x, i):
        """Put score x (id i) into the descending list vals[: p + 1], whose slot p is free: entries below x move
        down one."""
        while p > 0 and vals[p - 1] < x:
            vals[p] = vals[p - 1]
            ids[p] = ids[p - 1]
            p -= 1
        vals[p] = x
        ids[p] = i

    @njit(inline="always")
    def _compact(row, thr, buf_v, buf_i):
        """buf_v, buf_i <- the scores of ``row`` above ``thr`` and their ids, in id order; returns their count. 64
        scores per vector compare (:func:`above_mask`), then one store per set bit; the tail scalar, branch-free."""
        n = row.shape[0]
        c = 0
        full = n - n % MASK_WIDTH
        for b in range(0, full, MASK_WIDTH):
            bits = above_mask(row, b, thr)
            while bits:
                j = b + lowest_bit(bits)
                bits &= bits - np.uint64(1)
                buf_v[c] = row[j]
                buf_i[c] = j
                c += 1
        for j in range(full, n):
            x = row[j]
            buf_v[c] = x
            buf_i[c] = j
            c += x > thr
        return c

    @njit(inline="always")
    def _rank_select(c, k, buf_v, buf_i, vals, ids, rank):
        """vals, ids[: k] <- the top-k of the c (>= k, none NaN) candidates, descending, branch-free: a candidate's
        rank is the number of candidates above it (ties: the earlier, lower id, first), and it is written to slot
        rank, or to the spare slot k when rank >= k. O(c^2) compares, which vectorize."""
        for i in range(c):
            rank[i] = 0
        for j in range(c):
            xj = buf_v[j]
            for i in range(c):
                xi = buf_v[i]
                rank[i] += (xj > xi) | ((xj == xi) & (j < i))
        for i in range(c):
            r = rank[i]
            d = r if r < k else k
            vals[d] = buf_v[i]
            ids[d] = buf_i[i]

    @njit(inline="always")
    def _rank_select_fixed(c, k, buf_v, buf_i, vals, ids, rank):
        """:func:`_rank_select` for c <= RANK_FIXED candidates, over a fixed RANK_FIXED-wide block: the slots from c
        on are padded with -inf (they rank below every candidate, which passed x > thr > -inf, so they are never
        written), and the constant trip counts let LLVM unroll the compares into vector code (a half's whole top-k at
        k = 8, ~12 candidates: 3.74 against 4.97 ms per 2048 tokens x 4 heads x 2 halves, 1 thread)."""
        pad = -np.inf
        for i in range(c, RANK_FIXED):
            buf_v[i] = pad
        for i in range(RANK_FIXED):
            xi = buf_v[i]
            r = 0
            for j in range(RANK_FIXED):
                xj = buf_v[j]
                r += (xj > xi) | ((xj == xi) & (j < i))
            rank[i] = r
        for i in range(c):
            r = rank[i]
            d = r if r < k else k
            vals[d] = buf_v[i]
            ids[d] = buf_i[i]

    @njit(inline="always")
    def _insertion_select(c, k, buf_v, buf_i, vals, ids):
        """vals, ids[: k] <- the top-k of the c (>= k) candidates, descending, by insertion (any c, NaN included)."""
        for j in range(k):
            _insert(vals, ids, j, buf_v[j], buf_i[j])
        for j in range(k, c):
            if buf_v[j] > vals[k - 1]:
                _insert(vals, ids, k - 1, buf_v[j], buf_i[j])

    @njit(inline="always")
    def _row_topk(row, k, z_tight, z_loose, vals, ids, buf_v, buf_i, rank):
        """vals, ids[: k] (of k + 1: slot k is scratch) <- the top-k of ``row`` (n,), descending. Exact for any
        data. A threshold mean + z std from the row's mean and std lets a few more than k of a Gaussian row's scores
        through (``z_tight``: ~k + 4); when fewer than k pass, a lower one (``z_loose``: ~1.5 k + 8), then every
        score. Up to RANK_MAX candidates are ranked branch-free, more are insertion-sorted. (A NaN or inf in the
        row makes the threshold NaN, so no score passes and the whole row is insertion-sorted, as before.)"""
        n = row.shape[0]
        total = row[0] - row[0]  # zero in the scores' dtype (a float64 sum of float32 scores does not vectorize)
        sq = total
        for j in range(n):
            x = row[j]
            total += x
            sq += x * x
        mean = total / n
        var = sq / n - mean * mean
        sd = math.sqrt(var if var > 0 else var - var)
        c = _compact(row, mean + z_tight * sd, buf_v, buf_i)
        if c < k:
            c = _compact(row, mean + z_loose * sd, buf_v, buf_i)
        if c < k:  # too few passed (a non-Gaussian row): every score is a candidate
            for j in range(n):
                buf_v[j] = row[j]
                buf_i[j] = j
            _insertion_select(n, k, buf_v, buf_i, vals, ids)
        elif c <= RANK_FIXED:  # candidates passed x > thr, so none is NaN and the ranks are a permutation
            _rank_select_fixed(c, k, buf_v, buf_i, vals, ids, rank)
        elif c <= RANK_MAX:
            _rank_select(c, k, buf_v, buf_i, vals, ids, rank)
        else:
            _insertion_select(c, k, buf_v, buf_i, vals, ids)

    @njit(inline="always")
    def _sift_down(hv, ha, hb, size):
        i = 0
        x, xa, xb = hv[0], ha[0], hb[0]
        while True:
            c = 2 * i + 1
            if c >= size:
                break
            if c + 1 < size and hv[c + 1] > hv[c]:
                c += 1
            if hv[c] <= x:
                break
            hv[i], ha[i], hb[i] = hv[c], ha[c], hb[c]
            i = c
        hv[i], ha[i], hb[i] = x, xa, xb

    @njit(inline="always")
    def _push(hv, ha, hb, size, x, a, b):
        i = size
        while i > 0:
            p = (i - 1) // 2
            if hv[p] >= x:
                break
            hv[i], ha[i], hb[i] = hv[p], ha[p], hb[p]
            i = p
        hv[i], ha[i], hb[i] = x, a, b

    @njit(inline="always")
    def _top_sums(v1, i1, v2, i2, knn, n, out_s, out_i, hv, ha, hb):
        """out_s, out_i (knn,) <- the top-knn of v1[a] + v2[b] over all rank pairs of two descending (knn,) lists,
        in order, as slot ids i1[a] * n + i2[b]: a max-heap frontier, popping (a, b) pushes (a, b + 1), and
        (a + 1, 0) when b = 0, so each pair enters once and the heap holds at most knn + 1 pairs."""
        hv[0], ha[0], hb[0] = v1[0] + v2[0], 0, 0
        size = 1
        for r in range(knn):
            a, b = ha[0], hb[0]
            out_s[r] = hv[0]
            out_i[r] = i1[a] * n + i2[b]
            if b + 1 < knn:  # replace the top by its successor in row a
                hv[0], ha[0], hb[0] = v1[a] + v2[b + 1], a, b + 1
            else:
                size -= 1
                hv[0], ha[0], hb[0] = hv[size], ha[size], hb[size]
            _sift_down(hv, ha, hb, size)
            if b == 0 and a + 1 < knn:
                _push(hv, ha, hb, size, v1[a + 1] + v2[0], a + 1, 0)
                size += 1

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _product_topk_kernel(s, knn, z_tight, z_loose, out_scores, out_ids):
        """s (H, 2, M, n) half scores -> out_scores, out_ids (M, H, knn): the top-knn slot scores and ids i * n + j.
        (fastmath only lets the mean / std sums vectorize; every comparison is on the exact scores.)

        Tasks are blocks of queries of one head, in head-major order, so each thread reads the heads' scores that
        the same thread's share of the (head-major, contiguously split) batched matmul just wrote into its cache:
        token-major tasks made both threads read the other core's half of every tile (the tiny 262k-slot model's search
        forward: 17.8 against 14.6 ms at 2 threads)."""
        h_count, _, m_count, n = s.shape
        block = 32  # queries per task; the scratch buffers are allocated once per task
        blocks = (m_count + block - 1) // block
        width = max(n, RANK_FIXED)  # _rank_select_fixed pads the candidates up to RANK_FIXED
        for task in prange(h_count * blocks):
            h, b = task // blocks, task % blocks
            v1, v2 = np.empty(knn + 1, s.dtype), np.empty(knn + 1, s.dtype)  # slot knn: _rank_select's spare
            i1, i2 = np.empty(knn + 1, np.int64), np.empty(knn + 1, np.int64)
            buf_v, buf_i, rank = np.empty(width, s.dtype), np.empty(width, np.int64), np.empty(width, np.int32)
            hv, ha, hb = np.empty(knn + 1, s.dtype), np.empty(knn + 1, np.int64), np.empty(knn + 1, np.int64)
            for m in range(b * block, min(m_count, (b + 1) * block)):
                _row_topk(s[h, 0, m], knn, z_tight, z_loose, v1, i1, buf_v, buf_i, rank)
                _row_topk(s[h, 1, m], knn, z_tight, z_loose, v2, i2, buf_v, buf_i, rank)
                _top_sums(v1, i1, v2, i2, knn, n, out_scores[m, h], out_ids[m, h], hv, ha, hb)

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _search_backward_kernel(q, keys, idx, g, grad_q, grad_k):
        """Gradients of the selected scores s[m, h, c] = <q[m, h, 0], K[h, 0, i]> + <q[m, h, 1], K[h, 1, j]> (slot
        idx = i * n + j) given g = d loss / d s: grad_q[m, h, side] = sum_c g K[h, side, sub_c] and grad_k[h, side,
        sub] = sum of g q[m, h, side] over the (m, c) that selected sub. One task per (head, side): it owns its slice
        of both outputs, so the sums need no sort and no atomics (and run in a fixed order). Per query the sub-key
        ids are decoded once, and the query gradient is summed in a task-local row: written into grad_q in the same
        loop as the sub-key rows, which LLVM cannot prove apart from it, it was reloaded and stored on every step
        (this took the kernel from ~3.5 to ~2 ms at the tiny model's shape, 2 threads; the sums run in the same
        order as before)."""
        m_count, h_count, _, half = q.shape
        n = keys.shape[2]
        knn = idx.shape[2]
        zero = np.zeros(1, q.dtype)[0]
        for task in prange(h_count * 2):
            h, side = task // 2, task % 2
            kk, gk = keys[h, side], grad_k[h, side]
            acc = np.empty(half, q.dtype)
            sub = np.empty(knn, np.int64)
            for r in range(n):
                for j in range(half):
                    gk[r, j] = zero
            for m in range(m_count):
                for c in range(knn):
                    slot = idx[m, h, c]
                    sub[c] = slot // n if side == 0 else slot % n
                for j in range(half):
                    acc[j] = zero
                for c in range(knn):
                    w, kr = g[m, h, c], kk[sub[c]]
                    for j in range(half):
                        acc[j] += w * kr[j]
                qs = q[m, h, side]
                for c in range(knn):
                    w, gr = g[m, h, c], gk[sub[c]]
                    for j in range(half):
                        gr[j] += w * qs[j]
                gq = grad_q[m, h, side]
                for j in range(half):
                    gq[j] = acc[j]


# query half widths up to which product_topk scores the queries in cache-sized chunks (one batched matmul per chunk
# into a reused tile, then the selection), instead of one matmul over the whole batch. At small inner widths the
# whole batch's score tensor (tens of MB of fresh pages) costs more than the dots, while a batched GEMM of plain
# contiguous (C, half) x (half, n_keys) matrices runs near the BLAS peak.
CHUNK_MAX_HALF = 32
TILE_BYTES = 2 << 20  # the chunk's (H, 2, C, n_keys) score tile: about this size, so it stays in cache


def _check_knn(knn: int, n: int) -> None:
    if not 1 <= knn <= n:
        raise ValueError(f"knn = {knn} must be in [1, {n}] (the sub-keys per half)")


def _z_passing(n: int, expected: float) -> float:
    """z with P(N(0, 1) > z) = expected / n: mean + z std lets ~``expected`` of a Gaussian row's n scores through
    (-inf: all of them, when that is most of the row anyway)."""
    frac = expected / n
    return -math.inf if frac >= 0.5 else statistics.NormalDist().inv_cdf(1 - frac)


@functools.cache
def _thresholds_z(n: int, knn: int) -> tuple[float, float]:
    """:func:`_row_topk`'s two thresholds: ~knn + 4 candidates of a Gaussian row (fewer than knn pass in ~10 % of
    rows at knn = 8), and ~1.5 knn + 8 for the retry."""
    return _z_passing(n, knn + 4), _z_passing(n, 1.5 * knn + 8)


def product_topk(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query halves (..., H, 2, half) x sub-keys (H, 2, n_keys, half) -> the exact top-``knn`` slot scores and ids
    (..., H, knn), scores descending (the same result as ``product_topk_halves`` of the dense scores, up to ties
    and the rounding of the score dot products).

    The dense scores are laid out (H, 2, M, n_keys), so each half's row is contiguous: one batched matmul for wide
    halves, and for ``half <= CHUNK_MAX_HALF`` one per chunk of queries into a cache-sized tile."""
    lead, h, half = q.shape[:-3], q.shape[-3], q.shape[-1]
    n = keys.shape[2]
    if half > CHUNK_MAX_HALF:
        qf = q.reshape(-1, h, 2, half).permute(1, 2, 0, 3)  # (H, 2, M, half)
        s = torch.matmul(qf, keys.transpose(-1, -2))  # (H, 2, M, n) contiguous
        scores, ids = topk_of_half_scores(s, knn)  # (M, H, knn)
        return scores.view(*lead, h, knn), ids.view(*lead, h, knn)
    _check_knn(knn, n)
    qd = q.detach()
    m = qd.numel() // (2 * h * half)
    # strided operands, no transposed copies (BLAS takes a row stride / a transposed matrix; 0.3-0.5 ms less per
    # tiny-model step, same scores bitwise): chunk rows of q3 are the (2H, C, half) matrices, one per (head, half)
    q3 = qd.reshape(m, 2 * h, half)  # (M, 2H, half)
    kt = keys.detach().to(qd.dtype).reshape(2 * h, n, half).transpose(1, 2)  # (2H, half, n)
    scores = qd.new_empty(m, h, knn)
    ids = torch.empty(m, h, knn, dtype=torch.int64)
    chunk = max(1, min(m, TILE_BYTES // (2 * h * n * qd.element_size())))
    tile = qd.new_empty(2 * h * chunk * n)
    z_tight, z_loose = _thresholds_z(n, knn)
    _threads()
    for m0 in range(0, m, chunk):
        c = min(chunk, m - m0)
        t = tile[: 2 * h * c * n].view(2 * h, c, n)
        torch.bmm(q3[m0 : m0 + c].transpose(0, 1), kt, out=t)
        _product_topk_kernel(_np(t.view(h, 2, c, n)), knn, z_tight, z_loose, _np(scores[m0 : m0 + c]),
                             _np(ids[m0 : m0 + c]))  # fmt: skip
    return scores.view(*lead, h, knn), ids.view(*lead, h, knn)


def topk_of_half_scores(s: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half scores (H, 2, M, n_keys) -> the top-``knn`` slot scores and ids (M, H, knn), scores descending."""
    h, _, m, n = s.shape
    _check_knn(knn, n)
    s = s.contiguous()
    scores = s.new_empty(m, h, knn)
    ids = torch.empty(m, h, knn, dtype=torch.int64)
    _threads()
    _product_topk_kernel(_np(s), knn, *_thresholds_z(n, knn), _np(scores), _np(ids))
    return scores, ids


def search_backward(q: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, grad_scores: torch.Tensor):
    """Backward of :func:`product_topk`'s scores: query halves (..., H, 2, half), sub-keys (H, 2, n_keys, half),
    slot ids and score gradients (..., H, knn) -> (grad of q, grad of keys), in the inputs' shapes and dtypes.
    Parallel over the 2H (head, half) pairs."""
    h, _, n, half = keys.shape
    knn = idx.shape[-1]
    dt = q.dtype
    q4 = q.detach().reshape(-1, h, 2, half).contiguous()
    k4 = keys.detach().to(dt).contiguous()
    i3 = idx.reshape(-1, h, knn).contiguous()
    g3 = grad_scores.detach().to(dt).reshape(-1, h, knn).contiguous()
    grad_q = torch.empty_like(q4)
    grad_k = torch.empty_like(k4)
    _threads()
    _search_backward_kernel(_np(q4), _np(k4), _np(i3), _np(g3), _np(grad_q), _np(grad_k))
    return grad_q.view(q.shape), grad_k.to(keys.dtype)
