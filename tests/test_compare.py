"""eval/compare.py end to end: two fixture-sized variants, 3 steps each, through the same command a user types."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/fixtures/train/tiny.yaml"
BASE = "vocab_size: 512\ndim: 32\nn_layers: 2\nn_heads: 2\nmax_seq_len: 32\n"
MODELS = {
    "dense": BASE + "ffn_hidden: 96\n",
    "ultramem_v2": BASE
    + "ffn_hidden: 48\nmemory: {kind: ultramem_v2, layers: [0, 1], mode: parallel, n_keys: 8, heads: 2, knn: 4, "
    "k_dim: 16, pre_dim: 8}\n",
}


def run_compare(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLM_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "eval/compare.py", "--config", TINY, "--model_dir", str(tmp / "models"), "--steps", "3"]
    cmd += [
        "--variants",
        "dense,ultramem_v2",
        "--out",
        str(tmp / "out"),
        "--usage_batches",
        "2",
        "--bench_rounds",
        "2",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    (tmp / "models").mkdir()
    for name, text in MODELS.items():
        (tmp / "models" / f"tiny_{name}.yaml").write_text(text)
    # countries only: the fact probe needs no download
    r = run_compare(tmp, "--train.probe_facts=4", "--data.facts.groups=[countries]")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_table_rows_columns_and_numbers(compared):
    tmp, _ = compared
    data = json.loads((tmp / "out" / "compare.json").read_text())
    assert data["meta"]["steps"] == 3 and data["meta"]["seed"] == 0
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "ultramem_v2"]
    for name, r in rows.items():
        assert r["error"] is None, name
        assert r["steps"] == 3 and r["tokens"] == 3 * 4 * 32, name  # same token budget: steps x batch x seq_len
        assert 0 < r["val_loss"] < 10 and 0 < r["initial_val_loss"] < 10, name
        assert r["fact_n"] == 4 and 0.0 <= r["fact_em"] <= 1.0, name
        assert r["tokens_per_s"] > 0 and r["bench_tokens_per_s"] > 0 and r["flops_per_token"] > 0, name
        assert r["total_params"] >= r["active_params"] > 0, name
    dense, mem = rows["dense"], rows["ultramem_v2"]
    assert dense["total_params"] == dense["active_params"]
    assert dense["mem_coverage"] is None and dense["memory_usage"] is None
    assert mem["total_params"] > mem["active_params"]  # the memory tables are read sparsely
    assert 0.0 < mem["mem_coverage"] <= 1.0 and mem["mem_kl"] >= 0.0
    assert not (Path(mem["run_dir"]) / "checkpoints").exists()  # pruned once the row is written
    assert (Path(mem["run_dir"]) / "export" / "model.safetensors").is_file()
    # UltraMemV2: two layers, each measured over its own 8**2-row window of the global table
    assert [layer["n_rows"] for layer in mem["memory_usage"]["layers"]] == [64, 64]

    md = (tmp / "out" / "compare.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in (
        "variant",
        "val loss",
        "fact EM",
        "train tok/s",
        "fwd+bwd tok/s",
        "total params",
        "active params",
        "mem coverage",
    ):
        assert col in header, col
    body = {ln.strip("|").split("|")[0].strip(): ln for ln in lines[2:]}
    assert set(body) == {"dense", "ultramem_v2"}
    assert all(len(ln.strip("|").split("|")) == len(header) for ln in lines)


def test_skip_existing_reuses_finished_runs(compared):
    tmp, _ = compared
    (tmp / "out" / "rows" / "dense.json").unlink()  # a row lost: rebuilt from the finished run, no training
    r = run_compare(
        tmp, "--train.probe_facts=4", "--data.facts.groups=[countries]", "--skip_existing", "--bench_rounds", "0"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dense: reusing finished run" in r.stdout and "ultramem_v2: reusing" in r.stdout
    assert "training 3 steps" not in r.stdout


def test_unknown_variant_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "eval/compare.py", "--variants", "dense,moe", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "moe" in r.stderr and "Traceback" not in r.stderr


def test_seeds_aggregate_mean_and_standard_error(tmp_path):
    """--seeds 2: every variant trained with seeds 0 and 1 (runs {variant}_s{seed}); the aggregate of every metric is
    the mean and the standard error (sample std / sqrt(n)) of the per-seed rows, and the table shows it."""
    import math

    (tmp_path / "models").mkdir()
    for name, text in MODELS.items():
        (tmp_path / "models" / f"tiny_{name}.yaml").write_text(text)
    r = run_compare(tmp_path, "--seeds", "2", "--bench_rounds", "0", "--usage_batches", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert data["meta"]["seeds"] == 2
    runs = {(row["variant"], row["seed"]): row for row in data["rows"]}
    assert set(runs) == {(v, s) for v in ("dense", "ultramem_v2") for s in (0, 1)}
    assert {row["run"] for row in data["rows"]} == {f"{v}_s{s}" for v in ("dense", "ultramem_v2") for s in (0, 1)}
    for variant in ("dense", "ultramem_v2"):
        a, b = runs[(variant, 0)]["val_loss"], runs[(variant, 1)]["val_loss"]
        assert a != b  # another seed is another run
        agg = data["aggregate"][variant]["metrics"]["val_loss"]
        assert agg["n"] == 2 and math.isclose(agg["mean"], (a + b) / 2)
        assert math.isclose(agg["se"], abs(a - b) / 2)  # n = 2: std = |a - b| / sqrt(2), SE = std / sqrt(2)
        assert data["aggregate"][variant]["metrics"]["active_params"]["se"] == 0.0
    md = (tmp_path / "out" / "compare.md").read_text()
    body = [ln for ln in md.splitlines() if ln.startswith("| dense |") or ln.startswith("| ultramem_v2 |")]
    assert len(body) == 2 and all("±" in ln for ln in body)  # one line per variant, mean ± SE cells
    dense = data["aggregate"]["dense"]["metrics"]["val_loss"]
    assert f"{dense['mean']:.3f} ± {dense['se']:.3f}" in body[0]
    assert "Val loss vs dense (difference ± SE" in md
