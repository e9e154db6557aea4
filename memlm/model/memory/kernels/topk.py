"""Triton kernels for the product-key top-k (the CUDA fast path of ``memory.product_keys``).

Forward, one program per ROWS (query, head) rows: load both halves' scores (n_keys each), take each half's top-knn,
then the top-knn of the candidate pairs - all in registers, where stock PyTorch runs three ``topk`` launches, two
gathers and an (R, knn, knn) intermediate. Two savings over the textbook knn x knn grid:

- Pruned grid: with both halves' lists sorted, pair (a, b) (0-based ranks) has at least (a+1)(b+1)-1 pairs scoring
  at least as high, so only pairs with (a+1)(b+1) <= knn can be in the top-knn (119 of 1024 pairs for knn = 32).
- Packed keys: selection runs Triton's bitonic top-k on integer keys holding (score, id) - the score's bits mapped to
  an order-preserving signed int in the high part, the bit-inverted id in the low part (ties go to the smaller id) -
  so values and ids move together. bf16 half scores fit in 16 bits, so their keys are int32 (exact: bf16 -> fp32 is
  exact); fp32 / fp16 scores use int64 keys. Candidate sums are formed in fp32 and selected with int64 keys holding
  the slot id ``i * n_keys + j``: exact, where the PyTorch path rounds the sums to the scores' dtype first.

Backward: scores = s1[i] + s2[j], so grad_s1[row, i] = sum of the grads of the selected slots with first sub-key i
(same for s2): a zero-filled gradient (in the memory layout of ``s``, so the score matmul's backward needs no copy),
then a scatter of each row's knn sums per half, duplicates summed in a fixed order (deterministic, no atomics).

Constraints (callers fall back to PyTorch otherwise): knn a power of two, knn <= n_keys <= 32768.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _ordered(x):
    """fp32 -> int32 whose signed order is the float order (negative floats: flip the magnitude bits)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unordered(k):
    """Inverse of :func:`_ordered` (the map is an involution on the bits)."""
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _pack(score, ident):
    """(fp32 score, int32 id >= 0) -> int64 key: larger score first, then smaller id."""
    return (_ordered(score).to(tl.int64) << 32) | (0x7FFFFFFF - ident).to(tl.int64)


@triton.jit
def _pack16(score, ident):
    """(fp32 score exactly representable in bf16, id < 2**16) -> int32 key: larger score first, then smaller id."""
    return ((_ordered(score) >> 16) << 16) | (0xFFFF - ident)


@triton.jit
def _unpack(key, KEY16: tl.constexpr):
    """key -> (fp32 score, int32 id); inverse of :func:`_pack` / :func:`_pack16`."""
    if KEY16:
        score, ident = _unordered((key >> 16) << 16), 0xFFFF - (key & 0xFFFF)
    else:  # an else branch, not code after a return: Triton would still type-check that for int32 keys
        score, ident = _unordered((key >> 32).to(tl.int32)), 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)
    return score, ident


if hasattr(tl, "topk"):

    @triton.jit
    def _top(keys, K: tl.constexpr):
        """Largest K keys along the last dim of a 2-D block, sorted descending (Triton's bitonic top-k)."""
        return tl.topk(keys, K)

else:  # older Triton: full bitonic sort, then keep the first K

    @triton.jit
    def _top(keys, K: tl.constexpr):
        """Largest K keys along the last dim of a 2-D block, sorted descending."""
        s = tl.sort(keys, dim=1, descending=True)
        n: tl.constexpr = keys.shape[1]
        s3 = tl.reshape(s, [keys.shape[0], n // K, K])
        first = (tl.arange(0, n // K) == 0)[None, :, None]
        return tl.max(tl.where(first, s3, tl.min(s3, axis=1, keep_dims=True)), axis=1)


@triton.jit
def _half_top(p, mask, cols, KNN: tl.constexpr, KEY16: tl.constexpr):
    """Top-KNN of one half's scores (ROWS, BLOCK_N) at pointers ``p``: (fp32 scores, sub-key ids), sorted."""
    x = tl.load(p, mask=mask, other=-float("inf")).to(tl.float32)  # padded columns never win
    if KEY16:
        keys = _pack16(x, cols[None, :])
    else:
        keys = _pack(x, cols[None, :])
    return _unpack(_top(keys, KNN), KEY16)  # (ROWS, KNN) each


@triton.jit
def _fwd_kernel(
    s_ptr, pair_ptr, scratch_ptr, score_ptr, idx_ptr, R, H, N, stride_t, stride_h, stride_half,
    KNN: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, KEY16: tl.constexpr,
):  # fmt: skip
    """s: (T, H, 2, N) strided scores (last stride 1); pairs: (2, P) ranks (a, b) of the pruned grid, padded with
    a = -1; scratch: (R, 4, KNN) int32; out: scores (R, KNN) fp32, slot ids (R, KNN) int64, R = T*H."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) flat (t, h) rows
    rmask = r < R
    t, h = (r // H).to(tl.int64), (r % H).to(tl.int64)
    base = t * stride_t + h * stride_h  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m2 = rmask[:, None] & (cols < N)[None, :]
    p1 = s_ptr + base[:, None] + cols[None, :]  # (ROWS, BLOCK_N)
    v1, i1 = _half_top(p1, m2, cols, KNN, KEY16)  # (ROWS, KNN) sorted descending
    v2, i2 = _half_top(p1 + stride_half, m2, cols, KNN, KEY16)
    # the pruned grid's pairs read v1[a], v2[b] back through a small scratch row (L2-resident; tl.gather does not
    # compile for these layouts on Triton 3.6)
    ks = tl.arange(0, KNN)[None, :]
    sp = scratch_ptr + r.to(tl.int64)[:, None] * (4 * KNN)  # (ROWS, 1) this row's scratch
    tl.store(sp + ks, v1.to(tl.int32, bitcast=True), mask=rmask[:, None])
    tl.store(sp + KNN + ks, i1, mask=rmask[:, None])
    tl.store(sp + 2 * KNN + ks, v2.to(tl.int32, bitcast=True), mask=rmask[:, None])
    tl.store(sp + 3 * KNN + ks, i2, mask=rmask[:, None])
    tl.debug_barrier()  # the stores above are read below by other threads of this program
    pa = tl.load(pair_ptr + tl.arange(0, P))[None, :]  # (1, P) rank in half 1 (-1: padding)
    pb = tl.load(pair_ptr + P + tl.arange(0, P))[None, :]  # (1, P) rank in half 2
    pm = rmask[:, None] & (pa >= 0)  # (ROWS, P)
    a, b = tl.maximum(pa, 0), pb
    cand = tl.load(sp + a, mask=pm, other=0).to(tl.float32, bitcast=True) + tl.load(
        sp + 2 * KNN + b, mask=pm, other=0
    ).to(tl.float32, bitcast=True)  # (ROWS, P) fp32 sums of the pruned pairs
    cand = tl.where(pm, cand, -float("inf"))
    slot = tl.load(sp + KNN + a, mask=pm, other=0) * N + tl.load(sp + 3 * KNN + b, mask=pm, other=0)  # (ROWS, P)
    best_score, best_slot = _unpack(_top(_pack(cand, slot), KNN), False)  # (ROWS, KNN)
    out = r.to(tl.int64)[:, None] * KNN + tl.arange(0, KNN)[None, :]  # (ROWS, KNN)
    om = rmask[:, None]
    tl.store(score_ptr + out, best_score, mask=om)
    tl.store(idx_ptr + out, best_slot.to(tl.int64), mask=om)


@triton.jit
def _bwd_kernel(
    g_ptr, idx_ptr, gs_ptr, R, H, N, stride_t, stride_h, stride_half, KNN: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Scatter the slot grads g (R, KNN) into the zero-filled gradient of the scores s (T, H, 2, N) (s's strides).

    Each selected slot writes, at its sub-key's column, the sum of the grads of all selected slots sharing that
    sub-key (a KNN x KNN match in a fixed order), so duplicate columns receive identical values: deterministic
    without atomics."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    rmask = r < R
    r64 = r.to(tl.int64)
    ks = r64[:, None] * KNN + tl.arange(0, KNN)[None, :]  # (ROWS, KNN)
    g = tl.load(g_ptr + ks, mask=rmask[:, None], other=0.0).to(tl.float32)  # (ROWS, KNN)
    slot = tl.load(idx_ptr + ks, mask=rmask[:, None], other=0)  # (ROWS, KNN)
    i1, i2 = slot // N, slot % N
    g1 = tl.sum(tl.where(i1[:, :, None] == i1[:, None, :], g[:, None, :], 0.0), axis=2)  # (ROWS, KNN)
    g2 = tl.sum(tl.where(i2[:, :, None] == i2[:, None, :], g[:, None, :], 0.0), axis=2)
    base = gs_ptr + (r64 // H) * stride_t + (r64 % H) * stride_h  # (ROWS,)
    dt = gs_ptr.dtype.element_ty
    tl.store(base[:, None] + i1, g1.to(dt), mask=rmask[:, None])
    tl.store(base[:, None] + stride_half + i2, g2.to(dt), mask=rmask[:, None])


# rows per program and warps: fixed (no autotuning), chosen on one H100 for n_keys 1024, knn 32
CONFIG = dict(fwd_rows=1, fwd_warps=1, bwd_rows=1, bwd_warps=1)


def supported(n_keys: int, knn: int) -> bool:
    """Whether the fused kernels handle this size (else use the PyTorch path)."""
    return 0 < knn <= n_keys <= 32768 and knn & (knn - 1) == 0


@functools.cache
def _pairs(knn: int, device: torch.device) -> torch.Tensor:
    """(2, P) int32 ranks (a, b) with (a+1)(b+1) <= knn, padded to a power of two P >= knn with a = -1."""
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    p = max(triton.next_power_of_2(len(pairs)), knn)
    pairs += [(-1, 0)] * (p - len(pairs))
    return torch.tensor(pairs, dtype=torch.int32).T.contiguous().to(device)


def _as_4d(s: torch.Tensor) -> torch.Tensor:
    """(..., H, 2, N) -> (T, H, 2, N): a view for the layouts einsum / bmm produce (else a copy), last stride 1."""
    h, n = s.shape[-3], s.shape[-1]
    s4 = s.reshape(-1, h, 2, n)
    return s4 if s4.stride(-1) == 1 else s4.contiguous()


def topk_forward(s: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s (..., H, 2, N) -> scores (..., H, knn) fp32 sorted descending, slot ids (..., H, knn) int64."""
    *lead, h, two, n = s.shape
    assert two == 2 and supported(n, knn), (s.shape, knn)
    s4 = _as_4d(s)
    r = s4.shape[0] * h
    scores = torch.empty(*lead, h, knn, device=s.device, dtype=torch.float32)
    idx = torch.empty(*lead, h, knn, device=s.device, dtype=torch.int64)
    if r == 0:
        return scores, idx
    pairs = _pairs(knn, s.device)
    scratch = torch.empty(r, 4, knn, device=s.device, dtype=torch.int32)
    rows = CONFIG["fwd_rows"]
    _fwd_kernel[(triton.cdiv(r, rows),)](
        s4, pairs, scratch, scores, idx, r, h, n, s4.stride(0), s4.stride(1), s4.stride(2),
        KNN=knn, P=pairs.shape[1], BLOCK_N=triton.next_power_of_2(n), ROWS=rows, KEY16=s.dtype == torch.bfloat16,
        num_warps=CONFIG["fwd_warps"],
    )  # fmt: skip
    return scores, idx


def topk_backward(grad_scores: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """grad (..., H, knn), slot ids (..., H, knn) -> grad of s (..., H, 2, n) with the dtype and, where possible, the
    strides of ``like`` (s itself), so the score matmul's backward needs no layout copy."""
    knn = idx.shape[-1]
    gs = torch.zeros_like(like, device=idx.device)  # keeps s's (possibly permuted) dense layout
    g4 = _as_4d(gs)
    if g4.data_ptr() != gs.data_ptr():  # that layout does not flatten to (T, H, 2, N): use a contiguous buffer
        gs = torch.zeros(like.shape, device=idx.device, dtype=like.dtype)
        g4 = _as_4d(gs)
    h, n = g4.shape[1], g4.shape[3]
    r = g4.shape[0] * h
    if r == 0:
        return gs
    rows = CONFIG["bwd_rows"]
    _bwd_kernel[(triton.cdiv(r, rows),)](
        grad_scores.contiguous(), idx.contiguous(), g4, r, h, n, g4.stride(0), g4.stride(1), g4.stride(2),
        KNN=knn, ROWS=rows, num_warps=CONFIG["bwd_warps"],
    )  # fmt: skip
    return gs


class ProductTopKFunction(torch.autograd.Function):
    """s (..., H, 2, N) -> (scores fp32, slot ids), differentiable in s."""

    @staticmethod
    def forward(ctx, s, knn: int):  # noqa: D102
        scores, idx = topk_forward(s, knn)
        ctx.save_for_backward(idx)
        ctx.like = torch.empty_like(s, device="meta")  # shape, dtype and strides only
        ctx.mark_non_differentiable(idx)
        return scores, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores, _grad_idx):  # noqa: D102
        (idx,) = ctx.saved_tensors
        if grad_scores is None:
            return None, None
        return topk_backward(grad_scores, idx, ctx.like), None
