"""eval/capacity.py end to end at fixture size: two models x two seeds, 3 steps each, through the same command a user
types; then the aggregation over seeds, the reuse of finished runs and the refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
model: {vocab_size: 512, dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32, ffn_hidden: 96}
data:
  sources: [{kind: text, path: tests/fixtures/train/corpus.txt}, {kind: people}]
  people: {n_per_level: 3, levels: [0, 1, 4], attributes: [birth_year, field], templates: 2}
  tokenizer: {vocab_size: 512}
  val_fraction: 0.1
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {batch_size: 4, probe_facts: 0}
trainer: {max_steps: 3, val_check_interval: 3, limit_val_batches: 1, enable_progress_bar: false}
"""
LADDER = """\
recipe: recipe.yaml
seeds: 2
baseline: dense
reference: dense
models:
  - {name: dense}
  - name: memory_plus_64
    overrides: [--model.memory.kind=memory_plus, "--model.memory.layers=[1]", --model.memory.n_keys=8,
                --model.memory.heads=2, --model.memory.knn=4, --model.memory.k_dim=16, --model.ffn_hidden=48]
"""


def run_capacity(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLM_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "eval/capacity.py", "--ladder", str(tmp / "ladder.yaml"), "--out", str(tmp / "out"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capacity")
    (tmp / "recipe.yaml").write_text(RECIPE)
    (tmp / "ladder.yaml").write_text(LADDER)
    r = run_capacity(tmp, "--jobs", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r


def test_every_model_and_seed_is_trained_evaluated_and_aggregated(ladder):
    tmp, r = ladder
    data = json.loads((tmp / "out" / "report" / "capacity.json").read_text())
    runs = {(x["model"], x["seed"]): x for x in data["runs"]}
    assert set(runs) == {(m, s) for m in ("dense", "memory_plus_64") for s in (0, 1)}
    for (m, s), x in runs.items():
        assert (tmp / "out" / "runs" / f"{m}_s{s}" / "export" / "model.safetensors").is_file()
        assert set(x["levels"]) == {"0", "1", "4"} and x["levels"]["1"]["n"] == 6  # 3 people x 2 attributes
        assert 0.0 <= x["exact_match_seen"] <= 1.0 and x["bits_max"] > 0
    assert runs[("dense", 0)]["val_loss"] != runs[("dense", 1)]["val_loss"]  # the seed reaches training
    assert runs[("memory_plus_64", 0)]["slots"] == 64 and runs[("dense", 0)]["slots"] is None
    reads = runs[("memory_plus_64", 0)]["slot_reads"]  # which slots the fact prompts read (memory models only)
    assert set(reads) == {"answer", "subject"} and "slot_reads" not in runs[("dense", 0)]
    assert reads["answer"]["n_facts"] == 18 and 0 < reads["answer"]["distinct_slots"] <= 64
    assert reads["answer"]["slots_per_fact"] <= 2 * 4  # heads x knn
    s = data["summary"]["models"]
    for m in ("dense", "memory_plus_64"):
        a, b = runs[(m, 0)], runs[(m, 1)]
        for key in ("val_loss", "exact_match_seen", "lift_seen", "bits"):
            agg = s[m]["agg"][key]
            assert agg["n"] == 2 and math.isclose(agg["mean"], (a[key] + b[key]) / 2), (m, key)
            assert math.isclose(agg["se"], abs(a[key] - b[key]) / 2, abs_tol=1e-12), (m, key)
        level = s[m]["levels"]["4"]["exact_match"]
        assert math.isclose(level["mean"], (a["levels"]["4"]["exact_match"] + b["levels"]["4"]["exact_match"]) / 2)
    assert s["dense"]["flops_vs_baseline"] == 1.0
    assert "lift_vs_baseline" not in s["dense"]  # the baseline against itself is no measurement
    lifts = s["memory_plus_64"]["agg"]["lift_seen"]["mean"], s["dense"]["agg"]["lift_seen"]["mean"]
    if lifts[1]:
        assert math.isclose(s["memory_plus_64"]["lift_vs_baseline"]["mean"], lifts[0] / lifts[1])
    d = s["memory_plus_64"]["em_minus_baseline"]["4"]
    assert math.isclose(d["mean"], s["memory_plus_64"]["levels"]["4"]["exact_match"]["mean"]
                        - s["dense"]["levels"]["4"]["exact_match"]["mean"], abs_tol=1e-12)  # fmt: skip
    for png in ("recall_vs_exposure.png", "recall_vs_memory_size.png"):
        assert (tmp / "out" / "report" / png).stat().st_size > 1000
    md = (tmp / "out" / "report" / "capacity.md").read_text()
    assert "Command: `python eval/capacity.py" in md and "| memory_plus_64 | 2 | 64 |" in md
    assert "4/4 runs done" in r.stdout and "ETA" in r.stdout  # progress a person can follow


def test_a_rerun_reuses_every_finished_run(ladder):
    tmp, _ = ladder
    before = (tmp / "out" / "runs" / "dense_s0" / "summary.yaml").stat().st_mtime_ns
    r = run_capacity(tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(0 to do)" in r.stdout
    assert (tmp / "out" / "runs" / "dense_s0" / "summary.yaml").stat().st_mtime_ns == before
    full = (tmp / "out" / "report" / "capacity.json").read_bytes()
    r = run_capacity(tmp, "--models", "dense", "--seeds", "1", "--limit", "6")  # a quick look at one model
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / "out" / "evals" / "dense_s0.limit6.json").is_file()  # beside the full eval, not instead of it
    quick = json.loads((tmp / "out" / "report_partial" / "capacity.json").read_text())
    assert [x["name"] for x in quick["runs"]] == ["dense_s0"] and quick["runs"][0]["levels"]["1"]["n"] == 2
    assert (tmp / "out" / "report" / "capacity.json").read_bytes() == full  # the full report is untouched


def test_bad_ladders_are_one_line_errors_and_write_nothing(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    cases = {
        "baseline": LADDER.replace("baseline: dense", "baseline: moe"),
        "models": "recipe: recipe.yaml\nmodels: []\n",
        "overrides must be": LADDER.replace("- {name: dense}", "- {name: dense, overrides: [dim=3]}"),
        "people source": LADDER.replace("recipe.yaml", "plain.yaml"),
    }
    (tmp_path / "plain.yaml").write_text(RECIPE.replace(", {kind: people}", ""))
    for needle, text in cases.items():
        (tmp_path / "ladder.yaml").write_text(text)
        r = run_capacity(tmp_path)
        assert r.returncode == 2, (needle, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (needle, r.stderr)
        assert not (tmp_path / "out").exists()
    (tmp_path / "ladder.yaml").write_text(LADDER)
    r = run_capacity(tmp_path, "--seeds", "0")
    assert r.returncode == 2 and "--seeds" in r.stderr


def test_an_existing_run_dir_of_another_recipe_is_refused(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "ladder.yaml").write_text(LADDER)
    mine = tmp_path / "out" / "runs" / "dense_s0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    r = run_capacity(tmp_path)
    assert r.returncode == 2 and "dense_s0 exists" in r.stderr
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "out" / "logs").exists()
    r = run_capacity(tmp_path, "--report_only")  # a report skips what is not its own, and touches nothing
    assert r.returncode == 2 and "no evaluated runs" in r.stderr
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_slot_sharing_statistics_of_constructed_reads():
    """Two facts of person A (answers x, y) and one of B (answer x): sharing counts only other persons' facts,
    conflict only other persons' facts with another answer."""
    import torch

    from memlm.inspection.fact_slots import sharing_stats

    rows = [{"person": "A", "answers": ["x"], "level": 1}, {"person": "A", "answers": ["y"], "level": 1},
            {"person": "B", "answers": ["x"], "level": 2}]  # fmt: skip
    read = {"slots": torch.tensor([[1, 2], [2, 3], [3, 4]]), "weights": torch.tensor([[0.9, 0.1], [0.5, 0.5],
            [0.6, 0.4]]), "n_slots": 8}  # fmt: skip
    s = sharing_stats(read, rows)
    assert s["distinct_slots"] == 4 and s["coverage"] == 0.5 and s["slots_per_fact"] == 2
    assert math.isclose(s["shared_frac"], (0 + 0.5 + 0.5) / 3)  # slot 2 is A's alone; slot 3 is A's and B's
    assert math.isclose(s["conflict_frac"], (0 + 0.5 + 0.5) / 3)
    assert math.isclose(s["top1_weight"], (0.9 + 0.5 + 0.6) / 3, rel_tol=1e-6)  # float32 weights
    assert s["levels"]["1"]["distinct_slots"] == 3 and s["levels"]["2"]["shared_frac"] == 0.5
    rows[2]["answers"] = ["y"]  # B now shares its slot 3 with A's fact of the same answer: shared, no conflict
    s = sharing_stats(read, rows)
    assert math.isclose(s["levels"]["2"]["conflict_frac"], 0.0) and math.isclose(s["levels"]["2"]["shared_frac"], 0.5)


def test_exposures_for_interpolates_in_log_exposure():
    from memlm.experiments.capacity import exposures_for

    em = {"0": 0.9, "1": 0.1, "4": 0.3, "16": 0.7}
    levels = {k: {"exact_match": v} for k, v in em.items()}
    assert math.isclose(exposures_for(levels, 0.5), 8.0)  # halfway between log2 4 = 2 and log2 16 = 4; k = 0 ignored
    assert exposures_for(levels, 0.05) == 1.0 and exposures_for(levels, 0.8) is None
