"""eval/speed.py end to end on CPU (--quick): every section runs and writes the JSON the README describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_speed_quick_cpu_writes_every_section(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "eval/speed.py", "--device", "cpu", "--quick", "--iters", "1", "--warmup", "0",
           "--rounds", "1", "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    from memlm.model.memory import cpu_kernels

    assert data["cpu_kernels"] == cpu_kernels.available()  # which CPU paths the numbers are of
    sec = data["sections"]
    assert sorted(sec) == ["a", "b", "c", "d", "e", "f"]
    assert all(v is None or v > 0 for e in sec["a"]["results"] for v in e["ms"].values())
    b = sec["b"]["results"]
    assert [r["model"] for r in b] == ["dense", "memory_plus", "memory_plus"] and b[0]["vs_dense"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in b)
    c = sec["c"]["results"]
    assert {r["value_optimizer"] for r in c} == {"adamw", "row_sparse_adam"} and len(c) == 6
    d = sec["d"]["results"]
    assert [r["slots"] for r in d if r["impl"] == "torch"] == [65536, 262144, 1048576]  # no fused top-k on CPU
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in d)
    e = sec["e"]["results"]
    assert e[0]["layer"] == "dense FFN 4x" and all(r["ms"] > 0 for r in e)
    f = sec["f"]["results"]
    assert [r["impl"] for r in f] == ["dense fused Adam"] + [f"row-sparse {i}" for i in ("reference", "torch")] * 2
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in f)
    assert "(d) product-key retrieval" in res.stdout


def test_speed_cpu_targets_section_and_report(tmp_path):
    """Section g (the CPU targets at 1 and 2 threads; the PyPI peers only if installed) and its markdown report."""
    out = tmp_path / "g.json"
    cmd = [sys.executable, "eval/speed.py", "--device", "cpu", "--quick", "--sections", "g", "--iters", "1",
           "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    g = json.loads(out.read_text())["sections"]["g"]
    assert {r["threads"] for part in g.values() for r in part} == {1, 2}
    memlm_layers = [r for r in g["layers"] if r["layer"].startswith("memlm")]
    assert memlm_layers and all(r["ms"] > 0 for r in g["layers"])
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["rows_touched"] > 0 for r in g["optimizer"])
    for r in g["optimizer"]:  # bandwidths follow from the times: bytes moved / ms
        d = 64  # the --quick table's width
        assert r["sparse_gbs"] == pytest.approx(r["rows_touched"] * d * 4 * 7 / r["sparse_ms"] / 1e6)
        assert r["copy_gbs"] > 0 and r["dense_gbs"] > 0
    dense = [r for r in g["training"] if r["model"].startswith("dense")]
    assert len(dense) == 2 and all(r["vs_dense"] == 1.0 for r in dense)
    from memlm.benchmarks.targets_report import labelled_tables, main, tables

    md = tables([out], [out, out])
    assert "1 run(s) before, 2 run(s) after" in md and "**optimizer**" in md and "**training**" in md
    assert "**bandwidth**" in md and "| row-sparse |" in md
    three = labelled_tables({"v1": [out], "v2": [out], "v3": [out, out]})
    assert "| v2 | v3 |" in three and "2 run(s) v3" in three
    with pytest.raises(SystemExit):  # no runs given
        main([])
