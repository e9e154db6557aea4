"""Fused Triton kernels for the weighted value lookup (CUDA fast path). Placeholder until the kernels land."""

from __future__ import annotations

import torch


def available(table: torch.Tensor) -> bool:
    """Whether the Triton fast path can run for this table."""
    return False


def triton_value_lookup(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("Triton value-lookup kernels are not implemented yet")
