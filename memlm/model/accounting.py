"""Parameter and FLOP accounting from a config alone (no model is built, so 1M-slot configs cost nothing).

Conventions (stated so numbers can be compared):
- ``total``: every parameter, tied embeddings counted once. Equals ``sum(p.numel())`` of the built model (tested).
- ``active``: parameters touched per token: ``total`` minus the value rows a token does not read
  (a memory layer reads heads * knn rows). A dense model has active == total.
- FLOPs per token, forward pass: 2 per multiply-accumulate of every matmul (including the LM head; the input
  embedding lookup is free), attention scores + mixing 2 * 2 * n_layers * ctx * dim (Kaplan et al.; no causal
  discount), memory: query net, both sub-key score tables (2 * heads * n_keys * k_dim), the knn x knn candidate sums,
  the weighted read (2 * heads * knn * v_dim), gate and output projection. Training ~ 3x forward.
"""

from __future__ import annotations

import dataclasses

from memlm.config import ModelConfig


def _memory_layer_params(cfg: ModelConfig) -> dict[str, int]:
    mem, dim = cfg.memory, cfg.dim
    v = cfg.value_dim
    norm = {"rmsnorm": mem.k_dim, "layernorm": 2 * mem.k_dim, "batchnorm": 2 * mem.heads * mem.k_dim, "none": 0}
    out = {
        "query": dim * mem.heads * mem.k_dim + norm[mem.query_norm],
        "keys": mem.heads * mem.n_keys * mem.k_dim,
        "gate": dim * v if mem.use_gate else 0,
        "out": v * dim if (mem.use_gate or v != dim) else 0,
        "values": 0 if mem.use_shared_values else mem.n_slots * v,
    }
    return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: embedding, attention, ffn, norms, memory (non-value), values, total, active."""
    dim, L = cfg.dim, cfg.n_layers
    attn = L * (2 * dim * cfg.n_heads * cfg.head_dim + 2 * dim * cfg.kv_heads * cfg.head_dim)
    mem_layers = cfg.memory_layers()
    replaced = len(mem_layers) if (cfg.memory is not None and cfg.memory.mode == "replace") else 0
    ffn = (L - replaced) * 3 * dim * cfg.hidden_dim
    norms = (2 * L + 1) * dim
    emb = cfg.vocab_size * dim * (1 if cfg.tie_embeddings else 2)
    mem_other = values = values_read = 0
    if cfg.memory is not None:
        per = _memory_layer_params(cfg)
        mem_other = len(mem_layers) * (per["query"] + per["keys"] + per["gate"] + per["out"])
        values = len(mem_layers) * per["values"] + (
            cfg.memory.n_slots * cfg.value_dim if cfg.memory.use_shared_values else 0
        )
        values_read = len(mem_layers) * cfg.memory.heads * cfg.memory.knn * cfg.value_dim
    total = emb + attn + ffn + norms + mem_other + values
    return {
        "embedding": emb,
        "attention": attn,
        "ffn": ffn,
        "norms": norms,
        "memory_other": mem_other,
        "memory_values": values,
        "total": total,
        "active": total - values + min(values, values_read),
        "non_embedding": total - cfg.vocab_size * dim,
    }


def active_params(cfg: ModelConfig) -> int:
    return param_counts(cfg)["active"]


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token at context ``seq_len`` (default ``max_seq_len``)."""
    ctx = seq_len or cfg.max_seq_len
    dim, L = cfg.dim, cfg.n_layers
    mem_layers = cfg.memory_layers()
    replaced = len(mem_layers) if (cfg.memory is not None and cfg.memory.mode == "replace") else 0
    f = L * 2 * (2 * dim * cfg.n_heads * cfg.head_dim + 2 * dim * cfg.kv_heads * cfg.head_dim)  # qkvo projections
    f += L * 2 * 2 * ctx * dim  # attention scores and mixing
    f += (L - replaced) * 2 * 3 * dim * cfg.hidden_dim  # SwiGLU
    f += 2 * dim * cfg.vocab_size  # LM head
    if cfg.memory is not None:
        mem, v = cfg.memory, cfg.value_dim
        per = 2 * dim * mem.heads * mem.k_dim  # query net
        per += 2 * mem.heads * mem.n_keys * mem.k_dim  # both halves' sub-key scores
        per += mem.heads * mem.knn * mem.knn  # candidate sums
        per += 2 * mem.heads * mem.knn * v  # weighted read
        per += (2 * dim * v if mem.use_gate else 0) + (2 * v * dim if (mem.use_gate or v != dim) else 0)
        f += len(mem_layers) * per
    return f


def dense_matched_config(cfg: ModelConfig, seq_len: int | None = None, multiple_of: int = 8) -> ModelConfig:
    """The dense baseline (no memory) whose forward FLOPs per token match ``cfg``, by widening every block's FFN."""
    dense = dataclasses.replace(cfg, memory=None, ffn_hidden=multiple_of)
    base = flops_per_token(dense, seq_len) - cfg.n_layers * 2 * 3 * cfg.dim * multiple_of
    hidden = (flops_per_token(cfg, seq_len) - base) / (cfg.n_layers * 2 * 3 * cfg.dim)
    hidden = max(multiple_of, multiple_of * round(hidden / multiple_of))
    return dataclasses.replace(cfg, memory=None, ffn_hidden=int(hidden))
