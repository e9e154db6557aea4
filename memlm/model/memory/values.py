"""Value tables and the one weighted value-lookup function shared by every memory layer.

``value_lookup(table, indices, weights)`` computes ``out[m] = sum_k weights[m, k] * table[indices[m, k]]``
(an EmbeddingBag in "sum" mode with per-sample weights, as in PKM / Memory+). The reference path is
``F.embedding_bag``; on CUDA a fused Triton kernel is used when available (``memlm.model.memory.kernels``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def value_lookup(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False, impl: str = "auto"
) -> torch.Tensor:
    """Weighted sum of value rows; picks the fastest correct implementation for the device.

    ``impl``: "auto" (Triton on CUDA when installed, else reference), "reference", or "triton".
    """
    if impl == "reference" or (impl == "auto" and not table.is_cuda):
        return value_lookup_reference(table, indices, weights, sparse=sparse)
    from memlm.model.memory import kernels  # local import: Triton is optional

    if impl == "triton" or kernels.available(table):
        return kernels.triton_value_lookup(table, indices, weights, sparse=sparse)
    return value_lookup_reference(table, indices, weights, sparse=sparse)


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
