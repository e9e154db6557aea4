"""Pretraining data configs (``data:`` section; used by memlm/data/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memlm.config.base import _require, _YamlMixin

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
