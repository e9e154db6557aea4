"""Pretraining data configs (``data:`` section; used by memlm/data/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memlm.config.base import _require, _YamlMixin

SourceKind = Literal["text", "jsonl", "parquet", "hf", "worldfacts", "wiki", "people"]
# attributes of the invented people (memlm/data/people.py defines their values and templates)
PeopleAttribute = Literal["birth_year", "birth_city", "employer", "field", "language"]
PEOPLE_MAX_TEMPLATES = 4  # prose templates written per attribute


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


@dataclass
class PeopleConfig(_YamlMixin):
    """Invented individuals for a ``{kind: people}`` source and the ``people`` eval tasks (memlm/data/people.py).

    Every individual gets a never-used invented name and uniformly drawn attribute values, and appears in exactly
    ``level`` documents of the corpus (one appearance = one short biography stating each attribute once; see
    docs/capacity.md). Level 0 individuals never appear: the control that shows the guessing rate.
    """

    n_per_level: int = 100  # individuals at each exposure level
    levels: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64])  # appearances per individual
    attributes: list[PeopleAttribute] = field(default_factory=lambda: ["birth_year", "birth_city", "employer", "field"])
    templates: int = 3  # prose templates per attribute (1-4): appearance j states each attribute in template j mod this
    qa_form: bool = False  # every second appearance as "Question: ...\nAnswer: ..." lines instead of prose
    # share of the corpus's UTF-8 bytes that is people text (0 < mix <= 1): the other sources are resampled as a whole
    # (keeping their relative weights) to reach it; None = no resampling, every source at its own weight
    mix: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.n_per_level >= 1, f"data.people.n_per_level must be >= 1, got {self.n_per_level}")
        _require(len(self.levels) > 0, "data.people.levels must list at least one exposure level (e.g. [0, 1, 2, 4])")
        bad = [k for k in self.levels if k < 0]
        _require(not bad, f"data.people.levels: exposure levels must be >= 0 (0 = never seen, the control); got {bad}")
        _require(any(k > 0 for k in self.levels), "data.people.levels: at least one level must be > 0 (0 = never seen)")
        dup = sorted({k for k in self.levels if self.levels.count(k) > 1})
        _require(not dup, f"data.people.levels: level(s) {dup} listed twice")
        _require(len(self.attributes) > 0, "data.people.attributes must list at least one attribute")
        dup = sorted({a for a in self.attributes if self.attributes.count(a) > 1})
        _require(not dup, f"data.people.attributes: {dup} listed twice")
        _require(
            1 <= self.templates <= PEOPLE_MAX_TEMPLATES,
            f"data.people.templates must be in [1, {PEOPLE_MAX_TEMPLATES}], got {self.templates}",
        )
        _require(
            self.mix is None or 0.0 < self.mix <= 1.0,
            f"data.people.mix (the people share of the corpus) must be in (0, 1], got {self.mix}"
            + (" (to train without people text, drop the people source)" if self.mix == 0 else ""),
        )

    @property
    def n_individuals(self) -> int:
        return self.n_per_level * len(self.levels)


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="wiki"), SourceConfig(kind="worldfacts", weight=2.0)]


@dataclass
class DataConfig(_YamlMixin):
    """Pretraining data: a (weighted) mixture of sources, its tokenizer, and the packed train/val split."""

    sources: list[SourceConfig] = field(default_factory=_default_sources)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    people: PeopleConfig = field(default_factory=PeopleConfig)  # used by a {kind: people} source
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
        people = [i for i, s in enumerate(self.sources) if s.kind == "people"]
        if people:
            self._check_people(people)

    def _check_people(self, idx: list[int]) -> None:
        """A people source's exposure counts are exact only once, unweighted and uncut, and its names must fit."""
        _require(len(idx) == 1, f"data.sources{idx}: at most one people source (a second would double every exposure)")
        (i,) = idx
        src = self.sources[i]
        _require(
            src.weight == 1.0,
            f"data.sources[{i}].weight must be 1 for a people source (its exposure counts are data.people.levels; "
            f"set the people share of the corpus with data.people.mix), got {src.weight}",
        )
        _require(src.limit is None, f"data.sources[{i}].limit cannot cut a people source (it would break exposures)")
        from memlm.data.people import name_space_size  # local: the data layer imports this module

        space = name_space_size()
        p = self.people
        _require(
            p.n_individuals <= space,
            f"data.people.n_per_level: {p.n_per_level} x {len(p.levels)} levels = {p.n_individuals} individuals, "
            f"more than the {space} distinct invented names; lower n_per_level or use fewer levels",
        )
