"""Typed configuration: dataclasses are the schema, YAML and the command line fill them in.

Precedence is defaults < YAML files (merged in order) < dotted command-line overrides (``--model.dim=64``).
Every unknown key or wrongly typed value raises :class:`ConfigError` naming the full dotted key, so a typo in a YAML
file never silently falls back to a default. Derived values (number of slots, head dims, ...) are properties computed
in exactly one place, and cross-field checks run in ``__post_init__`` so a bad config fails when it is built.
"""

from __future__ import annotations

import dataclasses
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
    """A product-key memory layer (PKM / Memory+); ``kind`` picks the variant and its defaults.

    ``None`` on a flag means "the default of this kind": Memory+ turns on the swilu gate, the shared value pool and
    qk-norm; plain PKM turns them off. The resolved values are properties (``use_gate``, ...), computed only here.
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
        return self.shared_values if self.shared_values is not None else self.kind == "memory_plus"

    @property
    def use_qk_norm(self) -> bool:
        return self.qk_norm if self.qk_norm is not None else self.kind == "memory_plus"


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
            for i in self.memory.layers:
                _require(
                    0 <= i < self.n_layers,
                    f"memory.layers: index {i} is out of range for model.n_layers={self.n_layers}",
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
        assert self.memory is not None
        return self.memory.v_dim or self.dim

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
        _require(self.vocab_size >= 260, f"data.tokenizer.vocab_size must be >= 260 (byte fallback), got {self.vocab_size}")
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
    cache_dir: str | None = None  # None -> $MEMLM_CACHE or ~/.cache/memlm
    on_error: Literal["raise", "skip"] = "raise"  # skip = drop bad rows with a counted warning

    def __post_init__(self) -> None:
        _require(len(self.sources) > 0, "data.sources must list at least one source")
        _require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")



# ----------------------------------------------------------------------------------------------------------------------
# optimization and training  (owned by memlm/training/)
