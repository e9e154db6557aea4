"""What a slot writes: its value row mapped into the residual stream, exactly as the layer maps it at one token.

A memory layer's output is linear in each selected slot's (weighted) value row, so it splits exactly into one
residual-stream vector per (head, slot) — the vectors sum to the layer output:

- PKM: ``w * v_s`` (through ``W_o`` when the value width differs from the model width).
- Memory+: ``W_o((w * v_s) ⊙ silu(W_g x))`` — the gate depends on the token, so a slot writes different things at
  different tokens.
- UltraMem: core c's weight scales the c-th slice of ``v_s``; the result sits in the slot's IVE group g and goes
  through the output projection: ``W_o[:, g] (w_c * v_s[c])_c``.
- UltraMemV2: ``W_o(w * v_s)`` (``w`` already holds the pre-value activation and read scale).
- PEER: ``w * v_s`` (``w`` holds ``softmax * act(<u_s, x>)``).

``value_rows`` may be any rows of the value table's width (e.g. the change of a row between two checkpoints): the
same map then says what that change writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.model.memory import PEER, ProductKeyMemory, UltraMem, UltraMemV2


def _slot_weights(layer, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """UltraMem: per-core weights (..., heads, knn, cores) and IVE groups (..., heads, knn), recomputed from x (the
    recorded weights are summed over cores); other layers: the recorded weights with a trailing core axis of 1."""
    if isinstance(layer, UltraMem):
        core_w, virtual, _ = layer.retrieve(x)  # (..., heads, cores, knn), (..., heads, knn)
        _, group = layer.physical(virtual)  # (..., heads, knn)
        return core_w.transpose(-1, -2).float(), group  # (..., heads, knn, cores)
    return weights.float().unsqueeze(-1), None  # (..., heads, knn, 1)


@torch.no_grad()
def slot_writes(
    layer, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, value_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Residual-stream vector written by every selected slot.

    Args:
        layer: a memory layer.
        x: (..., dim) the layer input at each token.
        indices: (..., heads, knn) selected value-table rows (``last_indices``).
        weights: (..., heads, knn) applied weights (``last_weights``).
        value_rows: (..., heads, knn, v_dim) rows to map instead of ``value_table.weight[indices]``.
    Returns:
        (..., heads, knn, dim) float32; summed over (heads, knn) it equals the layer output (for the true rows).
    """
    if value_rows is None:
        value_rows = layer.value_table.weight[indices]  # (..., heads, knn, v_dim)
    v = value_rows.float()
    w, group = _slot_weights(layer, x, weights)  # (..., heads, knn, cores or 1)
    xs = x.float()[..., None, None, :]  # (..., 1, 1, dim)
    if isinstance(layer, ProductKeyMemory):
        r = v * w  # (..., heads, knn, v_dim)
        if layer.gate is not None:
            r = r * F.silu(F.linear(xs, layer.gate.weight.float()))  # Memory+ gate at this token
        return F.linear(r, layer.out.weight.float()) if layer.out is not None else r
    if isinstance(layer, UltraMem):
        cores = w.shape[-1]
        r = (v.unflatten(-1, (cores, -1)) * w.unsqueeze(-1)).flatten(-2)  # (..., heads, knn, v_dim) per-core slices
        onehot = F.one_hot(group, layer.expansion).to(r.dtype)  # (..., heads, knn, E)
        r = (onehot.unsqueeze(-1) * r.unsqueeze(-2)).flatten(-2)  # (..., heads, knn, E * v_dim) in the slot's group
        return F.linear(r, layer.out.weight.float())  # (..., heads, knn, dim)
    if isinstance(layer, UltraMemV2):
        return F.linear(v * w, layer.out.weight.float())  # (..., heads, knn, dim)
    if isinstance(layer, PEER):
        return v * w  # (..., heads, knn, dim)
    raise TypeError(f"no slot-write rule for memory layer {type(layer).__name__}")
