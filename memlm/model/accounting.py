"""Parameter and FLOP accounting from a config alone (no model is built, so 1M-slot configs cost nothing).

Conventions (stated so numbers can be compared):
- ``total``: every parameter, tied embeddings counted once. Equals ``sum(p.numel())`` of the built model (tested).
- ``active``: parameters touched per token: ``total`` minus the value rows a token does not read
  (a memory layer reads heads * knn rows). A dense model has active == total.
- FLOPs per token, forward pass: 2 per multiply-accumulate of every matmul (including the LM head; the input
  embedding lookup is free), attention scores + mixing 2 * 2 * n_layers * ctx * dim (Kaplan et al.; no causal
  discount), memory: query net, both sub-key score tables (2 * heads * n_keys * k_dim), the knn x knn candidate sums,
  the weighted read (2 * heads * knn * v_dim), gate and output projection; UltraMem adds the r row/column queries,
  the rank-1 marginals, the Tucker rescoring of the (2 knn)^2 candidate grid, per-core scores (MCS) and the E group
  bags + Linear(E * v_dim -> dim) (IVE) as implemented; UltraMemV2 adds W_pre and the pre-value dots; PEER counts the
  <u_i, x> dots and the read of v_i. Norms, activations and top-k selections are not counted. Training ~ 3x forward.
"""

from __future__ import annotations

import dataclasses

from memlm.config import ModelConfig


def _memory_parts(cfg: ModelConfig) -> dict[str, int]:
    """Per memory layer: ``dense`` (query net, keys, cores, projections), ``own_tables`` (tables the layer owns),
    ``read`` (table entries read per token); model-level ``shared_tables`` (Memory+ pool, UltraMemV2 global tables)."""
    mem, dim, v = cfg.memory, cfg.dim, cfg.value_dim
    norm = {"rmsnorm": mem.k_dim, "layernorm": 2 * mem.k_dim, "batchnorm": 2 * mem.heads * mem.k_dim, "none": 0}
    keys = mem.heads * mem.n_keys * mem.k_dim
    reads = mem.heads * mem.knn  # rows read per token
    if mem.kind == "ultramem":
        r, E = mem.tucker_rank, mem.value_expansion
        nq = mem.heads * r  # r row/column queries per head
        norm_q = {"rmsnorm": mem.k_dim, "layernorm": 2 * mem.k_dim, "batchnorm": 2 * nq * mem.k_dim, "none": 0}
        dense = dim * nq * mem.k_dim + norm_q[mem.query_norm] + keys + mem.heads * mem.cores * r * r + E * v * dim
        return {"dense": dense, "own_tables": mem.physical_rows * v, "read": reads * v, "shared_tables": 0}
    query = dim * mem.heads * mem.k_dim + norm[mem.query_norm]
    if mem.kind == "ultramem_v2":
        dense = query + keys + dim * mem.pre_dim + v * dim
        shared = mem.global_rows() * (v + mem.pre_dim)
        return {"dense": dense, "own_tables": 0, "read": reads * (v + mem.pre_dim), "shared_tables": shared}
    if mem.kind == "peer":
        return {"dense": query + keys, "own_tables": 2 * mem.n_slots * dim, "read": reads * 2 * dim, "shared_tables": 0}
    gate = dim * v if mem.use_gate else 0
    out = v * dim if (mem.use_gate or v != dim) else 0
    shared = mem.n_slots * v if mem.use_shared_values else 0
    own = 0 if mem.use_shared_values else mem.n_slots * v
    return {"dense": query + keys + gate + out, "own_tables": own, "read": reads * v, "shared_tables": shared}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: embedding, attention, ffn, norms, memory (non-table), memory tables, total, active.

    Memory tables are every table read a few rows per token: values, PEER's input experts, UltraMemV2's pre-values.
    """
    dim, L = cfg.dim, cfg.n_layers
    attn = L * (2 * dim * cfg.n_heads * cfg.head_dim + 2 * dim * cfg.kv_heads * cfg.head_dim)
    mem_layers = cfg.memory_layers()
    replaced = len(mem_layers) if (cfg.memory is not None and cfg.memory.mode == "replace") else 0
    ffn = (L - replaced) * 3 * dim * cfg.hidden_dim
    norms = (2 * L + 1) * dim
    emb = cfg.vocab_size * dim * (1 if cfg.tie_embeddings else 2)
    mem_other = values = values_read = 0
    if cfg.memory is not None:
        parts = _memory_parts(cfg)
        mem_other = len(mem_layers) * parts["dense"]
        values = len(mem_layers) * parts["own_tables"] + parts["shared_tables"]
        values_read = len(mem_layers) * parts["read"]
        if cfg.memory.skip > 0 and cfg.memory.mode == "parallel":
            norms += len(mem_layers) * dim  # the skip-layer memory's own input norm (replace: it takes the FFN's)
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


def memory_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of ONE memory layer (see the module docstring for the conventions)."""
    mem, dim, v = cfg.memory, cfg.dim, cfg.value_dim
    h, k, n = mem.heads, mem.knn, mem.n_keys
    if mem.kind == "ultramem":
        r, E = mem.tucker_rank, mem.value_expansion
        c = n if 2 * k >= n else 2 * k  # signed candidates per half (top-k and bottom-k)
        f = 2 * dim * h * r * mem.k_dim  # query net (r row/column queries per head)
        f += 2 * h * r * n * mem.k_dim  # row and column scores, r each
        f += 2 * 2 * h * n * r  # rank-1 marginals u . s_row, v . s_col
        f += h * (2 * c * r * r + 2 * c * c * r)  # exact rescoring of the c x c candidate grid with the summed core
        f += h * mem.cores * k * (2 * r * r + 2 * r)  # each core's score at the selected slots (MCS)
        f += 2 * E * h * k * v  # weighted read: E group bags x cores slices, every row read once per group
        f += 2 * E * v * dim  # Linear(E * v_dim -> dim)
        return f
    f = 2 * dim * h * mem.k_dim  # query net
    f += 2 * h * n * mem.k_dim  # both halves' sub-key scores
    f += h * k * k  # candidate sums
    if mem.kind == "ultramem_v2":
        f += 2 * dim * mem.pre_dim + 2 * h * k * mem.pre_dim  # W_pre x and the pre-value dots
        f += 2 * h * k * v + 2 * v * dim  # weighted read, value projection
        return f
    if mem.kind == "peer":
        return f + 2 * h * k * dim * 2  # <u_i, x> dots and the weighted read of v_i
    f += 2 * h * k * v  # weighted read
    f += (2 * dim * v if mem.use_gate else 0) + (2 * v * dim if (mem.use_gate or v != dim) else 0)
    return f


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
        f += len(mem_layers) * memory_flops_per_token(cfg)
    return f


def dense_matched_config(cfg: ModelConfig, seq_len: int | None = None, multiple_of: int = 8) -> ModelConfig:
    """The dense baseline (no memory) whose forward FLOPs per token match ``cfg``, by widening every block's FFN."""
    dense = dataclasses.replace(cfg, memory=None, ffn_hidden=multiple_of)
    base = flops_per_token(dense, seq_len) - cfg.n_layers * 2 * 3 * cfg.dim * multiple_of
    hidden = (flops_per_token(cfg, seq_len) - base) / (cfg.n_layers * 2 * 3 * cfg.dim)
    hidden = max(multiple_of, multiple_of * round(hidden / multiple_of))
    return dataclasses.replace(cfg, memory=None, ffn_hidden=int(hidden))
