"""Pretraining corpora: local text / JSONL / parquet files, Hugging Face datasets, built-in sources, weighted mixtures.

:func:`build_corpus` turns a :class:`~memlm.config.DataConfig` into a :class:`Corpus`: a list of documents (strings)
plus a content hash that keys every cache downstream (tokenizer, packed token files). Bad input raises
:class:`~memlm.data.errors.DataError` naming file and line, or, with ``on_error='skip'``, is counted and warned about.

File formats: ``text`` = documents separated by blank lines; ``jsonl`` = one JSON object per line with a ``text_field``;
``parquet`` = a ``text_field`` column. ``path`` may be a file, a directory (its files of that kind, sorted) or a glob.
Built-in sources: ``wiki``, ``worldfacts`` and ``people`` (invented individuals at exact exposure levels, from
``data.people``; its documents never go to the validation split, and ``data.people.mix`` resamples the other sources
so people text is that share of the corpus bytes; see :mod:`memlm.data.people`).
"""

from __future__ import annotations

import glob
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from memlm.config import DataConfig, SourceConfig
from memlm.data.cache import hub_reachable
from memlm.data.errors import BadRows, DataError, jsonl_records, log, where

SUFFIXES = {"text": (".txt", ".text", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


@dataclass
class Corpus:
    """Documents of a built corpus and its content hash (order included, so the seeded mixing counts)."""

    documents: list[str]
    hash: str
    stats: list[dict] = field(default_factory=list)  # per source: kind, origin, documents, bytes

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)


def corpus_hash(documents: list[str]) -> str:
    h = hashlib.sha256()
    for d in documents:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# local files


def resolve_files(path: str, kind: str) -> list[Path]:
    """A file, a directory (its files of this kind, sorted) or a glob -> existing files; errors name the path."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES[kind])
        if not files:
            raise DataError(f"{kind} source: no {'/'.join(SUFFIXES[kind])} files in directory {p}")
        return files
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{kind} source: glob {path} matches no files")
        return files
    raise DataError(f"{kind} source: file not found: {p}")


def _decode(raw: bytes, path: Path, bad: BadRows) -> str:
    """Strict UTF-8; the error names the line. With skip, undecodable lines are dropped and counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        first = raw.count(b"\n", 0, e.start) + 1
        bad.bad(first, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8")
    lines = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            if i != first:
                bad.bad(i, "not valid UTF-8")
    return "\n".join(lines)


def read_text(path: Path, skip: bool = False) -> list[str]:
    """Documents of a text file: paragraphs separated by blank lines."""
    bad = BadRows(path, skip)
    text = _decode(path.read_bytes(), path, bad).replace("\r\n", "\n")
    bad.report()
    docs = [d.strip() for d in text.split("\n\n")]
    return [d for d in docs if d]


def read_jsonl(path: Path, field: str = "text", skip: bool = False) -> list[str]:
    """``field`` of each JSON object line; blank lines are ignored, anything else bad names file:line."""
    bad = BadRows(path, skip)
    docs = []
    for i, rec in jsonl_records(path, bad):
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            bad.bad(i, f"expected an object with a string field '{field}'")
            continue
        if rec[field].strip():
            docs.append(rec[field].strip())
    bad.report()
    return docs


def read_parquet(path: Path, field: str = "text") -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[field])
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read column '{field}' ({e}); set text_field to an existing column") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    docs = []
    for i, v in enumerate(table.column(field).to_pylist()):
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where(path)} row {i}: column '{field}' is {type(v).__name__}, expected text")
        if v and v.strip():
            docs.append(v.strip())
    return docs


def read_hf(src: SourceConfig) -> tuple[list[str], str]:
    """A Hugging Face dataset: a saved dataset dir / local loading script or data dir, else the hub if reachable."""
    import datasets

    split = src.split or "train"
    p = Path(src.path or "").expanduser()
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds, origin = datasets.load_from_disk(str(p)), f"hf load_from_disk {p}"
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"hf source {p}: no split '{split}' (has {list(ds)})")
            ds = ds[split]
    elif p.exists():
        ds, origin = datasets.load_dataset(str(p), src.name, split=split), f"hf local {p}"
    elif hub_reachable():
        ds, origin = datasets.load_dataset(src.path, src.name, split=split), f"hf hub {src.path}"
    else:
        raise DataError(f"hf source '{src.path}': not a local path and the Hugging Face hub is not reachable")
    if src.text_field not in ds.column_names:
        raise DataError(f"hf source '{src.path}': no column '{src.text_field}' (has {ds.column_names})")
    n = len(ds) if src.limit is None else min(len(ds), src.limit)
    docs = [t.strip() for t in ds.select(range(n))[src.text_field] if isinstance(t, str) and t.strip()]
    return docs, f"{origin} [{split}]"


# ----------------------------------------------------------------------------------------------------------------------
# sources and mixtures


def source_documents(src: SourceConfig, cfg: DataConfig) -> tuple[list[str], str]:
    """Documents of one source (before weighting) and a string saying where they came from."""
    skip = cfg.on_error == "skip"
    if src.kind in ("text", "jsonl", "parquet"):
        docs: list[str] = []
        files = resolve_files(src.path or "", src.kind)
        for f in files:
            if src.kind == "text":
                docs += read_text(f, skip)
            elif src.kind == "jsonl":
                docs += read_jsonl(f, src.text_field, skip)
            else:
                docs += read_parquet(f, src.text_field)
        origin = f"{src.kind} {src.path} ({len(files)} file{'s' * (len(files) > 1)})"
    elif src.kind == "hf":
        docs, origin = read_hf(src)
    elif src.kind == "wiki":
        from memlm.data.wiki import SOURCE, wiki_documents

        docs, origin = wiki_documents(src.path, cfg.cache_dir), f"wiki {src.path or SOURCE}"
    elif src.kind == "worldfacts":
        from memlm.data.facts import worldfacts_documents

        f = cfg.facts
        split = src.split or "pretrain"
        docs = worldfacts_documents(
            split,
            heldout_fraction=f.heldout_fraction,
            seed=f.seed,
            groups=tuple(f.groups),
            min_city_population=f.min_city_population,
            cache_dir=cfg.cache_dir,
        )
        origin = f"worldfacts [{split}]"
    elif src.kind == "people":
        from memlm.data.people import describe, people_documents

        avoid = None
        if cfg.val_fraction > 0:  # every appearance must be training text: keep people documents out of validation
            from memlm.data.datamodule import in_val

            avoid = lambda d: in_val(d, cfg.val_fraction, cfg.seed)  # noqa: E731
        docs, origin = people_documents(cfg.people, avoid), describe(cfg.people)
    else:  # the config's Literal already rejects this
        raise DataError(f"unknown source kind {src.kind!r}")
    if src.limit is not None:
        docs = docs[: src.limit]
    if not docs:
        raise DataError(f"{origin}: no documents (empty source)")
    return docs, origin


def weighted(docs: list[str], weight: float, rng: random.Random) -> list[str]:
    """Repeat ``floor(weight)`` times, plus a seeded sample for the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    out = docs * whole
    if frac > 0:
        out += rng.sample(docs, round(frac * len(docs)))
    return out


def _n_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def _mix_people(per_source: list[tuple], mix: float, rng: random.Random) -> list[tuple]:
    """Resample the non-people sources together (each by the same factor, so their relative weights stay) until the
    people documents are a ``mix`` share of the corpus bytes (approximately: documents are sampled whole)."""
    people = sum(_n_bytes(d) for s, _, d in per_source if s.kind == "people")
    others = sum(_n_bytes(d) for s, _, d in per_source if s.kind != "people")
    factor = people * (1 - mix) / mix / others if others else 0.0
    out = []
    for src, origin, docs in per_source:
        if src.kind != "people":
            docs = weighted(docs, factor, rng) if factor > 0 else []
            origin = f"{origin} (x{factor:.3g} for data.people.mix={mix})"
        out.append((src, origin, docs))
    return out


def build_corpus(cfg: DataConfig) -> Corpus:
    """All sources of ``cfg``, weighted, then shuffled with ``cfg.seed``; raises on an empty result."""
    rng = random.Random(cfg.seed)
    per_source = []
    for src in cfg.sources:
        docs, origin = source_documents(src, cfg)
        per_source.append((src, origin, weighted(docs, src.weight, rng)))
    if cfg.people.mix is not None and any(src.kind == "people" for src in cfg.sources):
        per_source = _mix_people(per_source, cfg.people.mix, rng)
    documents: list[str] = []
    stats = []
    for src, origin, docs in per_source:
        stats.append(
            {
                "kind": src.kind,
                "origin": origin,
                "weight": src.weight,
                "documents": len(docs),
                "bytes": _n_bytes(docs),
            }
        )
        log.info("corpus source %s: %d documents", origin, len(docs))
        documents += docs
    if not documents:
        raise DataError("the corpus is empty: every source produced no documents")
    rng.shuffle(documents)
    return Corpus(documents, corpus_hash(documents), stats)
