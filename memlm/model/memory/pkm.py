"""Product-key memory layers: PKM (Lample et al. 2019) and Memory+ (Berges et al. 2024, "Memory Layers at Scale").

PKM: query net (Linear + norm) -> ``heads`` product-key searches -> fp32 softmax over each head's top-k scores ->
weighted sum of value rows (``value_lookup``, an EmbeddingBag in sum mode); the heads' reads are summed.
Memory+ adds the "swilu" gated output ``W_o(read * silu(W_g x))``, qk-norm, and one value pool shared by every memory
layer (each layer keeps its own query net and keys). Each part is a flag in :class:`memlm.config.MemoryConfig`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import MemoryConfig
from memlm.model.memory import cpu_kernels
from memlm.model.memory.base import MemoryLayer
from memlm.model.memory.product_keys import ProductKeys, normalize_scores
from memlm.model.memory.values import ValueTable


class QueryNet(nn.Module):
    """x (..., dim) -> query (..., heads, k_dim): a Linear, then a per-head norm.

    RMSNorm / LayerNorm are causal-safe; BatchNorm (the PKM paper's choice) mixes statistics across the batch and so
    leaks future tokens into past positions during training — only available as an explicit option.
    """

    def __init__(self, dim: int, heads: int, k_dim: int, norm: str) -> None:
        super().__init__()
        self.heads, self.k_dim, self.norm_kind = heads, k_dim, norm
        self.proj = nn.Linear(dim, heads * k_dim, bias=False)
        if norm == "rmsnorm":
            self.norm = nn.RMSNorm(k_dim, eps=1e-6)
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(k_dim)
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm1d(heads * k_dim)
        else:
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)  # (..., heads * k_dim)
        if self.norm_kind == "batchnorm":
            q = self.norm(q.reshape(-1, q.shape[-1])).view_as(q)  # statistics over all B*T tokens
            return q.unflatten(-1, (self.heads, self.k_dim))
        q = q.unflatten(-1, (self.heads, self.k_dim))  # (..., heads, k_dim)
        gain = self.norm.weight if self.norm_kind == "rmsnorm" else None
        if gain is not None and q.dtype == gain.dtype and cpu_kernels.available(q, gain):  # CPU: one pass each way
            eps = self.norm.eps if self.norm.eps is not None else torch.finfo(q.dtype).eps  # nn.RMSNorm's default
            return cpu_kernels.rms_norm(q, gain, eps)
        if self.norm_kind == "rmsnorm" and q.dtype != self.norm.weight.dtype:
            # under autocast: gain in the activations' dtype, so PyTorch's fused kernel runs instead of ~6 unfused ops
            return F.rms_norm(q, (self.k_dim,), self.norm.weight.to(q.dtype), self.norm.eps)
        return self.norm(q)


class ProductKeyMemory(MemoryLayer):
    """PKM / Memory+ layer. ``values`` is a shared :class:`ValueTable` (Memory+ pool) or None to own one."""

    def __init__(self, dim: int, cfg: MemoryConfig, values: ValueTable | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.heads, self.knn, self.n_slots = cfg.heads, cfg.knn, cfg.n_slots
        self.v_dim = cfg.v_dim or dim
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.query_dropout = nn.Dropout(cfg.query_dropout)
        self.value_dropout = nn.Dropout(cfg.value_dropout)
        self.query = QueryNet(dim, cfg.heads, cfg.k_dim, cfg.query_norm)
        self.keys = ProductKeys(cfg.heads, cfg.n_keys, cfg.k_dim, qk_norm=cfg.use_qk_norm)
        if values is None:
            self.values = ValueTable(cfg.n_slots, self.v_dim)
            self._shared = None
        else:
            if values.n_slots != cfg.n_slots or values.dim != self.v_dim:
                raise ValueError(
                    f"shared value table is {values.n_slots}x{values.dim}, layer needs {cfg.n_slots}x{self.v_dim}"
                )
            self.values = None
            object.__setattr__(self, "_shared", values)  # not registered: the model owns the shared pool
        self.gate = nn.Linear(dim, self.v_dim, bias=False) if cfg.use_gate else None
        self.out = nn.Linear(self.v_dim, dim, bias=False) if (cfg.use_gate or self.v_dim != dim) else None

    @property
    def value_table(self) -> ValueTable:
        return self.values if self.values is not None else self._shared

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> (scores, indices), each (..., heads, knn); scores are raw (before softmax)."""
        return self.keys.retrieve(self.query(x), self.knn)

    def slot_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., heads, n_keys**2): the raw score of every slot (small memories only)."""
        return self.keys.slot_scores(self.query(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_dropout(x)
        q = self.query_dropout(self.query(h))  # (B, T, heads, k_dim)
        scores, indices = self.keys.retrieve(q, self.knn)  # (B, T, heads, knn)
        weights = normalize_scores(scores, self.cfg.score_fn)  # (B, T, heads, knn) fp32
        self._record(indices, weights)
        # all heads' slots in one bag: summing the heads is part of the weighted sum
        read = self.value_table(indices.flatten(-2), weights.flatten(-2), sparse=self.cfg.sparse_grad)  # (B, T, v_dim)
        read = self.value_dropout(read)
        if self.gate is not None:
            read = read * F.silu(self.gate(x))  # Memory+ swilu
        if self.out is not None:
            read = self.out(read)  # (B, T, dim)
        return read

    def extra_repr(self) -> str:
        shared = self.values is None
        return f"kind={self.cfg.kind}, slots={self.n_slots}, knn={self.knn}, v_dim={self.v_dim}, shared_values={shared}"
