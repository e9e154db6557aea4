"""PEER (He 2024, "Mixture of A Million Experts"): parameter-efficient expert retrieval.

N = n_keys**2 single-neuron experts (u_i, v_i), both of width dim. Each of ``heads`` query nets retrieves its top-knn
experts through the shared product-key routine; output = sum over heads and selected experts of
``softmax(score)_i * act(<u_i, x>) * v_i``.

Both expert halves are tables read a few rows per token:
- v side: the weights ``softmax * act(<u_i, x>)`` go through ONE ``value_lookup`` call over all heads' experts.
- u side: the dots <u_i, x> go through ``row_dot`` (values.py): the (B, T, heads * knn, dim) gathered rows exist only
  inside its forward; backward gets grad x from ``value_lookup(u, idx, grad)`` and scatters ``grad * x`` into u's
  rows, so no (B, T, heads, knn, dim) activation is kept for backward. (A fused gather-dot kernel would also avoid the
  transient gather; not written here.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memlm.config import MemoryConfig
from memlm.model.memory.base import MemoryLayer
from memlm.model.memory.pkm import QueryNet
from memlm.model.memory.product_keys import ProductKeys, normalize_scores
from memlm.model.memory.ultramem_v2 import ACTIVATIONS
from memlm.model.memory.values import ValueTable, row_dot, value_lookup


class PEER(MemoryLayer):
    """PEER layer; ``value_table`` is the output-expert table v (the one SMF updates); ``down`` holds the u_i."""

    def __init__(self, dim: int, cfg: MemoryConfig) -> None:
        super().__init__()
        self.cfg, self.dim = cfg, dim
        self.heads, self.knn, self.n_slots = cfg.heads, cfg.knn, cfg.n_slots
        self.act = ACTIVATIONS[cfg.peer_act]
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.query_dropout = nn.Dropout(cfg.query_dropout)
        self.value_dropout = nn.Dropout(cfg.value_dropout)
        self.query = QueryNet(dim, cfg.heads, cfg.k_dim, cfg.query_norm)
        self.keys = ProductKeys(cfg.heads, cfg.n_keys, cfg.k_dim, qk_norm=cfg.use_qk_norm)
        self.down = ValueTable(cfg.n_slots, dim)  # u_i: N(0, 1/dim), so <u_i, x> ~ N(0, 1) for a normalized x
        self.up = ValueTable(cfg.n_slots, dim)  # v_i

    @property
    def value_table(self) -> ValueTable:
        return self.up

    def sparse_tables(self) -> list[nn.Module]:
        return [self.up, self.down]

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> (raw scores, expert ids), each (..., heads, knn)."""
        return self.keys.retrieve(self.query(x), self.knn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_dropout(x)
        q = self.query_dropout(self.query(h))  # (B, T, heads, k_dim)
        scores, idx = self.keys.retrieve(q, self.knn)  # (B, T, heads, knn)
        gate = normalize_scores(scores, self.cfg.score_fn)  # (B, T, heads, knn) softmax per head
        lead = idx.shape[:-2]
        flat = idx.reshape(*lead, self.heads * self.knn)  # (B, T, M)
        z = row_dot(self.down.weight, flat, h, sparse=self.cfg.sparse_grad)  # (B, T, M) = <u_i, x>
        w = gate.reshape(*lead, -1) * self.act(z.float())  # (B, T, M)
        self._record(idx, w.view_as(gate))
        out = value_lookup(self.up.weight, flat, w, sparse=self.cfg.sparse_grad)  # (B, T, dim)
        return self.value_dropout(out)

    def extra_repr(self) -> str:
        return f"experts={self.n_slots}, heads={self.heads}, knn={self.knn}, act={self.cfg.peer_act}"
