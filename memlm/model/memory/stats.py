"""Memory usage statistics from recorded slot indices (PKM paper's memory-health metrics).

All computed with ``bincount`` over the indices a layer kept from its last forward(s):
fraction of slots used, KL(usage || uniform) by count and score-weighted, Gini coefficient of the usage, number of
slots that carry 50/90/99 % of the mass, and the mean top-1 weight.
"""

from __future__ import annotations

import math

import torch


def slot_counts(indices: torch.Tensor, n_slots: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """indices (...) in [0, n_slots) -> (n_slots,) float64 counts (or summed weights)."""
    flat = indices.reshape(-1).long()  # (M,)
    w = None if weights is None else weights.reshape(-1).double()  # (M,)
    return torch.bincount(flat, weights=w, minlength=n_slots).double()


def kl_from_uniform(counts: torch.Tensor) -> float:
    """KL(p || uniform) = sum_i p_i log(p_i * N), in nats; 0 for perfectly even usage, log N for one slot."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    nz = p[p > 0]
    return float((nz * torch.log(nz * counts.numel())).sum())


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of the usage distribution: 0 = even, -> 1 = concentrated on one slot."""
    n = counts.numel()
    total = counts.sum()
    if total <= 0 or n == 0:
        return 0.0
    x = counts.sort().values  # ascending
    ranks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return float((2 * (ranks * x).sum()) / (n * total) - (n + 1) / n)


def slots_for_mass(counts: torch.Tensor, fraction: float) -> int:
    """Smallest number of slots whose usage adds up to at least ``fraction`` of the total."""
    total = counts.sum()
    if total <= 0:
        return 0
    cum = counts.sort(descending=True).values.cumsum(0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype, device=cum.device)).item()) + 1


def counts_stats(counts: torch.Tensor, weighted_counts: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics of :func:`usage_stats` from accumulated (n_slots,) counts (e.g. summed over many steps)."""
    n_slots = counts.numel()
    kl = kl_from_uniform(counts)
    out = {
        "used_frac": float((counts > 0).double().mean()),
        "kl_uniform": kl,
        "kl_uniform_norm": kl / math.log(n_slots) if n_slots > 1 else 0.0,
        "gini": gini(counts),
        "slots_50": slots_for_mass(counts, 0.5),
        "slots_90": slots_for_mass(counts, 0.9),
        "slots_99": slots_for_mass(counts, 0.99),
    }
    if weighted_counts is not None:
        out["kl_uniform_weighted"] = kl_from_uniform(weighted_counts)
    return out


def usage_stats(indices: torch.Tensor, n_slots: int, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Memory-health metrics of one layer.

    Args:
        indices: (..., knn) slot ids from a layer's forward(s) (e.g. ``layer.last_indices``, (B, T, heads, knn)).
        n_slots: number of slots in the table.
        weights: optional (..., knn) mixing weights matching ``indices`` (for the score-weighted KL and top-1 weight).
    """
    weighted = None if weights is None else slot_counts(indices, n_slots, weights.abs())
    out = counts_stats(slot_counts(indices, n_slots), weighted)
    if weights is not None:
        out["top1_weight"] = float(weights.float().max(dim=-1).values.mean())
    return out
