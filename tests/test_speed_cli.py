"""eval/speed.py end to end on CPU (--quick): every section runs and writes the JSON the README describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_quick_cpu_writes_every_section(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "eval/speed.py", "--device", "cpu", "--quick", "--iters", "1", "--warmup", "0",
           "--rounds", "1", "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
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
