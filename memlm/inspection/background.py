"""Background document frequency of slots, from the SMF statistics saved beside a checkpoint.

Sparse memory finetuning (:mod:`memlm.continual.background`) counts, per memory layer, in how many of ``n_batches``
pretraining batches each slot was read (``layer_df``). A slot with a high df is used by generic text (editing it risks
forgetting); a slot with df near 0 is specific. Inspection shows ``df / n_batches`` beside each slot when the file
exists and belongs to the inspected weights (or is passed explicitly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memlm.continual.background import BackgroundError, BackgroundStats, default_path, weights_hash


@dataclass
class SlotFrequency:
    """Per memory layer (rows,) int64 background document frequency over ``n_batches`` batches."""

    layer_df: list[torch.Tensor]
    n_batches: int
    path: str
    note: str = ""  # e.g. "counted for another checkpoint"

    def df(self, layer: int, slot: int) -> int:
        return int(self.layer_df[layer][slot])


def load_background(model, ckpt: str | Path, path: str | Path | None = None) -> SlotFrequency | None:
    """The statistics for ``model``: from ``path`` when given (used even if counted for other weights, with a note),
    else from beside ``ckpt`` when present and counted for these exact weights; None otherwise."""
    explicit = path is not None
    p = Path(path) if explicit else default_path(ckpt)
    if not p.is_file():
        if explicit:
            raise BackgroundError(f"background statistics file not found: {p}")
        return None
    stats = BackgroundStats.load(p)
    rows = [layer.value_table.weight.shape[0] for layer in model.memory_layers]
    if [d.numel() for d in stats.layer_df] != rows:
        raise BackgroundError(f"{p}: per-layer statistics {[d.numel() for d in stats.layer_df]} do not fit the model's "
                              f"memory layers {rows}")  # fmt: skip
    note = ""
    if stats.weights_hash != weights_hash(model):
        if not explicit:
            return None
        note = "counted for other weights (e.g. the base model)"
    return SlotFrequency([d.long() for d in stats.layer_df], stats.n_batches, str(p), note)
