"""Typed configuration: dataclasses are the schema, YAML and the command line fill them in.

Precedence is defaults < YAML files (merged in order) < dotted command-line overrides (``--model.dim=64``).
Every unknown key or wrongly typed value raises :class:`ConfigError` naming the full dotted key, so a typo in a YAML
file never silently falls back to a default. Derived values (number of slots, head dims, ...) are properties computed
in exactly one place, and cross-field checks run in ``__post_init__`` so a bad config fails when it is built.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the offending key."""


# ----------------------------------------------------------------------------------------------------------------------
# generic dict <-> dataclass machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursively), returning the converted value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the informative one
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 / 3e30 (no dot) as strings; they are meant as numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and wrong types by their dotted name."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid keys: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (YAML-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--model.dim=64", "--train.seed", "3"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '{arg}' has no value: write --{body}=VALUE")
            key, raw = body, args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{arg}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
        i += 1
    return out


class _YamlMixin:
    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return from_dict(cls, read_yaml(path), prefix="")

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(to_dict(self), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------------------------------------------------
# model

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


# ----------------------------------------------------------------------------------------------------------------------
# data  (DataConfig lives here; owned by the data layer, memlm/data/)

SourceKind = Literal["text", "jsonl", "parquet", "hf", "worldfacts", "wiki"]


@dataclass
class SourceConfig(_YamlMixin):
    """One corpus source. ``weight`` repeats it in a mixture (2.0 = every document twice, 0.5 = a seeded half)."""

    kind: SourceKind = "wiki"
    path: str | None = None  # file / dir / glob (text, jsonl, parquet); dataset name or local dir (hf); wiki: json/whl
    name: str | None = None  # hf config name
    split: str | None = None  # hf split (default "train"); worldfacts: pretrain | heldout | all (default pretrain)
    text_field: str = "text"  # column holding the text (jsonl, parquet, hf)
    weight: float = 1.0
    limit: int | None = None  # keep at most this many documents (before weighting)

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"data.sources: weight must be > 0, got {self.weight}")
        _require(self.limit is None or self.limit > 0, f"data.sources: limit must be > 0, got {self.limit}")
        needs_path = self.kind in ("text", "jsonl", "parquet", "hf")
        _require(not needs_path or bool(self.path), f"data.sources: a '{self.kind}' source needs a path")


@dataclass
class TokenizerConfig(_YamlMixin):
    """SentencePiece tokenizer: trained on the corpus (cached by corpus hash) unless ``path`` names a trained one."""

    vocab_size: int = 4096
    model_type: Literal["unigram", "bpe"] = "unigram"
    path: str | None = None  # a saved tokenizer dir or .model file; never retrained
    input_sentence_size: int = 300_000  # lines sampled for training (keeps training fast)
    character_coverage: float = 0.9995

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 260, f"data.tokenizer.vocab_size must be >= 260 (byte fallback): {self.vocab_size}")
        _require(0.9 <= self.character_coverage <= 1.0, "data.tokenizer.character_coverage must be in [0.9, 1]")


@dataclass
class FactsConfig(_YamlMixin):
    """The worldfacts fact set and its pretrain / heldout split."""

    groups: list[str] = field(default_factory=lambda: ["countries", "cities", "elements"])
    heldout_fraction: float = 0.1
    seed: int = 0
    min_city_population: int = 500_000

    def __post_init__(self) -> None:
        _require(0.0 <= self.heldout_fraction < 1.0, "data.facts.heldout_fraction must be in [0, 1)")
        bad = [g for g in self.groups if g not in ("countries", "cities", "elements")]
        _require(not bad, f"data.facts.groups: unknown group(s) {bad}; choose from countries, cities, elements")


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="wiki"), SourceConfig(kind="worldfacts", weight=2.0)]


@dataclass
class DataConfig(_YamlMixin):
    """Pretraining data: a (weighted) mixture of sources, its tokenizer, and the packed train/val split."""

    sources: list[SourceConfig] = field(default_factory=_default_sources)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    val_fraction: float = 0.02  # of documents, chosen by a seeded shuffle
    seed: int = 0
    num_workers: int = 0
    shuffle: bool = True  # shuffle training sequences (seeded); false gives a fixed order (e.g. DDP parity checks)
    cache_dir: str | None = None  # None -> $MEMLM_CACHE or ~/.cache/memlm
    on_error: Literal["raise", "skip"] = "raise"  # skip = drop bad rows with a counted warning

    def __post_init__(self) -> None:
        _require(len(self.sources) > 0, "data.sources must list at least one source")
        _require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")



# ----------------------------------------------------------------------------------------------------------------------
# optimization and training  (owned by memlm/training/)


@dataclass
class OptimConfig(_YamlMixin):
    """AdamW with warmup + cosine; memory values in their own group (own lr and schedule, no weight decay)."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm of the non-value parameters
    value_grad_clip: float | None = 1.0  # values clipped separately (Memory+)
    value_lr: float | None = None  # fixed value lr (Memory+ / PKM use 1e-3); None -> lr * value_lr_mult
    value_lr_mult: float = 1.0
    value_lr_decay_to: float | None = None  # UltraMem: value lr multiplier decays linearly value_lr_mult -> this
    value_schedule: Literal["follow", "constant"] = "follow"  # follow the base warmup+cosine, or constant after warmup
    # "row_sparse_adam": the value tables get sparse gradients and a lazy Adam step that touches only the rows read in
    # the step (no weight decay), so step time does not grow with the table; "adamw": one dense AdamW for everything
    value_optimizer: Literal["adamw", "row_sparse_adam"] = "adamw"

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two numbers in [0, 1)"
        )
        _require(self.value_lr is None or self.value_lr > 0, f"optim.value_lr must be > 0, got {self.value_lr}")
        _require(self.value_lr_mult > 0, f"optim.value_lr_mult must be > 0, got {self.value_lr_mult}")


@dataclass
class TrainConfig(_YamlMixin):
    """What the launcher does around the Lightning Trainer."""

    seed: int = 0
    batch_size: int = 16
    seq_len: int | None = None  # None -> model.max_seq_len
    run_dir: str = "runs"
    name: str = "tiny"
    compile: bool = False  # torch.compile the model
    stats_every: int = 50  # memory usage statistics + histogram every N steps
    checkpoint_every: int = 200  # Lightning checkpoint (last.ckpt) every N steps
    export: bool = True  # write an export dir (safetensors + config + tokenizer) at the end
    probe_facts: int = 200  # pretraining facts probed for recall at the end (0 = skip)
    # a NaN/inf loss or gradient: stop the run naming the step (exit code 2), or skip that optimizer step
    on_nonfinite: Literal["stop", "skip"] = "stop"

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _require(self.seq_len is None or self.seq_len > 1, f"train.seq_len must be > 1, got {self.seq_len}")
        _require(self.stats_every > 0 and self.checkpoint_every > 0, "train.stats_every/checkpoint_every must be > 0")


def _default_trainer() -> dict[str, Any]:
    return {"max_steps": 600, "val_check_interval": 200, "log_every_n_steps": 10, "limit_val_batches": 20}


@dataclass
class RunConfig(_YamlMixin):
    """A whole training run: each component receives only its own section. ``trainer`` holds Lightning Trainer
    arguments (validated against ``lightning.Trainer``'s signature)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: dict[str, Any] = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        import inspect

        from lightning import Trainer

        valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
        for k in self.trainer:
            _require(k in valid, f"unknown config key 'trainer.{k}' (not a lightning.Trainer argument)")
        seq = self.train.seq_len or self.model.max_seq_len
        _require(
            seq <= self.model.max_seq_len,
            f"train.seq_len ({seq}) must be <= model.max_seq_len ({self.model.max_seq_len})",
        )

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len


def _merge_layers(paths: list[str | Path] | None, overrides: list[str] | dict | None) -> dict[str, Any]:
    """YAML files (merged in order), then overrides. A ``model:`` given as a string (in a YAML, or ``--model=FILE``)
    names a model YAML (relative to the including file or the working directory) that replaces the model section."""
    layers: list[tuple[dict[str, Any], Path]] = [(read_yaml(p), Path(p).parent) for p in paths or []]
    if isinstance(overrides, dict):
        layers.append((overrides, Path.cwd()))
    elif overrides:
        named = [a for a in overrides if a.startswith("--model=")]  # a model file first, field overrides on top
        layers += [({"model": a.split("=", 1)[1]}, Path.cwd()) for a in named]
        layers.append((parse_overrides([a for a in overrides if a not in named]), Path.cwd()))
    data: dict[str, Any] = {}
    for layer, base in layers:
        ref = layer.get("model")
        if isinstance(ref, str):
            path = Path(ref) if Path(ref).is_file() or Path(ref).is_absolute() else base / ref
            layer = {**layer, "model": read_yaml(path)}
            data.pop("model", None)  # a named model file replaces the model section instead of merging into it
        data = deep_merge(data, layer)
    return data


def load_run_config(paths: list[str | Path] | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """defaults < YAML files (merged in order) < overrides (``--a.b=c`` strings or a nested dict)."""
    data = _merge_layers(paths, overrides)
    if "trainer" in data:  # trainer args merge over the defaults instead of replacing them
        data["trainer"] = deep_merge(_default_trainer(), data["trainer"] or {})
    return from_dict(RunConfig, data)


# ----------------------------------------------------------------------------------------------------------------------
# finetune (owned by memlm/continual/)

FinetuneMethod = Literal["sparse_memory", "full", "lora", "memory_only"]
# optimizer and lr of each method when the config leaves them unset (SMF paper: SGD, lr 2.0, no weight decay)
METHOD_OPTIM_DEFAULTS: dict[str, tuple[str, float]] = {
    "sparse_memory": ("sgd", 2.0),
    "full": ("adamw", 1e-4),
    "lora": ("adamw", 1e-3),
    "memory_only": ("adam", 1e-3),
}


@dataclass
class FTOptimConfig(_YamlMixin):
    """Optimizer of a finetuning method. Sparse memory finetuning allows only ``sgd`` or ``adam`` (row-sparse, lazy)
    without weight decay: anything else would move rows that were not selected."""

    name: Literal["sgd", "adam", "adamw"] | None = None  # None -> the method's default (METHOD_OPTIM_DEFAULTS)
    lr: float | None = None  # None -> the method's default
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = None  # global norm over the trainable parameters (not with sparse_memory)
    per_row_step: bool = True  # sparse_memory + adam: bias correction by each row's own update count

    def __post_init__(self) -> None:
        _require(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two numbers in [0, 1)"
        )
        _require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class SMFConfig(_YamlMixin):
    """Sparse memory finetuning (Lin et al. 2025): background document frequencies and per-batch top-t slots."""

    top_t: int = 500  # value rows trainable per step (per value table)
    ranking: Literal["tfidf", "kl"] = "tfidf"
    answer_only: bool = False  # count slot accesses only at answer tokens
    background_batches: int = 200  # pretraining batches the background statistics are counted over
    background_batch_size: int = 16
    background_seq_len: int | None = None  # None -> model.max_seq_len
    background_data: DataConfig | None = None  # None -> the checkpoint's own pretraining data config
    background_path: str | None = None  # None -> beside the checkpoint
    recompute_background: bool = False

    def __post_init__(self) -> None:
        _require(self.top_t > 0, f"smf.top_t must be > 0, got {self.top_t}")
        _require(self.background_batches > 0, f"smf.background_batches must be > 0, got {self.background_batches}")
        _require(self.background_batch_size > 0, "smf.background_batch_size must be > 0")
        _require(
            self.background_seq_len is None or self.background_seq_len > 1,
            f"smf.background_seq_len must be > 1, got {self.background_seq_len}",
        )


@dataclass
class LoraFTConfig(_YamlMixin):
    """LoRA through ``peft`` on the attention / FFN projections (module-name suffixes of MemLM)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])

    def __post_init__(self) -> None:
        _require(self.rank > 0, f"lora.rank must be > 0, got {self.rank}")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _require(len(self.targets) > 0, "lora.targets must name at least one module")


@dataclass
class StreamConfig(_YamlMixin):
    """The new-fact stream: QA pairs rendered by templates, split into ``stages`` sequential stages."""

    dataset: str = "triviaqa"  # a name memlm.data.qa.load_qa knows, or a local .jsonl / .csv QA file
    split: str | None = "validation"
    offset: int = 0  # skip this many rows first (pick a disjoint block of facts)
    stages: int = 3
    facts_per_stage: int = 50
    repetitions: int = 10  # each (fact, template) text is seen this many times per stage
    max_answer_words: int | None = 4  # keep facts whose first answer is short (None = all)
    templates: list[str] = field(
        default_factory=lambda: [
            "Question: {question}\nAnswer: {answer}",
            "{question} The answer is {answer}.",
            'The answer to "{question}" is {answer}.',
        ]
    )
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.stages > 0, f"stream.stages must be > 0, got {self.stages}")
        _require(self.facts_per_stage > 0, f"stream.facts_per_stage must be > 0, got {self.facts_per_stage}")
        _require(self.repetitions > 0, f"stream.repetitions must be > 0, got {self.repetitions}")
        _require(self.offset >= 0, f"stream.offset must be >= 0, got {self.offset}")
        _require(len(self.templates) > 0, "stream.templates must list at least one template")
        for t in self.templates:
            _require(
                "{question}" in t and "{answer}" in t,
                f"stream.templates: {t!r} must contain {{question}} and {{answer}}",
            )


@dataclass
class FTTrainConfig(_YamlMixin):
    """The finetuning loop (plain PyTorch)."""

    batch_size: int = 16
    loss_on: Literal["all", "answer"] = "all"  # train on every token of the text, or only the answer's
    steps_per_stage: int | None = None  # None -> one pass over the stage's (repeated) examples
    seed: int = 0
    device: str = "auto"  # auto -> cuda when available, else cpu
    log_every: int = 10

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _require(self.steps_per_stage is None or self.steps_per_stage > 0, "train.steps_per_stage must be > 0")
        _require(self.log_every > 0, f"train.log_every must be > 0, got {self.log_every}")


@dataclass
class FTEvalConfig(_YamlMixin):
    """Evaluation after every stage (through memlm.evaluation)."""

    prompt: str = "Question: {question}\nAnswer:"  # how the new facts are asked (match stream.templates[0])
    until: list[str] = field(default_factory=lambda: ["\n", ".", ",", "Question:"])
    max_new_tokens: int = 16
    heldin_task: str = "worldfacts"  # pretraining facts the base model knows
    heldin_limit: int | None = 200
    ppl_docs: int | None = 100  # validation documents of the checkpoint's pretraining corpus (None = all)
    ppl_task: str | None = None  # a perplexity task instead of the validation documents (e.g. heldout_ppl)
    extra_tasks: list[str] = field(default_factory=list)  # e.g. [nq_open]; reported with their relative drop
    extra_limit: int | None = 200
    batch_size: int = 32

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")


@dataclass
class FinetuneConfig(_YamlMixin):
    """A continual-finetuning run: ``method`` picks how the same loop updates the model; its section configures it."""

    method: FinetuneMethod = "sparse_memory"
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    smf: SMFConfig = field(default_factory=SMFConfig)
    lora: LoraFTConfig = field(default_factory=LoraFTConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    eval: FTEvalConfig = field(default_factory=FTEvalConfig)
    out_dir: str = "runs/continual"
    name: str | None = None  # None -> the method name

    def __post_init__(self) -> None:
        name, lr = METHOD_OPTIM_DEFAULTS[self.method]
        if self.optim.name is None:
            self.optim.name = name
        if self.optim.lr is None:
            self.optim.lr = lr
        if self.method == "sparse_memory":
            _require(
                self.optim.name in ("sgd", "adam"),
                f"optim.name: sparse_memory needs 'sgd' or 'adam' (row-sparse), got {self.optim.name!r}",
            )
            _require(
                self.optim.weight_decay == 0,
                "optim.weight_decay must be 0 with sparse_memory (decay would move rows that were not selected)",
            )
            _require(self.optim.grad_clip is None, "optim.grad_clip is not supported with sparse_memory")

    @property
    def run_name(self) -> str:
        return self.name or self.method


def load_finetune_config(
    paths: list[str | Path] | None = None, overrides: list[str] | dict | None = None
) -> FinetuneConfig:
    """defaults < YAML files (merged in order) < overrides (``--a.b=c`` strings or a nested dict)."""
    return from_dict(FinetuneConfig, _merge_layers(paths, overrides))
