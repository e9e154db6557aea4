"""Fused Triton kernels for the weighted value lookup (the CUDA fast path of ``memory.values.value_lookup``).

The kernels live in :mod:`.lookup` (imported lazily: Triton is optional). ``available(table)`` says whether they can
run for a table; ``triton_value_lookup`` is the differentiable entry point. On CPU they run only under
``TRITON_INTERPRET=1`` (tests), which must be set before :mod:`.lookup` is first imported.
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
