"""Product-key retrieval (Lample et al. 2019, "Large Memory Layers with Product Keys").

The one retrieval routine shared by PKM, Memory+, UltraMem and PEER. A query is split in two halves scored against two
sub-key tables of ``n_keys`` rows; slot (i, j) of the ``n_keys**2`` slots scores ``s1[i] + s2[j]``. The exact top-k over
all slots costs O(n_keys): the top-k pairs always lie among the knn x knn sums of each half's top-k.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.model.memory import cpu_kernels
from memlm.model.memory.values import table_grad


def _candidates(s: torch.Tensor, knn: int, signed: bool) -> torch.Tensor:
    """Candidate sub-key ids (..., c) of one half: its top-knn, plus its bottom-knn when ``signed``."""
    n = s.shape[-1]
    if not signed:
        return s.topk(knn, dim=-1).indices  # (..., knn)
    if 2 * knn >= n:  # top and bottom would overlap: every sub-key is a candidate
        return torch.arange(n, device=s.device).expand(*s.shape[:-1], n)  # (..., n)
    top = s.topk(knn, dim=-1).indices  # (..., knn)
    bottom = s.topk(knn, dim=-1, largest=False).indices  # (..., knn)
    return torch.cat([top, bottom], dim=-1)  # (..., 2 knn)


@functools.cache
def _staircase(knn: int) -> tuple[list[int], list[int]]:
    pairs = [(i, j) for i in range(knn) for j in range(knn) if (i + 1) * (j + 1) <= knn]
    return [i for i, _ in pairs], [j for _, j in pairs]


def staircase_pairs(knn: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b), each (C,), with (a + 1)(b + 1) <= knn: C ~ knn ln(knn) (119 of 1,024 for knn = 32).

    With both halves' top-knn sorted descending, a pair of ranks (a, b) is beaten or tied by the (a + 1)(b + 1) - 1
    pairs (a' <= a, b' <= b), so it can be among the top knn sums only if (a + 1)(b + 1) <= knn: the top-knn of
    these C candidates is the top-knn of all knn^2 (up to the order of tied scores), for ~8x less work than the grid."""
    return _staircase_tensors(knn, torch.device(device))


@functools.cache
def _staircase_tensors(knn: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _staircase(knn)
    with torch.inference_mode(False):  # cached: an inference tensor (first call under a val loop) could not be saved
        return torch.tensor(a, device=device), torch.tensor(b, device=device)  # for a later backward


def product_topk(
    s1: torch.Tensor,
    s2: torch.Tensor,
    knn: int,
    *,
    signed: bool = False,
    grid: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``knn`` of ``s1[..., i] + s2[..., j]`` over all (i, j) pairs (or of a rescored candidate grid).

    Args:
        s1, s2: (..., n_keys) scores of each half against its sub-keys.
        knn: number of slots to return (also the number of candidates kept per half).
        signed: also keep each half's bottom-knn as candidates. Makes the search exact for the product
            ``s1[i] * s2[j]`` of signed scores (UltraMem's rank-1 Tucker score): for a fixed j the best i is among
            the top-knn of s1 when s2[j] > 0 and among the bottom-knn when s2[j] < 0.
        grid: ``grid(i1, i2) -> (..., c1, c2)`` exact scores of the candidate pairs, for scores that are not the sum
            of the halves (UltraMem's rank-r core rescoring); default: ``s1 + s2`` (``s1 * s2`` when ``signed``).
    Returns:
        scores (..., knn) sorted descending and slot indices (..., knn) = i * n_keys + j, in [0, n_keys**2).
    """
    n_keys = s1.shape[-1]
    if not signed and grid is None:  # the PKM fast path
        v1, i1 = s1.topk(knn, dim=-1)  # (..., knn) sorted descending
        v2, i2 = s2.topk(knn, dim=-1)  # (..., knn) sorted descending
        return _combine_sorted_halves(v1, i1, v2, i2, knn, n_keys)
    i1, i2 = _candidates(s1, knn, signed), _candidates(s2, knn, signed)  # (..., c1), (..., c2)
    if grid is not None:
        cand = grid(i1, i2)  # (..., c1, c2)
    else:
        a, b = s1.gather(-1, i1).unsqueeze(-1), s2.gather(-1, i2).unsqueeze(-2)  # (..., c1, 1), (..., 1, c2)
        cand = a * b if signed else a + b  # (..., c1, c2)
    c2 = i2.shape[-1]
    scores, flat = cand.flatten(-2).topk(knn, dim=-1)  # (..., knn)
    rows = i1.gather(-1, flat // c2)  # (..., knn)
    cols = i2.gather(-1, flat % c2)  # (..., knn)
    return scores, rows * n_keys + cols


def _combine_sorted_halves(v1, i1, v2, i2, knn: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each half's top-knn (values sorted descending, sub-key ids), (..., knn) each -> the top-knn slots."""
    a, b = staircase_pairs(knn, v1.device)  # (C,), (C,): the only ranks a top-knn pair can have
    cand = v1.index_select(-1, a) + v2.index_select(-1, b)  # (..., C)
    scores, flat = cand.topk(knn, dim=-1)  # (..., knn)
    rows = i1.gather(-1, a[flat])  # (..., knn)
    cols = i2.gather(-1, b[flat])  # (..., knn)
    return scores, rows * n_keys + cols


def product_topk_halves(s: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`product_topk` (the sum score) of ``s`` (..., 2, n_keys), both halves' scores in one tensor: one top-k
    call over the contiguous halves instead of two over strided views."""
    v, i = s.topk(knn, dim=-1)  # (..., 2, knn)
    return _combine_sorted_halves(v[..., 0, :], i[..., 0, :], v[..., 1, :], i[..., 1, :], knn, s.shape[-1])


def all_pair_scores(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """(..., n_keys), (..., n_keys) -> (..., n_keys**2) score of every slot (reference / inspection; O(N))."""
    return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., n_keys * n_keys)


def _dense_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Query halves (..., heads, 2, half) x sub-keys (heads, 2, n_keys, half) -> scores (..., heads, 2, n_keys)."""
    return torch.einsum("...hsd,hsnd->...hsn", q, keys)


def _rms(x: torch.Tensor, eps: float = 1e-6, div: float = 1.0) -> torch.Tensor:
    """x / rms(x) / div over the last dim, no gain (the numba kernels on CPU; else PyTorch's rms_norm)."""
    if cpu_kernels.available(x):
        return cpu_kernels.rms_norm(x, None, eps, 1.0 / div)
    y = F.rms_norm(x, (x.shape[-1],), eps=eps)
    return y if div == 1.0 else y / div


class _SearchWithSparseGrad(torch.autograd.Function):
    """Product-key search whose backward touches only the selected sub-keys.

    Forward: the dense scores and :func:`product_topk`, as without autograd (on CPU the numba selection,
    :func:`memlm.model.memory.cpu_kernels.product_topk`, when available). Backward: score (i, j) = <q1, K1[i]> +
    <q2, K2[j]>, so grad_q1 = sum_k g_k K1[i_k] (an embedding bag over the knn selected sub-keys) and grad_K1[i] =
    sum of g_k q1 over the selected (query, k) with sub-key i (a lookup's table gradient, :func:`table_grad`). Same
    gradient as autograd through the dense search, without its (..., 2, n_keys) score gradient and backward matmuls
    against every sub-key.
    """

    @staticmethod
    def forward(ctx, q, keys, knn: int):  # noqa: D102
        if cpu_kernels.available(q, keys):  # scores and the selection in one pass per (query, head) (numba)
            scores, idx = cpu_kernels.product_topk(q, keys, knn)  # (..., heads, knn)
        else:
            scores, idx = product_topk_halves(_dense_scores(q, keys), knn)  # (..., heads, knn)
        ctx.save_for_backward(q, keys, idx)
        ctx.mark_non_differentiable(idx)
        return scores, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores, _grad_idx):  # noqa: D102
        q, keys, idx = ctx.saved_tensors
        if cpu_kernels.available(q, keys, grad_scores):  # one pass per (head, half), no sort (numba)
            gq, gk = cpu_kernels.search_backward(q, keys, idx, grad_scores)
            return gq, gk, None
        h, _, n, half = keys.shape
        knn = idx.shape[-1]
        g = grad_scores.float().reshape(-1, knn)  # (M*H, knn), one bag per (query, head)
        head_base = (torch.arange(h, device=idx.device) * n).unsqueeze(-1)  # (H, 1): head h's rows in a flat table
        grad_q, grad_k = [], []
        for half_id, sub in ((0, idx // n), (1, idx % n)):
            rows = (sub + head_base).reshape(-1, knn)  # (M*H, knn) rows of the flat (H*n, half) sub-key table
            table = keys[:, half_id].reshape(h * n, half).float()
            qh = q[..., half_id, :].reshape(-1, half).float()  # (M*H, half)
            grad_q.append(F.embedding_bag(rows, table, per_sample_weights=g, mode="sum"))  # (M*H, half)
            # the sub-keys' gradient is a lookup's table gradient: rows summed per touched sub-key, duplicates included
            grad_k.append(table_grad(rows, g, qh, (h * n, half), sparse=False).view(h, n, half))  # (H, n, half)
        gq = torch.stack(grad_q, dim=-2).view(q.shape).to(q.dtype)  # (..., heads, 2, half)
        gk = torch.stack(grad_k, dim=1).to(keys.dtype)  # (heads, 2, n_keys, half)
        return gq, gk, None


class ProductKeys(nn.Module):
    """``heads`` independent pairs of sub-key tables, each (n_keys, k_dim / 2).

    With ``qk_norm`` the query halves and the sub-keys are RMS-normalized (no gain) and each half's dot product is
    divided by sqrt(k_dim / 2): half score = sqrt(k_dim / 2) * cos, so a slot's score sqrt(k_dim / 2) (cos_1 + cos_2)
    has a range set by k_dim alone, independent of the key norms (Memory+ "qk-norm").
    """

    def __init__(self, heads: int, n_keys: int, k_dim: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads, self.n_keys, self.k_dim, self.qk_norm = heads, n_keys, k_dim, qk_norm
        self.half = k_dim // 2
        self.weight = nn.Parameter(torch.empty(heads, 2, n_keys, self.half))  # (heads, 2 halves, n_keys, k_dim/2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.k_dim)  # PKM: uniform keys with bound 1/sqrt(k_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def _normed(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (..., heads, k_dim) -> the query halves (..., heads, 2, half) and sub-keys (heads, 2, n_keys, half)
        whose dot products are the scores (qk-norm and its scale applied).

        Under autocast the query stays in its own (autocast) dtype, since the score einsum runs in that dtype anyway
        (rms_norm accumulates in fp32 either way); otherwise it is upcast to fp32. The sub-keys are fp32 parameters.
        """
        q = query.unflatten(-1, (2, self.half))  # (..., heads, 2, half)
        if not torch.is_autocast_enabled(q.device.type):
            q = q.float()
        keys = self.weight.float()  # (heads, 2, n_keys, half)
        if self.qk_norm:  # the 1/sqrt(half) scale goes on the (small) query, not on the (large) scores
            q, keys = _rms(q, div=math.sqrt(self.half)), _rms(keys)
        return q, keys

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """query (..., heads, k_dim) -> (..., heads, 2, n_keys): both halves' scores against every sub-key."""
        return _dense_scores(*self._normed(query))

    def half_scores(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (..., heads, k_dim) -> s1, s2 each (..., heads, n_keys)."""
        s = self.scores(query)
        return s[..., 0, :], s[..., 1, :]

    def retrieve(self, query: torch.Tensor, knn: int, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """query (..., heads, k_dim) -> (scores, indices), each (..., heads, knn).

        ``impl``: "auto" (the fused Triton top-k on CUDA when it supports the size, else PyTorch), "torch" or
        "triton". Both return the same slots up to ties; the fused path returns fp32 scores (candidate sums formed in
        fp32), the PyTorch path scores in the dtype of the score einsum.

        On CPU the PyTorch path's backward (:class:`_SearchWithSparseGrad`) touches only the knn selected sub-keys per
        query half: O(knn) per query instead of the O(n_keys) of differentiating through the dense search.
        """
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
        q, keys = self._normed(query)  # (..., heads, 2, half), (heads, 2, n_keys, half)
        if not (q.is_cuda or impl == "triton"):
            return _SearchWithSparseGrad.apply(q, keys, knn)
        s = _dense_scores(q, keys)  # (..., heads, 2, n_keys)
        if impl == "triton" or impl == "auto":
            from memlm.model.memory import kernels  # local import: Triton is optional

            if impl == "triton" or kernels.topk_available(q, self.n_keys, knn):
                return kernels.product_topk_fused(s, knn)
        # on GPU, autograd through the dense search beat the sparse-grad search (7.4 vs 9.4 ms fwd+bwd, H100, 1M slots)
        return product_topk(s[..., 0, :], s[..., 1, :], knn)

    def slot_scores(self, query: torch.Tensor) -> torch.Tensor:
        """query (..., heads, k_dim) -> (..., heads, n_keys**2): the score of every slot."""
        return all_pair_scores(*self.half_scores(query))

    def materialized(self) -> torch.Tensor:
        """The full (heads, n_keys**2, k_dim) key of every slot (concatenated halves), for reference checks."""
        k1 = self.weight[:, 0].unsqueeze(2).expand(-1, -1, self.n_keys, -1)  # (heads, n, n, half)
        k2 = self.weight[:, 1].unsqueeze(1).expand(-1, self.n_keys, -1, -1)  # (heads, n, n, half)
        if self.qk_norm:
            k1, k2 = _rms(k1) / math.sqrt(self.half), _rms(k2) / math.sqrt(self.half)
        return torch.cat([k1, k2], dim=-1).flatten(1, 2)  # (heads, n*n, k_dim)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, n_keys={self.n_keys}, k_dim={self.k_dim}, qk_norm={self.qk_norm}"


def normalize_scores(scores: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Turn top-k scores (..., knn) into fp32 mixing weights: softmax (PKM), relu, or raw (UltraMem)."""
    scores = scores.float()
    if score_fn == "softmax":
        return F.softmax(scores, dim=-1)
    if score_fn == "relu":
        return F.relu(scores)
    return scores
