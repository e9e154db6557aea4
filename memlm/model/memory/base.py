"""The contract every memory layer follows, so stats, SMF and inspection treat all variants alike."""

from __future__ import annotations

import torch
import torch.nn as nn


class MemoryLayer(nn.Module):
    """Base class: a token-wise layer (B, T, dim) -> (B, T, dim) that reads a few slots of a large table.

    After each forward it keeps (detached) ``last_indices`` (B, T, heads, knn) — slot ids in [0, n_slots) — and
    ``last_weights`` (B, T, heads, knn), the mixing weights actually applied. ``aux_loss`` may hold a scalar added to
    the training loss (UltraMem's core regularizer); ``None`` otherwise. ``value_table`` is the table that
    ``last_indices`` index (the one SMF and row-sparse updates act on).
    """

    n_slots: int
    heads: int
    knn: int

    def __init__(self) -> None:
        super().__init__()
        self.last_indices: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.record = True  # set False to skip keeping the last indices (e.g. in benchmarks)

    def _record(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        if self.record:
            self.last_indices = indices.detach()
            self.last_weights = weights.detach()

    @property
    def value_table(self) -> nn.Module:
        raise NotImplementedError

    def local_slots(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``last_indices`` -> (the same slots as ids in [0, n), n = the slots this layer can address): the space usage
        statistics are taken over (UltraMemV2: its window of the global table)."""
        return indices, self.n_slots

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Matrices of this layer kept out of weight decay (``MemLM.param_groups``; vectors never get it)."""
        return []

    def sparse_tables(self) -> list[nn.Module]:
        """Every table this layer reads a few rows of per token (the optimizer's value group): the value table, plus
        PEER's input-expert table and UltraMemV2's pre-value table."""
        return [self.value_table]
