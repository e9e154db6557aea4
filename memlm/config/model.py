"""Model and memory-layer configs (``model:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memlm.config.base import ConfigError, _require, _YamlMixin, from_dict, read_yaml

MemoryKind = Literal["pkm", "memory_plus", "ultramem", "ultramem_v2", "peer"]


@dataclass
class MemoryConfig(_YamlMixin):
    """A product-key memory layer; ``kind`` picks the variant (PKM, Memory+, UltraMem, UltraMemV2, PEER).

    ``None`` on a flag means "the default of this kind": Memory+ turns on the swilu gate, the shared value pool and
    qk-norm; plain PKM turns them off; UltraMemV2 always uses one global table and qk-norm. The resolved values are
    properties (``use_gate``, ``physical_rows``, ...), computed only here. Fields of one kind are ignored by the others:
    ``tucker_rank``/``cores``/``expansion``/``aux_*`` (UltraMem), ``pre_dim``/``pre_value_act``/``window_stride``
    (UltraMemV2), ``peer_act`` (PEER). ``skip`` applies to every kind.
    """

    kind: MemoryKind = "memory_plus"
    layers: list[int] = field(default_factory=lambda: [1])  # block indices that get a memory layer
    mode: Literal["replace", "parallel"] = "replace"  # replace the block's FFN, or add beside it
    n_keys: int = 32  # rows per sub-key table; the memory has n_keys**2 slots
    heads: int = 4
    knn: int = 8  # slots selected per head (and candidates per half)
    k_dim: int = 64  # query / key width (split in two halves)
    v_dim: int | None = None  # value width; None -> model dim
    query_norm: Literal["rmsnorm", "layernorm", "batchnorm", "none"] = "rmsnorm"  # batchnorm leaks across a batch
    score_fn: Literal["softmax", "relu", "raw"] = "softmax"
    gated: bool | None = None  # Memory+ swilu: out = W_o(values * silu(W_g x))
    shared_values: bool | None = None  # one value pool for all memory layers (Memory+)
    qk_norm: bool | None = None
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    sparse_grad: bool = False  # value table gradient as a sparse tensor (for SparseAdam / row-sparse updates)
    # multi-process training: "dim" shards every value table by columns over the ranks (memory parallelism,
    # memlm/model/memory/parallel.py; no-op with one process); "none" keeps a full table per rank (DDP all-reduce)
    parallel: Literal["none", "dim"] = "none"
    skip: int = 0  # skip-layer: memory of block i reads block i's input, its output is added after block i + skip
    # UltraMem (Huang et al. 2024): Tucker core, multi-core scoring, implicit value expansion
    tucker_rank: int = 2  # r: rank of each r x r Tucker core C (TDQKR)
    cores: int = 2  # h: MCS cores; each core's score weights its own 1/h slice of the value vector
    expansion: int = 4  # E: IVE virtual slots per physical value row (n_keys**2 virtual, n_keys**2 / E physical)
    aux_alpha: float = 0.001  # weight of the core regularizer alpha * sum relu(sigma_i - tau)**2 (non-leading sigma)
    aux_tau: float = 0.15
    # UltraMemV2 (2025): PEER-style pre-values and one global value table read through per-layer windows
    pre_dim: int = 32  # width of the per-slot pre-value p_i
    pre_value_act: Literal["gelu", "silu", "relu", "sigmoid"] = "gelu"  # weight = score * act(<p_i, W_pre x>)
    window_stride: int | None = None  # row offset between consecutive layers' windows; None -> n_slots (disjoint)
    # PEER (He 2024): single-neuron experts
    peer_act: Literal["gelu", "silu", "relu", "sigmoid"] = "gelu"

    def __post_init__(self) -> None:
        _require(self.n_keys > 0, f"memory.n_keys must be > 0, got {self.n_keys}")
        _require(self.heads > 0, f"memory.heads must be > 0, got {self.heads}")
        _require(self.knn > 0, f"memory.knn must be > 0, got {self.knn}")
        _require(
            self.knn <= self.n_keys,
            f"memory.knn ({self.knn}) must be <= memory.n_keys ({self.n_keys}): top-k per half needs knn sub-keys",
        )
        _require(
            self.k_dim > 0 and self.k_dim % 2 == 0, f"memory.k_dim must be a positive even number, got {self.k_dim}"
        )
        _require(self.v_dim is None or self.v_dim > 0, f"memory.v_dim must be > 0, got {self.v_dim}")
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"memory.{name} must be in [0, 1), got {v}")
        _require(len(set(self.layers)) == len(self.layers), f"memory.layers has duplicates: {self.layers}")
        _require(self.skip >= 0, f"memory.skip must be >= 0, got {self.skip}")
        _require(self.tucker_rank > 0, f"memory.tucker_rank must be > 0, got {self.tucker_rank}")
        _require(self.cores > 0, f"memory.cores must be > 0, got {self.cores}")
        _require(self.expansion > 0, f"memory.expansion must be > 0, got {self.expansion}")
        _require(self.aux_alpha >= 0, f"memory.aux_alpha must be >= 0, got {self.aux_alpha}")
        _require(self.aux_tau >= 0, f"memory.aux_tau must be >= 0, got {self.aux_tau}")
        _require(self.pre_dim > 0, f"memory.pre_dim must be > 0, got {self.pre_dim}")
        _require(
            self.window_stride is None or self.window_stride >= 0,
            f"memory.window_stride must be >= 0, got {self.window_stride}",
        )
        if self.kind == "ultramem":
            _require(
                self.n_slots % self.expansion == 0,
                f"memory.expansion ({self.expansion}) must divide the n_keys**2 = {self.n_slots} virtual slots",
            )
            _require(
                not (self.sparse_grad and self.cores > 1),
                "memory.sparse_grad is not supported with memory.cores > 1 (the value table is read in core slices)",
            )
        if self.kind in ("ultramem", "ultramem_v2", "peer"):
            _require(not self.gated, f"memory.gated: the swilu gate is a Memory+ option, not available for {self.kind}")
        if self.kind in ("ultramem", "peer"):
            _require(not self.shared_values, f"memory.shared_values: {self.kind} layers own their tables")

    # derived values: one place
    @property
    def n_slots(self) -> int:
        return self.n_keys**2

    @property
    def half_dim(self) -> int:
        return self.k_dim // 2

    @property
    def use_gate(self) -> bool:
        return self.gated if self.gated is not None else self.kind == "memory_plus"

    @property
    def use_shared_values(self) -> bool:
        """Memory+ shares one pool; UltraMemV2 always reads one global table (through per-layer windows)."""
        if self.kind == "ultramem_v2":
            return True
        return self.shared_values if self.shared_values is not None else self.kind == "memory_plus"

    @property
    def use_qk_norm(self) -> bool:
        return self.qk_norm if self.qk_norm is not None else self.kind in ("memory_plus", "ultramem_v2")

    @property
    def value_expansion(self) -> int:
        """IVE factor E (UltraMem only; every other kind reads its rows directly)."""
        return self.expansion if self.kind == "ultramem" else 1

    @property
    def physical_rows(self) -> int:
        """Rows of one layer's value table: n_keys**2 / E for UltraMem (IVE), n_keys**2 otherwise."""
        return self.n_slots // self.value_expansion

    @property
    def window_step(self) -> int:
        """UltraMemV2: row offset between consecutive memory layers' windows of the global table."""
        return self.n_slots if self.window_stride is None else self.window_stride

    def global_rows(self) -> int:
        """UltraMemV2: rows of the global value table (the windows of all memory layers)."""
        return self.window_step * (len(self.layers) - 1) + self.n_slots


@dataclass
class ModelConfig(_YamlMixin):
    """A decoder-only transformer, optionally with memory layers in some blocks."""

    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None -> n_heads
    ffn_hidden: int | None = None  # None -> 8/3 * dim rounded up to a multiple of 32 (SwiGLU)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    memory: MemoryConfig | None = None

    def __post_init__(self) -> None:
        _require(self.vocab_size > 0, f"model.vocab_size must be > 0, got {self.vocab_size}")
        _require(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "model.dim, n_layers, n_heads must be > 0")
        _require(
            self.dim % self.n_heads == 0, f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
        )
        _require(
            self.head_dim % 2 == 0, f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings"
        )
        _require(
            self.n_heads % self.kv_heads == 0,
            f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})",
        )
        _require(self.max_seq_len > 0, f"model.max_seq_len must be > 0, got {self.max_seq_len}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.memory is not None:
            mem = self.memory
            for i in mem.layers:
                _require(
                    0 <= i < self.n_layers,
                    f"memory.layers: index {i} is out of range for model.n_layers={self.n_layers}",
                )
                _require(
                    i + mem.skip < self.n_layers,
                    f"memory.skip: layer {i} + skip {mem.skip} is past the last block (model.n_layers={self.n_layers})",
                )
            if mem.kind == "ultramem":
                _require(
                    self.value_dim % mem.cores == 0,
                    f"memory.v_dim ({self.value_dim}) must be divisible by memory.cores ({mem.cores})",
                )
            if mem.kind == "peer":
                _require(
                    mem.v_dim is None or mem.v_dim == self.dim,
                    f"memory.v_dim must be unset or equal model.dim ({self.dim}) for PEER (experts write to dim)",
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 32 * ((int(8 * self.dim / 3) + 31) // 32)

    @property
    def value_dim(self) -> int:
        """Value width: ``memory.v_dim``, else dim (PKM, Memory+, PEER) or dim / 2 (UltraMem, V2: half value dim)."""
        assert self.memory is not None
        if self.memory.v_dim:
            return self.memory.v_dim
        return self.dim // 2 if self.memory.kind in ("ultramem", "ultramem_v2") else self.dim

    def memory_layers(self) -> list[int]:
        return list(self.memory.layers) if self.memory is not None else []


def load(path: str | Path) -> ModelConfig:
    """Load a model config from YAML. Accepts a bare model mapping or a run config with a ``model:`` section."""
    data = read_yaml(path)
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    try:
        return from_dict(ModelConfig, data, prefix="model")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
