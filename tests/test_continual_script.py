"""The continual-finetune script end to end at tiny size (the command a user types), the comparison, and bad input:
one clear error, nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memlm
from memlm.config import MemoryConfig, ModelConfig
from memlm.continual import script
from memlm.data.corpus import read_text
from memlm.data.tokenizer import Tokenizer
from memlm.model import MemLM

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "train" / "corpus.txt"
TRIVIA = ROOT / "tests" / "fixtures" / "triviaqa_validation_sample.txt"


def _export(base: Path, name: str, memory: bool = True, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = Tokenizer.train(read_text(CORPUS), 512, cache_dir=base / "cache")
    mem = MemoryConfig(kind="memory_plus", layers=[1], n_keys=8, heads=2, knn=4, k_dim=16) if memory else None
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=48, memory=mem)
    run_config = {"data": {"sources": [{"kind": "text", "path": str(CORPUS)}], "tokenizer": {"vocab_size": 512},
                           "val_fraction": 0.1, "facts": {"groups": ["countries"]}}}  # fmt: skip
    return memlm.save_pretrained(MemLM(cfg), base / name, tok, run_config)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("continual")
    from memlm.data.qa import parse_topics

    rows, _ = parse_topics(TRIVIA, "tqa")
    facts = base / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (base / "empty.jsonl").write_text("", encoding="utf-8")
    os.environ["MEMLM_CACHE"] = str(base / "cache")
    return {"base": base, "ckpt": _export(base, "export"), "facts": facts}


def _args(env, out: Path, *extra: str) -> list[str]:
    return [
        "--ckpt", str(env["ckpt"]), "--config", str(ROOT / "configs/finetune/sparse_memory.yaml"),
        f"--stream.dataset={env['facts']}", "--stream.stages=2", "--stream.facts_per_stage=4", "--stream.paraphrases=8",
        "--smf.top_t=16", "--smf.background_batches=4", "--smf.background_batch_size=4", "--eval.heldin_limit=8",
        "--eval.ppl_docs=5", "--train.batch_size=8", f"--out_dir={out}", *extra,
    ]  # fmt: skip


def test_script_end_to_end(env):
    out = env["base"] / "out"
    cmd = [sys.executable, "-m", "memlm.continual", *_args(env, out), "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "sparse_memory"
    for f in ("config.yaml", "base.json", "stage_1.json", "stage_2.json", "summary.json", "learning_forgetting.png",
              "facts/stage1.jsonl", "facts/stage2.jsonl"):  # fmt: skip
        assert (run / f).is_file(), f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    s = json.loads((run / "summary.json").read_text())
    assert len(s["stages"]) == 2 and s["background"]["computed_now"] is True
    st = s["stages"][1]
    assert st["learning"]["n"] == 8 and set(st["retention"]) == {"new_facts_stage1"}
    assert {"heldin", "heldout_text"} <= set(st["forgetting"])
    assert 0 < st["train"]["mean_smf/selected"] <= 16
    assert (env["ckpt"] / "smf_background.pt").is_file()
    # the finetuned model is saved in export format and loads with memlm.load_pretrained
    assert s["export"] == str(run / "export")
    tuned, tok = memlm.load_pretrained(run / "export")
    base_model, _ = memlm.load_pretrained(env["ckpt"])
    moved = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base_model.state_dict()[n])]
    assert tok is not None and moved and all("value" in n for n in moved), moved  # SMF moved only value rows
    assert {"heldin", "heldout_text"} <= set(s["stages"][-1]["forgetting"])
    # a second run (its own out dir: an existing one is never overwritten) reuses the background statistics
    assert script.main(_args(env, out, "--quiet", "--name=again")) == 0
    assert json.loads((out / "again" / "summary.json").read_text())["background"]["computed_now"] is False


def test_compare_all_methods(env, capsys):
    from memlm.continual import compare

    out = env["base"] / "cmp"
    args = ["--ckpt", str(env["ckpt"]), "--out_dir", str(out), "--quiet", *_args(env, out)[4:-1]]
    args = [a for a in args if not a.startswith("--smf.")]
    args += ["--sparse_memory.smf.top_t=16", "--sparse_memory.smf.background_batches=4",
             "--sparse_memory.smf.background_batch_size=4", "--stream.stages=1"]  # fmt: skip
    assert compare.main(args) == 0, capsys.readouterr().err
    table = (out / "compare.md").read_text()
    for m in compare.METHODS:
        assert f"| {m} |" in table
        assert (out / m / "summary.json").is_file()
    assert (out / "compare.png").is_file()
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == list(compare.METHODS)


def _bad(env, capsys, out: Path, *extra: str, ckpt: Path | None = None) -> str:
    args = _args(env, out, "--quiet", *extra)
    if ckpt is not None:
        args[1] = str(ckpt)
    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists(), "nothing may be written on bad input"
    return err


def test_bad_dense_checkpoint_with_sparse_memory(env, capsys):
    dense = _export(env["base"], "dense", memory=False)
    err = _bad(env, capsys, env["base"] / "bad1", ckpt=dense)
    assert "memory layers" in err
    assert not (dense / "smf_background.pt").exists()


def test_bad_top_t_larger_than_table(env, capsys):
    err = _bad(env, capsys, env["base"] / "bad2", "--smf.top_t=65")
    assert "top_t" in err and "64" in err


def test_bad_background_from_another_checkpoint(env, capsys):
    other = _export(env["base"], "other", seed=1)
    assert script.main(_args(env, env["base"] / "ok", "--quiet", "--stream.stages=1")) == 0  # stats for env["ckpt"]
    shutil.copy(env["ckpt"] / "smf_background.pt", other / "smf_background.pt")
    err = _bad(env, capsys, env["base"] / "bad3", ckpt=other)
    assert "another checkpoint" in err and "recompute_background" in err
    # recomputing on request fixes it
    assert script.main(_args(env, env["base"] / "bad3", "--quiet", "--stream.stages=1",
                             "--smf.recompute_background=true") + ["--ckpt", str(other)]) == 0  # fmt: skip


@pytest.mark.parametrize("extra,needle", [
    (("--stream.dataset={empty}",), "empty"),
    (("--stream.offset=1000",), "empty"),
    (("--stream.facts_per_stage=100",), "needs"),
    (("--optim.name=adamw",), "optim.name"),
    (("--smf.top_k=3",), "smf.top_k"),
])  # fmt: skip
def test_bad_stream_and_config(env, capsys, extra, needle):
    extra = tuple(e.format(empty=env["base"] / "empty.jsonl") for e in extra)
    err = _bad(env, capsys, env["base"] / "bad4", *extra)
    assert needle in err


def test_every_finetune_config_parses():
    import itertools

    from memlm.config import load_finetune_config, read_yaml
    from memlm.continual import sweep

    for path in sorted((ROOT / "configs" / "finetune").glob("*.yaml")):
        raw = read_yaml(path)
        if "sweep" in raw:  # a frontier sweep: every point of every method resolves to a valid config
            spec = sweep.parse_spec(raw.pop("sweep"))
            points = sweep.build_points(spec, raw, ROOT / "configs" / "finetune", Path("/nonexistent"), 1)
            assert len(points) == sum(
                len(list(itertools.product(*m["grid"].values()))) for m in spec["methods"].values()
            ), path
            continue
        cfg = load_finetune_config([path])
        assert cfg.optim.lr > 0, path
