"""Corpus sources, worldfacts, tokenizer cache, packed datamodule: offline on fixtures with a tiny vocab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memlm.config import ConfigError, DataConfig
from memlm.data import facts
from memlm.data.corpus import build_corpus
from memlm.data.datamodule import LMDataModule, get_tokenizer
from memlm.data.errors import DataError
from memlm.data.tokenizer import Tokenizer

FIX = Path(__file__).parent / "fixtures"
WIKI = str(FIX / "wiki_sample.json")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    records = json.loads((FIX / "elements_sample.json").read_text())
    monkeypatch.setattr(facts, "element_records", lambda cache_dir=None: records)
    facts._all_facts.cache_clear()
    yield
    facts._all_facts.cache_clear()


def cfg(**kw) -> DataConfig:
    base = {
        "sources": [{"kind": "wiki", "path": WIKI}, {"kind": "worldfacts", "weight": 0.5}],
        "tokenizer": {"vocab_size": 400},
        "facts": {"min_city_population": 5_000_000},
        "val_fraction": 0.1,
    }
    return DataConfig.from_dict({**base, **kw})  # fmt: skip


def test_worldfacts_split_is_deterministic_and_disjoint():
    every = facts.worldfacts("all", min_city_population=5_000_000)
    pre = facts.worldfacts("pretrain", min_city_population=5_000_000)
    held = facts.worldfacts("heldout", min_city_population=5_000_000)
    assert len(pre) + len(held) == len(every) > 500 and 0.05 < len(held) / len(every) < 0.15
    assert {f.id for f in pre}.isdisjoint({f.id for f in held})
    assert [f.id for f in held] == [f.id for f in facts.worldfacts("heldout", min_city_population=5_000_000)]
    assert held != facts.worldfacts("heldout", seed=1, min_city_population=5_000_000)
    fr = next(f for f in every if f.id == "country/FR/capital")
    assert fr.answers == ("Paris",) and len(fr.statements) == 3 and all("Paris" in s for s in fr.statements)
    qa_rows = facts.worldfacts_qa("heldout", min_city_population=5_000_000)
    assert [r["id"] for r in qa_rows] == [f.id for f in held] and all(r["answers"] for r in qa_rows)
    docs = " ".join(facts.worldfacts_documents("pretrain", min_city_population=5_000_000))
    assert all(f.statements[0] not in docs for f in held)  # held-out facts never reach the corpus
    assert "Gold" in docs and "Au" in docs


def test_sources_and_mixture(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"body": "json doc"}\n\n{"body": "another"}\n')
    c = build_corpus(cfg(sources=[{"kind": "text", "path": str(tmp_path / "a.txt"), "weight": 2.0},
                                  {"kind": "jsonl", "path": str(tmp_path), "text_field": "body"}]))  # fmt: skip
    assert sorted(c.documents) == ["another", "first doc\nstill first", "first doc\nstill first", "json doc",
                                   "second doc", "second doc"]  # fmt: skip
    assert (
        c.hash
        == build_corpus(
            cfg(
                sources=[
                    {"kind": "text", "path": str(tmp_path / "a.txt"), "weight": 2.0},
                    {"kind": "jsonl", "path": str(tmp_path), "text_field": "body"},
                ]
            )
        ).hash
    )
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2", None]}), tmp_path / "c.parquet")
    assert sorted(build_corpus(cfg(sources=[{"kind": "parquet", "path": str(tmp_path / "c.parquet")}]))) == ["p1", "p2"]


def test_hf_source_from_local_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["hello world", "bye"]}).save_to_disk(str(tmp_path / "ds"))
    c = build_corpus(cfg(sources=[{"kind": "hf", "path": str(tmp_path / "ds")}]))
    assert sorted(c) == ["bye", "hello world"]
    with pytest.raises(DataError, match="hub is not reachable"):
        build_corpus(cfg(sources=[{"kind": "hf", "path": "someone/not-local"}]))


def test_bad_input_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match="file not found: .*missing.txt"):
        build_corpus(cfg(sources=[{"kind": "text", "path": str(tmp_path / "missing.txt")}]))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        build_corpus(cfg(sources=[{"kind": "text", "path": str(tmp_path / "empty.txt")}]))
    (tmp_path / "latin1.txt").write_bytes(b"ok line\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin1.txt:2: not valid UTF-8 \(byte 0xe9\)"):
        build_corpus(cfg(sources=[{"kind": "text", "path": str(tmp_path / "latin1.txt")}]))
    skipped = build_corpus(cfg(sources=[{"kind": "text", "path": str(tmp_path / "latin1.txt")}], on_error="skip"))
    assert skipped.documents == ["ok line"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        build_corpus(cfg(sources=[{"kind": "jsonl", "path": str(tmp_path / "bad.jsonl")}]))
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:2: expected an object with a string field 'text'"):
        build_corpus(cfg(sources=[{"kind": "jsonl", "path": str(tmp_path / "nofield.jsonl")}]))
    with pytest.raises(ConfigError, match="needs a path"):
        cfg(sources=[{"kind": "jsonl"}])
    with pytest.raises(ConfigError, match="unknown config key 'sources\\[0\\].weigth'"):
        cfg(sources=[{"kind": "wiki", "weigth": 2}])


def test_tokenizer_train_cache_save_load(tmp_path):
    c = build_corpus(cfg())
    tok = get_tokenizer(cfg(), c)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 1, 2, 3)
    text = "The capital of France is Paris. Ünïcödé 東京"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == text  # byte fallback round-trips
    assert tok.encode_batch([text, "x"])[0] == ids[1:-1]
    again = get_tokenizer(cfg(), c)
    assert again.hash == tok.hash  # cache hit
    tok.save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").hash == tok.hash
    assert Tokenizer.load(tmp_path / "tok" / "tokenizer.model").encode(text) == ids[1:-1]
    other = build_corpus(cfg(sources=[{"kind": "wiki", "path": WIKI}]))  # different corpus -> different tokenizer
    assert get_tokenizer(cfg(), other).meta["corpus"] == other.hash != c.hash
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope")


def test_datamodule_batches_cache_and_rebuild(tmp_path):
    dm = LMDataModule(cfg(), seq_len=32, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < dm.tokenizer.vocab_size and dm.meta["dtype"] == "uint16"
    assert len(dm.val_set) > 0 and dm.meta["val_documents"] > 0
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[1] == 32
    first_dir, ref = dm.data_dir, dm.train_set[0][0].clone()

    # a second process: setup without prepare_data finds the same files
    dm2 = LMDataModule(cfg(), seq_len=32, batch_size=4)
    dm2.setup("fit")
    assert dm2.data_dir == first_dir and torch.equal(dm2.train_set[0][0], ref)

    # warm prepare does no work; a changed corpus goes to a new directory
    mtime = (first_dir / "train.bin").stat().st_mtime_ns
    dm3 = LMDataModule(cfg(), seq_len=32, batch_size=4)
    dm3.prepare_data()
    assert dm3.data_dir == first_dir and (first_dir / "train.bin").stat().st_mtime_ns == mtime
    dm4 = LMDataModule(cfg(seed=1), seq_len=32, batch_size=4)
    dm4.prepare_data()
    assert dm4.data_dir != first_dir

    # a truncated cache is detected and rebuilt
    (first_dir / "train.bin").write_bytes(b"\x00\x00")
    dm5 = LMDataModule(cfg(), seq_len=32, batch_size=4)
    dm5.prepare_data()
    dm5.setup("fit")
    assert torch.equal(dm5.train_set[0][0], ref)


def test_datamodule_workers_and_too_short_corpus(tmp_path):
    dm = LMDataModule(cfg(num_workers=1), seq_len=16, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 16)
    (tmp_path / "tiny.txt").write_text("a b c\n\nd e f\n")
    tiny = cfg(sources=[{"kind": "text", "path": str(tmp_path / "tiny.txt")}], val_fraction=0.0,
               tokenizer={"path": str(dm.tokenizer.save(tmp_path / "tok"))})  # fmt: skip
    dm = LMDataModule(tiny, seq_len=64, batch_size=2)
    dm.prepare_data()
    with pytest.raises(DataError, match="too few for seq_len=64"):
        dm.setup("fit")


def test_two_builds_of_the_same_token_file_at_once_do_not_collide(tmp_path):
    """Runs sharing a cache (e.g. a ladder's parallel jobs) can pack the same file at the same time: each writes a
    temp file of its own. Here a second build runs to completion in the middle of the first one."""
    import numpy as np

    from memlm.data.datamodule import _write_stream

    path = tmp_path / "train.bin"

    class Tok:  # encodes a document as its length; the first batch of the outer build starts the inner one
        nested = False

        def encode_batch(self, docs, bos, eos):
            if not Tok.nested:
                Tok.nested = True
                assert _write_stream(path, ["xy", "z"], Tok(), np.dtype(np.uint16), "inner") == 2
            return [[len(d)] for d in docs]

    assert _write_stream(path, ["abc", "de", "f"], Tok(), np.dtype(np.uint16), "outer") == 3
    assert np.fromfile(path, dtype=np.uint16).tolist() == [3, 2, 1]  # the last build to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin"]  # no temp file left behind
