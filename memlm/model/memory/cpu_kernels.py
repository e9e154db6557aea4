"""CPU kernels for the memory layers' scattered work, compiled with numba (the CPU counterpart of ``kernels.py``).

Stock PyTorch runs these steps as chains of mid-size ops, each a full pass over (tokens, heads, k) tensors; on CPU the
passes, not the arithmetic, are the cost. Each kernel here is one pass, parallel over rows:

- :func:`product_topk`: the exact product-key top-k from the two halves' dense scores: each half's top-k (a
  threshold pass keeps a few more than k candidates, which are insertion-sorted), then the top-k pair sums, in order,
  from a heap frontier over the two sorted lists, written as slot ids. Replaces ``torch.topk`` on both halves, the
  staircase candidate sums and a second ``torch.topk`` (and, for narrow query halves, the score matmul too).
- :func:`lookup_backward`: both gradients of a weighted lookup from one pass over each touched row's occurrences
  (sorted by ``torch.sort``): each occurrence's output-gradient row is read once, for its weight's dot with the value
  row and for the row's gradient sum. Replaces an embedding bag over the segments plus a sampled matmul.
- :func:`search_backward`: the product-key search's query and sub-key gradients, one task per (head, half), no sort.
- :func:`row_dots`: ``<table[idx[m, k]], x[m]>`` (PEER's and UltraMemV2's row dots).
- :func:`adam_rows_`: lazy Adam on the touched rows of fp32 tables in place: one pass reading the gradient, parameter
  and moment rows, where PyTorch gathers the moments, steps the gathered copy and scatters it back.
- :func:`rms_norm`: the query net's RMSNorm and Memory+'s qk-norm, one pass forward and one backward.

``available()`` is False when numba is missing, under ``MEMLM_CPU_KERNELS=0`` and inside torch.compile; every caller
then keeps its PyTorch path (the two are checked against each other in tests/test_cpu_kernels.py). Kernels compile on
first use (cached on disk by numba) and run on ``torch.get_num_threads()`` threads. Ties: the top-k keeps the lower
index first among equal scores. A row with NaN scores gets valid but arbitrary slots (``torch.topk`` ranks NaN
highest); the NaN reaches the layer's output either way. Tensors reach numba as views made from their data pointers
(:func:`_np`), never through ``Tensor.numpy()``, which would pin the storage's size (FSDP resizes parameter storage).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import statistics

import torch

try:  # optional at import time: the PyTorch paths stay complete without it
    import numba
    import numpy as np
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

FLOATS = (torch.float32, torch.float64)
# query half widths up to which product_topk computes the scores inside its kernel instead of a batched matmul
# (BLAS reaches ~1/3 of its peak at inner width 32 on CPU, and writing the score tensor costs more than the dots)
SCORING_MAX_HALF = 32


def available(*tensors: torch.Tensor) -> bool:
    """numba is importable, not switched off (``MEMLM_CPU_KERNELS=0``), not under torch.compile (which cannot trace
    into numba, and fuses the PyTorch paths itself), and every tensor is a CPU float32/float64 tensor (integer index
    tensors may be given too: they only need to be on the CPU)."""
    if torch.compiler.is_compiling() or numba is None or os.environ.get("MEMLM_CPU_KERNELS", "1") == "0":
        return False
    for t in tensors:
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype not in FLOATS):
            return False
    return True


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


_NP_TYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}


def _np(t: torch.Tensor):
    """A numpy view of a contiguous CPU tensor's memory (the kernels read and write it in place), made from its data
    pointer. ``Tensor.numpy()`` would mark the storage as shared with numpy and so not resizable, and FSDP frees a
    parameter's unsharded storage by resizing it to 0. The caller keeps ``t`` alive while the view is in use."""
    if not t.is_contiguous():
        raise ValueError("cpu_kernels._np needs a contiguous tensor")
    dtype = np.dtype(_NP_TYPES[t.dtype])
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=dtype)
    buf = (ctypes.c_byte * (t.numel() * dtype.itemsize)).from_address(t.data_ptr())
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(t.shape))


if numba is not None:

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
    def _row_topk(row, k, z, vals, ids, buf_v, buf_i):
        """vals, ids (k,) <- the top-k of ``row`` (n,), descending. Exact for any data: a threshold from the row's
        mean and std (mean + z std; z is chosen so that ~1.5 k scores of a Gaussian row pass) keeps a few more than
        k candidates in one branch-free pass; if fewer than k pass, every score is a candidate. Then an insertion
        sort of the candidates into (k,)."""
        n = row.shape[0]
        total = 0.0
        sq = 0.0
        for j in range(n):
            total += row[j]
            sq += row[j] * row[j]
        mean = total / n
        var = max(sq / n - mean * mean, 0.0)
        thr = mean + z * math.sqrt(var)
        c = 0
        for j in range(n):  # branch-free compaction of the scores above the threshold
            x = row[j]
            buf_v[c] = x
            buf_i[c] = j
            c += x > thr
        if c < k:  # too few passed (a non-Gaussian row): every score is a candidate
            for j in range(n):
                buf_v[j] = row[j]
                buf_i[j] = j
            c = n
        for j in range(k):  # insertion sort of the first k candidates
            _insert(vals, ids, j, buf_v[j], buf_i[j])
        for j in range(k, c):  # the rest: inserted only if it beats the current k-th
            if buf_v[j] > vals[k - 1]:
                _insert(vals, ids, k - 1, buf_v[j], buf_i[j])

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
    def _product_topk_kernel(s, knn, z, out_scores, out_ids):
        """s (H, 2, M, n) half scores -> out_scores, out_ids (M, H, knn): the top-knn slot scores and ids i * n + j.
        (fastmath only lets the mean / std sums vectorize; every comparison is on the exact scores.)"""
        h_count, _, m_count, n = s.shape
        tasks = m_count * h_count
        chunk = 64  # scratch buffers allocated once per chunk of (token, head) tasks
        for c0 in prange((tasks + chunk - 1) // chunk):
            v1, v2 = np.empty(knn, s.dtype), np.empty(knn, s.dtype)
            i1, i2 = np.empty(knn, np.int64), np.empty(knn, np.int64)
            buf_v, buf_i = np.empty(n, s.dtype), np.empty(n, np.int64)
            hv, ha, hb = np.empty(knn + 1, s.dtype), np.empty(knn + 1, np.int64), np.empty(knn + 1, np.int64)
            for task in range(c0 * chunk, min(tasks, (c0 + 1) * chunk)):
                m, h = task // h_count, task % h_count
                _row_topk(s[h, 0, m], knn, z, v1, i1, buf_v, buf_i)
                _row_topk(s[h, 1, m], knn, z, v2, i2, buf_v, buf_i)
                _top_sums(v1, i1, v2, i2, knn, n, out_scores[m, h], out_ids[m, h], hv, ha, hb)

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _product_topk_scoring_kernel(q, keys_t, knn, z, out_scores, out_ids):
        """:func:`_product_topk_kernel` that also computes the half scores: q (M, H, 2, half), keys_t (H, 2, half, n)
        (sub-keys transposed, so a score row is ``half`` vectorized axpys over n). For small ``half``, where a BLAS
        matmul runs far below its peak and the (H, 2, M, n) score tensor costs more to write than to compute."""
        m_count, h_count, _, half = q.shape
        n = keys_t.shape[3]
        tasks = m_count * h_count
        chunk = 64
        for c0 in prange((tasks + chunk - 1) // chunk):
            v1, v2 = np.empty(knn, q.dtype), np.empty(knn, q.dtype)
            i1, i2 = np.empty(knn, np.int64), np.empty(knn, np.int64)
            row = np.empty(n, q.dtype)
            buf_v, buf_i = np.empty(n, q.dtype), np.empty(n, np.int64)
            hv, ha, hb = np.empty(knn + 1, q.dtype), np.empty(knn + 1, np.int64), np.empty(knn + 1, np.int64)
            for task in range(c0 * chunk, min(tasks, (c0 + 1) * chunk)):
                h, m = task // m_count, task % m_count  # head-major: a head's sub-keys stay in cache
                for side in range(2):
                    qs, kt = q[m, h, side], keys_t[h, side]
                    for j in range(n):
                        row[j] = qs[0] * kt[0, j]
                    for d in range(1, half):
                        qd = qs[d]
                        for j in range(n):
                            row[j] += qd * kt[d, j]
                    if side == 0:
                        _row_topk(row, knn, z, v1, i1, buf_v, buf_i)
                    else:
                        _row_topk(row, knn, z, v2, i2, buf_v, buf_i)
                _top_sums(v1, i1, v2, i2, knn, n, out_scores[m, h], out_ids[m, h], hv, ha, hb)

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _search_backward_kernel(q, keys, idx, g, grad_q, grad_k):
        """Gradients of the selected scores s[m, h, c] = <q[m, h, 0], K[h, 0, i]> + <q[m, h, 1], K[h, 1, j]> (slot
        idx = i * n + j) given g = d loss / d s: grad_q[m, h, side] = sum_c g K[h, side, sub_c] and grad_k[h, side,
        sub] = sum of g q[m, h, side] over the (m, c) that selected sub. One task per (head, side): it owns its slice
        of both outputs, so the sums need no sort and no atomics (and run in a fixed order)."""
        m_count, h_count, _, half = q.shape
        n = keys.shape[2]
        knn = idx.shape[2]
        zero = np.zeros(1, q.dtype)[0]
        for task in prange(h_count * 2):
            h, side = task // 2, task % 2
            kk, gk = keys[h, side], grad_k[h, side]
            for r in range(n):
                for j in range(half):
                    gk[r, j] = zero
            for m in range(m_count):
                qs, gq = q[m, h, side], grad_q[m, h, side]
                for j in range(half):
                    gq[j] = zero
                for c in range(knn):
                    slot = idx[m, h, c]
                    sub = slot // n if side == 0 else slot % n
                    w = g[m, h, c]
                    kr, gr = kk[sub], gk[sub]
                    for j in range(half):
                        gq[j] += w * kr[j]
                        gr[j] += w * qs[j]

    # dots: reassociation lets LLVM vectorize the reduction (the sum's order differs from a sequential one by rounding)
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _lookup_backward_kernel(table, grad_out, bags, occ_w, starts, uniq, grad_rows, occ_dots, want_rows, want_dots):
        """Per touched row u (its occurrences o in [starts[u], starts[u + 1]), bag bags[o], weight occ_w[o]):
        grad_rows[u] = sum_o occ_w[o] grad_out[bags[o]] and occ_dots[o] = <table[uniq[u]], grad_out[bags[o]]>,
        both from one read of each grad_out row. ``table`` is read only when ``want_dots``."""
        d = grad_out.shape[1]
        zero = np.zeros(1, grad_out.dtype)[0]  # accumulate in the table's dtype
        for u in prange(uniq.shape[0]):
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

    @njit(parallel=True, cache=True)
    def _adam_rows_kernel(param, exp_avg, exp_avg_sq, rows, grad, step_size, bc2_sqrt, beta2, omb1, omb2, eps):
        """Lazy Adam on param[rows] (fp32, rows unique); step_size / bc2_sqrt (U,) per row (a global step repeats
        one value). torch.optim.Adam's formula and rounding order: m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2;
        p -= step_size (m / (sqrt(v) / bc2_sqrt + eps))."""
        d = grad.shape[1]
        for i in prange(rows.shape[0]):
            r = rows[i]
            p, m, v, g = param[r], exp_avg[r], exp_avg_sq[r], grad[i]
            lr, bc = step_size[i], bc2_sqrt[i]
            for j in range(d):
                gj = g[j]
                mj = m[j] + omb1 * (gj - m[j])
                vj = v[j] * beta2 + omb2 * (gj * gj)
                m[j] = mj
                v[j] = vj
                p[j] = p[j] - lr * (mj / (math.sqrt(vj) / bc + eps))

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _rms_norm_fwd_kernel(x, gain, scale, eps, y, rinv):
        """Rows of x (R, D): rinv[r] = 1 / sqrt(mean(x^2) + eps); y = x * rinv * gain * scale (gain: (D,) or (0,))."""
        rows, d = x.shape
        has_gain = gain.shape[0] > 0
        for r in prange(rows):
            xr = x[r]
            sq = 0.0
            for j in range(d):
                sq += xr[j] * xr[j]
            inv = 1.0 / math.sqrt(sq / d + eps)
            rinv[r] = inv
            f = inv * scale
            yr = y[r]
            if has_gain:
                for j in range(d):
                    yr[j] = xr[j] * f * gain[j]
            else:
                for j in range(d):
                    yr[j] = xr[j] * f

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _rms_norm_bwd_kernel(x, rinv, gain, scale, gy, gx, ggain_parts, chunk):
        """gx = rinv (g - xhat mean(g xhat)) with xhat = x rinv, g = gy * gain * scale; the gain's gradient
        sum_r gy xhat scale, summed per chunk of rows into ggain_parts (chunks, D)."""
        rows, d = x.shape
        has_gain = gain.shape[0] > 0
        for c in prange((rows + chunk - 1) // chunk):
            part = ggain_parts[c]
            for r in range(c * chunk, min(rows, (c + 1) * chunk)):
                xr, gyr, gxr = x[r], gy[r], gx[r]
                inv = rinv[r]
                dot = 0.0
                for j in range(d):
                    gj = gyr[j] * scale * (gain[j] if has_gain else 1.0)
                    dot += gj * xr[j] * inv
                dot = dot / d
                for j in range(d):
                    xh = xr[j] * inv
                    gj = gyr[j] * scale * (gain[j] if has_gain else 1.0)
                    gxr[j] = inv * (gj - xh * dot)
                    if has_gain:
                        part[j] += gyr[j] * xh * scale


@functools.cache
def _threshold_z(n: int, knn: int) -> float:
    """z with P(N(0, 1) > z) = (1.5 knn + 8) / n: the threshold of :func:`_row_topk` lets ~1.5 knn + 8 of a
    Gaussian row's n scores through (-inf: all of them, when that is most of the row anyway)."""
    frac = (1.5 * knn + 8) / n
    return -math.inf if frac >= 0.5 else statistics.NormalDist().inv_cdf(1 - frac)


def product_topk(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query halves (..., H, 2, half) x sub-keys (H, 2, n_keys, half) -> the exact top-``knn`` slot scores and ids
    (..., H, knn), scores descending (the same result as ``product_topk_halves`` of the dense scores, up to ties
    and the rounding of the score dot products).

    The dense scores are one batched matmul laid out (H, 2, M, n_keys), so each half's row is contiguous; for
    ``half <= SCORING_MAX_HALF`` the kernel computes each score row itself."""
    lead, h, half = q.shape[:-3], q.shape[-3], q.shape[-1]
    n = keys.shape[2]
    if half <= SCORING_MAX_HALF:  # scores computed inside the kernel (small inner width)
        if knn > n:
            raise ValueError(f"knn = {knn} exceeds the {n} sub-keys per half")
        q4 = q.detach().reshape(-1, h, 2, half).contiguous()
        scores = q4.new_empty(q4.shape[0], h, knn)
        ids = torch.empty(q4.shape[0], h, knn, dtype=torch.int64)
        keys_t = keys.detach().to(q4.dtype).transpose(-1, -2).contiguous()  # (H, 2, half, n)
        _threads()
        _product_topk_scoring_kernel(_np(q4), _np(keys_t), knn, _threshold_z(n, knn), _np(scores), _np(ids))
        return scores.view(*lead, h, knn), ids.view(*lead, h, knn)
    qf = q.reshape(-1, h, 2, half).permute(1, 2, 0, 3)  # (H, 2, M, half)
    s = torch.matmul(qf, keys.transpose(-1, -2))  # (H, 2, M, n) contiguous
    scores, ids = topk_of_half_scores(s, knn)  # (M, H, knn)
    return scores.view(*lead, h, knn), ids.view(*lead, h, knn)


def topk_of_half_scores(s: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half scores (H, 2, M, n_keys) -> the top-``knn`` slot scores and ids (M, H, knn), scores descending."""
    h, _, m, n = s.shape
    if knn > n:
        raise ValueError(f"knn = {knn} exceeds the {n} sub-keys per half")
    s = s.contiguous()
    scores = s.new_empty(m, h, knn)
    ids = torch.empty(m, h, knn, dtype=torch.int64)
    _threads()
    _product_topk_kernel(_np(s), knn, _threshold_z(n, knn), _np(scores), _np(ids))
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


def segments(indices: torch.Tensor):
    """The occurrences of each touched row: (sorted unique rows (U,), bag of each occurrence grouped by row (L,),
    their positions in the flat (M*K) indices (L,), segment starts (U + 1,))."""
    k = indices.shape[1]
    # (a counting sort in numba was no faster than torch's sort here: its scattered writes miss the cache)
    rows, perm = torch.sort(indices.reshape(-1), stable=True)  # (L,): each row's occurrences, in order
    uniq, counts = torch.unique_consecutive(rows, return_counts=True)  # (U,), (U,)
    starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64)
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
                            _np(occ_dots), want_rows, want_dots)  # fmt: skip
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


def adam_rows_(param, rows, grad_rows, exp_avg, exp_avg_sq, step_size, bc2_sqrt, beta1, beta2, eps) -> None:
    """Lazy Adam on the (U,) unique ``rows`` of contiguous fp32 ``param`` / moments, in place. ``step_size`` and
    ``bc2_sqrt`` are Adam's lr / bias_correction1 and sqrt(bias_correction2): floats (one global step) or (U,)
    tensors (per-row steps)."""
    u = rows.numel()
    if u == 0:
        return
    d = param[0].numel()

    def per_row(v):  # a numpy array that owns its memory
        if isinstance(v, torch.Tensor):
            return v.to(torch.float32).reshape(u).numpy().copy()
        return np.full(u, v, dtype=np.float32)

    g = grad_rows.detach().to(torch.float32).reshape(u, d).contiguous()
    p, m, v, r = param.detach().view(-1, d), exp_avg.view(-1, d), exp_avg_sq.view(-1, d), rows.contiguous()
    _threads()
    _adam_rows_kernel(_np(p), _np(m), _np(v), _np(r), _np(g), per_row(step_size), per_row(bc2_sqrt), np.float32(beta2),
                      np.float32(1 - beta1), np.float32(1 - beta2), np.float32(eps))  # fmt: skip


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) * gain * scale over the last dim: one kernel pass forward, one backward (PyTorch's CPU
    rms_norm differentiates through ~10 elementwise ops)."""

    @staticmethod
    def forward(ctx, x, gain, scale: float, eps: float):  # noqa: D102
        d = x.shape[-1]
        x2 = x.detach().reshape(-1, d).contiguous()
        g = gain.detach().contiguous() if gain is not None else x2.new_empty(0)
        y = torch.empty_like(x2)
        rinv = x2.new_empty(x2.shape[0])
        _threads()
        _rms_norm_fwd_kernel(_np(x2), _np(g), scale, eps, _np(y), _np(rinv))
        ctx.save_for_backward(x2, rinv, g)
        ctx.scale, ctx.has_gain, ctx.shape = scale, gain is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # noqa: D102
        x2, rinv, g = ctx.saved_tensors
        gy2 = gy.reshape(x2.shape).to(x2.dtype).contiguous()
        gx = torch.empty_like(x2)
        chunk = 256
        parts = x2.new_zeros((x2.shape[0] + chunk - 1) // chunk if ctx.has_gain else 0, x2.shape[1])
        _threads()
        _rms_norm_bwd_kernel(_np(x2), _np(rinv), _np(g), ctx.scale, _np(gy2), _np(gx), _np(parts), chunk)
        ggain = parts.sum(0) if ctx.has_gain and ctx.needs_input_grad[1] else None
        return gx.view(ctx.shape), ggain, None, None


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None = None, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """``F.rms_norm(x, (D,), gain, eps) * scale`` over the last dim, differentiable, as two kernel passes (CPU
    float32/float64 tensors, see :func:`available`)."""
    return _RMSNorm.apply(x, gain, float(scale), float(eps))
