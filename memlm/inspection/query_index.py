"""Contexts nearest to a slot's key: a faiss ``IndexFlatIP`` over the queries recorded on a corpus sample.

For product-key layers (PKM, Memory+, PEER, UltraMemV2) the score of slot (i, j) for a query is an inner product:
``<[q1, q2], [K1_i, K2_j]>`` — with qk-norm, of the RMS-normalized halves, scaled by 1/sqrt(k_dim / 2). So the
recorded queries, mapped into that key space, form one index per head, and searching it with the slot's full key
(``ProductKeys.materialized``) ranks every recorded token by how strongly it scores the slot — including tokens where
the slot just missed the top-k, which answers "what is this slot about?" even for a slot the sample never read.
UltraMem scores slots through a Tucker core (not an inner product with one key) and is not supported here.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from memlm.model.memory import PEER, ProductKeyMemory, UltraMemV2


def supports(layer) -> bool:
    return isinstance(layer, (ProductKeyMemory, PEER, UltraMemV2))


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def keyspace_queries(layer, x: torch.Tensor) -> torch.Tensor:
    """x (..., dim) -> (..., heads, k_dim) float32 queries whose inner product with a materialized key is the score."""
    q = layer.query(x).float()  # (..., heads, k_dim)
    if layer.keys.qk_norm:
        q = _rms(q.unflatten(-1, (2, layer.keys.half))).flatten(-2)  # halves normalized like the keys
    return q


@torch.no_grad()
def slot_key(layer, slot: int) -> torch.Tensor:
    """(heads, k_dim) full key of ``slot`` (a value-table row id; UltraMemV2 rows are shifted by the window offset)."""
    local = slot - getattr(layer, "offset", 0)
    n = layer.keys.n_keys
    if not 0 <= local < n * n:
        raise IndexError(f"slot {slot} is not addressed by this layer")
    i, j = divmod(local, n)
    k1, k2 = layer.keys.weight[:, 0, i].float(), layer.keys.weight[:, 1, j].float()  # (heads, half) each
    if layer.keys.qk_norm:
        k1, k2 = _rms(k1) / math.sqrt(layer.keys.half), _rms(k2) / math.sqrt(layer.keys.half)
    return torch.cat([k1, k2], dim=-1)  # (heads, k_dim)


@torch.no_grad()
def nearest_queries(
    queries: torch.Tensor, key: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """queries (M, heads, k_dim), key (heads, k_dim) -> the ``top`` (token, head) pairs with the highest score:
    (token ids into M (top,), heads (top,), scores (top,)), best first. One faiss IndexFlatIP per head."""
    found = []
    for h in range(queries.shape[1]):
        index = faiss.IndexFlatIP(queries.shape[-1])
        index.add(np.ascontiguousarray(queries[:, h].numpy()))
        s, i = index.search(np.ascontiguousarray(key[h : h + 1].numpy()), min(top, queries.shape[0]))  # (1, top)
        found += [(float(sc), int(ix), h) for sc, ix in zip(s[0], i[0])]
    best: dict[int, tuple[float, int]] = {}
    for sc, ix, h in found:  # one entry per token: its best head
        if ix not in best or sc > best[ix][0]:
            best[ix] = (sc, h)
    order = sorted(best.items(), key=lambda kv: -kv[1][0])[:top]
    return (torch.tensor([ix for ix, _ in order], dtype=torch.long), torch.tensor([h for _, (_, h) in order]),
            torch.tensor([sc for _, (sc, _) in order]))  # fmt: skip
