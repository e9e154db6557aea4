"""Fused Triton kernels: the weighted value lookup (the CUDA fast path of ``memory.values.value_lookup``), the
product-key top-k (the CUDA fast path of ``ProductKeys.retrieve``) and the lazy Adam step on value rows (the CUDA
fast path of ``memory.sparse_update.adam_rows_``).

The kernels live in :mod:`.lookup`, :mod:`.topk` and :mod:`.adam_rows` (imported lazily: Triton is optional).
``available(table)``, ``topk_available(x, n_keys, knn)`` and ``adam_rows_available(param)`` say whether they can run;
``triton_value_lookup`` and ``product_topk_fused`` are the differentiable entry points, ``fused_adam_rows`` the
in-place optimizer step. On CPU they run only under ``TRITON_INTERPRET=1`` (tests), which must be set before
Triton is first imported.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(table: torch.Tensor) -> bool:
    """Whether the Triton fast path can run for this table (CUDA tensor, Triton installed, float dtype)."""
    return table.is_cuda and table.dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_importable()


def adam_rows_available(param: torch.Tensor) -> bool:
    """Whether the fused row-sparse Adam step can run on this parameter (CUDA, Triton, contiguous float table)."""
    return available(param) and param.is_contiguous()


def topk_available(x: torch.Tensor, n_keys: int, knn: int) -> bool:
    """Whether the fused product-key top-k can run for queries ``x`` (its device) with this many sub-keys and slots."""
    if not (x.is_cuda and _triton_importable()):
        return False
    from memlm.model.memory.kernels import topk

    return topk.supported(n_keys, knn)


def product_topk_fused(s: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused exact product-key top-k: s (..., heads, 2, n_keys) -> (scores fp32, slot ids int64), each
    (..., heads, knn) sorted by score; differentiable in ``s``. See :mod:`.topk`."""
    from memlm.model.memory.kernels import topk

    return topk.ProductTopKFunction.apply(s, knn)


def triton_value_lookup(
    table: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse: bool = False,
    deterministic: bool = True,
) -> torch.Tensor:
    """Fused differentiable lookup ``out[..., :] = sum_k weights[..., k] * table[indices[..., k]]``.

    Args:
        table: (N, D) fp32 / bf16 / fp16 rows.
        indices: (..., K) int64 (or int32) row ids in [0, N) (not range-checked).
        weights: (..., K) float weights (kept in their dtype; fp32 accumulation).
        sparse: give ``table`` a coalesced sparse COO gradient holding only the touched rows.
        deterministic: True (default): sorted segmented-reduction backward, bitwise reproducible and also the
            fastest measured on H100. False: dense backward with fp32 atomics (run-to-run bit differences, 2-3x
            slower on H100; kept as a baseline, ignored when ``sparse``).
    Returns:
        (..., D) in the table's dtype.
    """
    from memlm.model.memory.kernels import lookup

    return lookup.value_lookup(table, indices, weights, sparse=sparse, deterministic=deterministic)


def lookup_backward_rows(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-sparse backward without autograd: (unique sorted rows (U,), grad rows (U, D), grad weights (..., K)).

    Feed ``rows, grad_rows`` to :class:`memlm.model.memory.sparse_update.RowSparseAdam` (or SGD).
    """
    from memlm.model.memory.kernels import lookup

    rows, grad_rows, grad_w = lookup.lookup_backward(table, indices, weights, grad_out, mode="sparse")
    return rows, grad_rows, grad_w


def fused_adam_rows(param, rows, grad_rows, exp_avg, exp_avg_sq, step_size, bc2_sqrt, beta1, beta2, eps) -> None:
    """One-pass lazy Adam step on ``param[rows]`` (in place; rows unique). See :mod:`.adam_rows`."""
    from memlm.model.memory.kernels import adam_rows

    n, u = param.shape[0], rows.numel()
    if u == 0:  # nothing read this step (reshape(0, -1) below would be ambiguous)
        return
    adam_rows.adam_rows(
        param.view(n, -1), rows, grad_rows.reshape(u, -1), exp_avg.view(n, -1), exp_avg_sq.view(n, -1),
        step_size, bc2_sqrt, beta1, beta2, eps,
    )  # fmt: skip
