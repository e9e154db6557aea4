"""The people source (invented individuals at controlled exposure levels) and its capacity evaluation: offline, fast."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from memlm.config import ConfigError, DataConfig, load_run_config
from memlm.config.data import PeopleConfig
from memlm.data import people as P
from memlm.data.corpus import build_corpus
from memlm.data.facts import QA_TEMPLATE
from memlm.data.qa import load_qa
from memlm.evaluation.capacity import capacity_report, fano_bits, format_capacity
from memlm.evaluation.metrics import normalize_answer
from memlm.evaluation.runner import TaskError, evaluate, run_task
from memlm.evaluation.tasks import resolve_task

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain" / "tiny_people.yaml")
SMALL = dict(n_per_level=6, levels=[0, 1, 3, 7], templates=2)


def small(**kw) -> PeopleConfig:
    return PeopleConfig(**{**SMALL, **kw})


def mentions(name: str, doc: str) -> int:
    return len(re.findall(rf"(?<![\w]){re.escape(name)}(?![\w])", doc))


def statements(person: P.Person, attribute: str) -> list[str]:
    """Every way the text can state one attribute of one person (each prose template, the QA form)."""
    att, v = P.ATTRIBUTES[attribute], person.value(attribute)
    qa = QA_TEMPLATE.format(question=att.question.format(name=person.name), answer=v)
    return [att.render(t, person.name, v) for t in range(len(att.templates))] + [qa]


# ----------------------------------------------------------------------------------------------------------------------
# the source


def test_deterministic_by_seed():
    a, b = small(), small()
    assert P.people_documents(a) == P.people_documents(b)
    assert P.people_qa(a) == P.people_qa(b)
    other = small(seed=1)
    assert P.people_documents(other) != P.people_documents(a)
    assert {p.name for p in P.people(other)} != {p.name for p in P.people(a)}


@pytest.mark.parametrize("qa_form", [False, True])
def test_exposure_counts_are_exact(qa_form):
    cfg = small(qa_form=qa_form)
    docs = P.people_documents(cfg)
    assert len(docs) == cfg.n_per_level * sum(cfg.levels)
    for p in P.people(cfg):
        mine = [d for d in docs if mentions(p.name, d)]
        assert len(mine) == p.level, p  # one appearance = one document naming the individual
        for d in mine:  # ... that states each attribute exactly once, naming the individual in each statement
            assert mentions(p.name, d) == len(cfg.attributes)
            for a in cfg.attributes:
                assert sum(d.count(s) for s in statements(p, a)) == 1, (d, a)
        if p.level >= 1:  # appearance 0 is prose in template 0: the sentence the cloze evaluation completes
            assert any(P.ATTRIBUTES[a].render(0, p.name, p.value(a)) in mine[0] for a in cfg.attributes)
    if qa_form:
        assert sum("Question:" in d for d in docs) == cfg.n_per_level * sum(k // 2 for k in cfg.levels)


def test_no_people_document_in_the_validation_split():
    from memlm.data.datamodule import in_val

    data = DataConfig.from_dict({"sources": [{"kind": "people"}], "people": vars(small(levels=[0, 2, 5])),
                                 "val_fraction": 0.3, "seed": 3})  # fmt: skip
    corpus = build_corpus(data)
    assert not any(in_val(d, 0.3, 3) for d in corpus.documents)  # re-rendered, not dropped:
    for p in P.people(data.people):
        assert sum(1 for d in corpus.documents if mentions(p.name, d)) == p.level
    one = vars(small(levels=[3, 6], attributes=["field"], templates=4, qa_form=True))  # one sentence per document
    corpus = build_corpus(DataConfig.from_dict({"sources": [{"kind": "people"}], "people": one, "val_fraction": 0.1}))
    assert len(corpus) == 6 * 9 and not any(in_val(d, 0.1, 0) for d in corpus.documents)


def test_names_are_unique_and_invented():
    cfg = small(n_per_level=400)
    names = [p.name for p in P.people(cfg)]
    assert len(set(names)) == len(names) == cfg.n_individuals
    real = P.real_words()
    assert not [n for n in names if any(part.lower() in real for part in n.split())]
    first, last = P.name_parts()
    assert P.name_space_size() == len(first) * len(last) > 1_000_000
    assert len(set(first)) == len(first) and len(set(last)) == len(last)
    assert {"paris", "lima", "english", "1957", "siemens"} <= real  # the check covers cities, languages, values


def test_attribute_values_and_prompts_are_unambiguous():
    for name, att in P.ATTRIBUTES.items():
        values = P.attribute_values(name)
        assert len(values) >= 10
        assert len({normalize_answer(v) for v in values}) == len(values), name  # EM can tell every value apart
        assert not [v for v in values if "." in v or "," in v], name  # the tasks stop generating at . and ,
        assert all(t.endswith("{value}.") for t in att.templates), name  # the value last: every prefix is a cloze
    prompts = {a: att.prompt("Ba Rin") for a, att in P.ATTRIBUTES.items()}
    for a, pa in prompts.items():
        for b, pb in prompts.items():
            assert a == b or not pb.startswith(pa), (a, b)  # one cloze prompt never asks for another attribute


def test_qa_rows_match_the_text():
    cfg = small()
    docs = P.people_documents(cfg)
    rows = P.people_qa(cfg)
    by_name = {p.name: p for p in P.people(cfg)}
    assert len(rows) == cfg.n_individuals * len(cfg.attributes)
    assert len({r["id"] for r in rows}) == len(rows)
    first = rows[: len(cfg.levels) * len(cfg.attributes)]
    assert sorted({r["level"] for r in first}) == sorted(cfg.levels)  # interleaved: --limit covers every level
    for r in rows:
        p = by_name[r["person"]]
        (answer,) = r["answers"]
        assert answer == p.value(r["attribute"]) and r["level"] == p.level
        assert p.name in r["question"] and r["prompt"].startswith(p.name)
        assert r["num_values"] == len(P.attribute_values(r["attribute"]))
        stated = sum(d.count(f"{r['prompt']} {answer}.") for d in docs)
        if p.level == 0:
            assert not any(mentions(p.name, d) for d in docs)
        else:  # the cloze prompt + answer is a sentence of the text (template 0, at least once)
            assert stated >= 1
    assert [r for r in P.people_qa(cfg, "k3")] == [r for r in rows if r["level"] == 3]
    ds = load_qa("people", split="k7", people=vars(cfg))
    assert len(ds) == cfg.n_per_level * len(cfg.attributes) and "k7" in ds.source


def test_mix_ratio_resamples_the_other_sources(tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("\n\n".join(f"Filler document number {i:04d} about nothing in particular." for i in range(3000)))
    base = {"sources": [{"kind": "text", "path": str(text)}, {"kind": "people"}], "val_fraction": 0.0}
    people = vars(small(levels=[1, 2, 4]))
    for mix in (0.25, 0.6):
        corpus = build_corpus(DataConfig.from_dict({**base, "people": {**people, "mix": mix}}))
        share = corpus.stats[1]["bytes"] / (corpus.stats[0]["bytes"] + corpus.stats[1]["bytes"])
        assert share == pytest.approx(mix, abs=0.01)
        assert corpus.stats[1]["documents"] == 6 * 7  # people text is never resampled
    only = build_corpus(DataConfig.from_dict({**base, "people": {**people, "mix": 1.0}}))
    assert only.stats[0]["documents"] == 0 and len(only) == 42


# ----------------------------------------------------------------------------------------------------------------------
# scoring


def rows_for(level: int, attribute: str, values: int, n: int) -> list[dict]:
    return [{"id": f"k{level}/{attribute}/{i}", "answers": [f"v{i % 3}"], "level": level, "attribute": attribute,
             "num_values": values} for i in range(n)]  # fmt: skip


def test_fano_bits():
    assert fano_bits(0.25, 4) == 0.0 and fano_bits(0.1, 4) == 0.0  # at or below chance: nothing known
    assert fano_bits(1.0, 4) == pytest.approx(2.0) and fano_bits(1.0, 100) == pytest.approx(math.log2(100))
    a = 0.5
    expect = math.log2(100) - 1.0 - 0.5 * math.log2(99)  # log2 V - h(0.5) - 0.5 log2(V-1)
    assert fano_bits(a, 100) == pytest.approx(expect)
    assert fano_bits(0.3, 4) < fano_bits(0.6, 4) < fano_bits(0.9, 4)


def test_capacity_report_scores_constructed_predictions():
    rows = rows_for(0, "city", 4, 8) + rows_for(0, "year", 100, 8) + rows_for(4, "city", 4, 8)
    rows += rows_for(4, "year", 100, 8)
    right = {"k0/city/0", "k0/city/1"} | {f"k4/city/{i}" for i in range(8)} | {f"k4/year/{i}" for i in range(4)}
    preds = [{"id": r["id"], "exact_match": float(r["id"] in right), "f1": float(r["id"] in right)} for r in rows]
    rep = capacity_report(rows, preds)
    k0, k4 = rep["levels"]["0"], rep["levels"]["4"]
    assert k0["attributes"]["city"]["exact_match"] == 0.25 and k0["attributes"]["city"]["chance"] == 0.25
    assert k0["attributes"]["city"]["lift"] == 0.0 and k0["bits"] == 0.0  # guessing at chance: no knowledge
    assert k4["attributes"]["city"]["exact_match"] == 1.0 and k4["attributes"]["year"]["exact_match"] == 0.5
    assert k4["attributes"]["city"]["bits"] == pytest.approx(8 * 2.0)
    year_bits = 8 * (math.log2(100) - 1.0 - 0.5 * math.log2(99))
    assert k4["attributes"]["year"]["bits"] == pytest.approx(year_bits)
    assert rep["bits"] == pytest.approx(16 + year_bits) and rep["bits_control"] == 0.0
    assert rep["bits_max"] == pytest.approx(8 * 2 + 8 * math.log2(100))
    assert k4["exact_match"] == 0.75 and k4["chance"] == pytest.approx((0.25 + 0.01) / 2)
    assert rep["exact_match_seen"] == 0.75 and rep["n_seen"] == 16 and rep["n_control"] == 16
    assert rep["attributes"]["year"]["chance"] == 0.01 and rep["attributes"]["year"]["num_values"] == 100
    assert rep["attributes"]["city"]["majority"] == pytest.approx(6 / 16)  # v0 is 3 of every 8 answers
    assert rep["attributes"]["city"]["bits"] == pytest.approx(16.0)  # seen levels only
    table = format_capacity("people", rep)
    assert "| 4 | 16 | 0.750 |" in table and "control (k=0) 0.0" in table
    with pytest.raises(ValueError, match="no prediction"):
        capacity_report(rows, preds[1:])


class Oracle:
    """A stand-in model that knows the individuals at levels >= 4 and answers 'Paris' for everyone else."""

    def __init__(self, rows: list[dict]):
        self.known = {r["prompt"]: r["answers"][0] for r in rows if r["level"] >= 4}

    def generate_until(self, contexts, until, max_new_tokens, desc=None):
        return [f" {self.known.get(c, 'Paris')}" for c in contexts]


def test_people_task_through_the_harness():
    cfg = small(levels=[0, 1, 4, 8])
    run_config = {"data": {"sources": [{"kind": "wiki"}, {"kind": "people"}], "people": vars(cfg)}}
    spec = resolve_task("people")
    entry = run_task(Oracle(P.people_qa(cfg)), spec, people=run_config["data"]["people"])
    cap = entry["capacity"]
    assert entry["n"] == cfg.n_individuals * len(cfg.attributes)
    assert cap["levels"]["8"]["exact_match"] == 1.0 and cap["levels"]["1"]["exact_match"] == 0.0
    assert cap["levels"]["0"]["exact_match"] == 0.0 and cap["bits_control"] == 0.0
    max_bits = cfg.n_per_level * sum(math.log2(len(P.attribute_values(a))) for a in cfg.attributes)
    assert cap["bits"] == pytest.approx(2 * max_bits) and cap["bits_max"] == pytest.approx(3 * max_bits)
    assert entry["metrics"]["exact_match"] == pytest.approx(0.5)
    with pytest.raises(TaskError, match="trained on a"):  # a model that never saw any people
        evaluate(object(), object(), "people", run_config={"data": {"sources": [{"kind": "wiki"}]}}, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one ConfigError naming the key, before anything is written


@pytest.mark.parametrize(
    "override, key",
    [
        ("--data.people.levels=[]", "data.people.levels"),
        ("--data.people.levels=[0]", "data.people.levels"),
        ("--data.people.levels=[1,-2,4]", "data.people.levels"),
        ("--data.people.levels=[1,2,2]", "data.people.levels"),
        ("--data.people.n_per_level=0", "data.people.n_per_level"),
        ("--data.people.n_per_level=1000000", "data.people.n_per_level"),  # 8M individuals > the name space
        ("--data.people.mix=1.5", "data.people.mix"),
        ("--data.people.mix=-0.1", "data.people.mix"),
        ("--data.people.mix=0", "data.people.mix"),
        ("--data.people.templates=9", "data.people.templates"),
        ("--data.people.attributes=[shoe_size]", "data.people.attributes[0]"),
        ("--data.sources=[{kind: people, weight: 2}]", "data.sources[0].weight"),
        ("--data.sources=[{kind: people}, {kind: people}]", "at most one people source"),
    ],
)
def test_bad_people_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_run_config([CONFIG], [override])
    assert key in str(e.value)


def test_bad_people_config_writes_nothing(tmp_path, monkeypatch, capsys):
    from memlm.training.launcher import main

    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    for bad in ("--data.people.levels=[]", "--data.people.mix=2", "--data.people.n_per_level=1000000"):
        assert main(["--config", CONFIG, bad, f"--train.run_dir={runs}"]) == 2
        assert "data.people" in capsys.readouterr().err
    assert not runs.exists() and not (tmp_path / "cache").exists()


def test_shipped_people_config_and_tasks():
    cfg = load_run_config([CONFIG])
    assert [s.kind for s in cfg.data.sources] == ["wiki", "people"] and cfg.data.people.mix == 0.25
    assert cfg.train.probe_facts == 0
    for name in ("people", "people_qa"):
        spec = resolve_task(name)
        assert spec.dataset == "people" and spec.type == "generate"
