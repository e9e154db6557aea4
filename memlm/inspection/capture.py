"""One recorded forward: what every memory layer read and wrote, for inspection without a second model forward.

Forward hooks keep, per memory layer, its input ``x`` (the normalized block input the query net and the gate see), its
output (what it added to the residual stream), and the ``last_indices`` / ``last_weights`` the layer recorded (the
contract of :class:`memlm.model.memory.base.MemoryLayer`); a hook on the final norm keeps the RMS of the last residual
stream, which converts a residual-stream vector into its direct logit effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InspectionError(ValueError):
    """A request inspection cannot serve (no memory layers, a bad layer or slot id, empty text); says what to fix."""


@dataclass
class LayerRecord:
    """What one memory layer saw and did in one forward (all detached, on the model's device)."""

    index: int  # memory-layer index (0 .. n_memory_layers - 1)
    block: int  # transformer block it lives in
    x: torch.Tensor  # (B, T, dim) layer input
    out: torch.Tensor  # (B, T, dim) layer output
    indices: torch.Tensor  # (B, T, heads, knn) value-table rows
    weights: torch.Tensor  # (B, T, heads, knn) applied mixing weights


@dataclass
class Capture:
    """A recorded forward of ``ids`` (B, T)."""

    ids: torch.Tensor  # (B, T)
    logits: torch.Tensor  # (B, T, vocab)
    final_rms: torch.Tensor  # (B, T) RMS of the residual stream entering the final norm
    layers: list[LayerRecord] = field(default_factory=list)


def memory_blocks(model) -> list[int]:
    """Block index of every memory layer, in ``model.memory_layers`` order."""
    return [i for i, b in enumerate(model.blocks) if b.memory is not None]


def require_memory(model, where: str = "the model") -> None:
    if not model.memory_layers:
        raise InspectionError(f"{where} has no memory layers: there is nothing to inspect (use a memory model config)")


@torch.no_grad()
def capture(model, ids: torch.Tensor) -> Capture:
    """Run ``model`` on ``ids`` (B, T) once, recording every memory layer (see :class:`LayerRecord`)."""
    require_memory(model)
    layers = model.memory_layers
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rms: list[torch.Tensor] = []
    handles = []
    for j, layer in enumerate(layers):

        def hook(mod, inputs, output, j=j):
            seen[j] = (inputs[0].detach(), output.detach())

        handles.append(layer.register_forward_hook(hook))
    eps = getattr(model.norm, "eps", 1e-5)

    def norm_hook(mod, inputs):
        x = inputs[0].detach().float()
        rms.append(torch.sqrt(x.pow(2).mean(-1) + eps))  # (B, T)

    handles.append(model.norm.register_forward_pre_hook(norm_hook))
    was_training = model.training
    model.eval()
    recording = [layer.record for layer in layers]
    try:
        for layer in layers:
            layer.record = True
        logits, _ = model(ids)
    finally:
        for h in handles:
            h.remove()
        for layer, r in zip(layers, recording):
            layer.record = r
        model.train(was_training)
    records = []
    for j, (layer, block) in enumerate(zip(layers, memory_blocks(model))):
        x, out = seen[j]
        records.append(LayerRecord(j, block, x, out, layer.last_indices, layer.last_weights.float()))
    return Capture(ids, logits.detach(), rms[-1], records)
