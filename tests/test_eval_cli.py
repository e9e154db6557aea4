"""eval/run.py and eval/forgetting.py end to end on a tiny export, the forgetting numbers, and bad-input exits."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from eval_fixtures import FIXTURES, REPO, tiny_export

from memlm.evaluation import forgetting_report, format_report, plot_forgetting, relative_drop
from memlm.evaluation.cli import forgetting_main, run_main
from memlm.evaluation.forgetting import run_labels


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return tiny_export(root / "base", root / "cache", seed=0), tiny_export(root / "after", root / "cache", seed=1)


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "eval" / name), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)  # fmt: skip


def test_run_script_end_to_end(exports, tmp_path):
    base, _ = exports
    out = tmp_path / "res.json"
    tasks = f"{FIXTURES / 'task_local.yaml'},mc:{FIXTURES / 'mc.jsonl'},ppl:{FIXTURES / 'heldout.txt'}"
    r = _script("run.py", "--ckpt", str(base), "--tasks", tasks, "--limit", "4", "--batch_size", "2", "--out",
                str(out), "--predictions", "--tensorboard", str(tmp_path / "tb"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| fixture_qa | exact_match |" in r.stdout and "| mc | acc |" in r.stdout
    res = json.loads(out.read_text())
    cfg = res["config"]
    assert cfg["checkpoint_sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert cfg["limit"] == 4 and cfg["tasks"] == ["fixture_qa", "mc", "heldout"] and cfg["num_params"] > 0
    qa = res["tasks"]["fixture_qa"]
    assert qa["n"] == 4 and len(qa["predictions"]) == 4 and qa["source"].startswith("local ")
    assert {"prediction", "answers", "exact_match", "f1"} <= set(qa["predictions"][0])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_run_script_unknown_task_exits_2_without_traceback(exports):
    r = _script("run.py", "--ckpt", str(exports[0]), "--tasks", "triviaqa,nope")
    assert r.returncode == 2
    assert "unknown task 'nope'" in r.stderr and "nq_open" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", str(FIXTURES / "task_missing_field.yaml")], "missing required field(s) ['dataset']"),
        (["--tasks", f"qa:{FIXTURES / 'qa_no_answers.jsonl'}"], "qa_no_answers.jsonl:2"),
        (["--tasks", f"mc:{FIXTURES / 'qa.jsonl'}"], "choices"),
    ],
)
def test_bad_input_is_one_clear_error(exports, capsys, args, needle):
    assert run_main(["--ckpt", str(exports[0]), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_not_an_export_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "somedir").mkdir()
    assert run_main(["--ckpt", str(tmp_path / "somedir"), "--tasks", "triviaqa"]) == 2
    assert "not a memlm export" in capsys.readouterr().err
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    assert run_main(["--ckpt", str(tmp_path / "x.ckpt"), "--tasks", "triviaqa"]) == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ forgetting
def _results(**tasks):
    return {"tasks": {name: {"primary_metric": pm, "metrics": m, "spec": {"metrics": list(m)}}
                      for name, (pm, m) in tasks.items()}}  # fmt: skip


def test_forgetting_report_numbers(tmp_path):
    base = _results(nq=("f1", {"f1": 0.40, "exact_match": 0.20}), ppl=("bits_per_byte", {"bits_per_byte": 2.0}),
                    zero=("f1", {"f1": 0.0}))  # fmt: skip
    full = _results(nq=("f1", {"f1": 0.044, "exact_match": 0.02}), ppl=("bits_per_byte", {"bits_per_byte": 2.5}),
                    zero=("f1", {"f1": 0.1}))  # fmt: skip
    smf = _results(nq=("f1", {"f1": 0.356, "exact_match": 0.25}), ppl=("bits_per_byte", {"bits_per_byte": 1.9}))
    rep = forgetting_report(base, [full, smf], labels=["full", "smf"])
    nq = rep["tasks"]["nq"]["metrics"]
    assert nq["f1"]["relative_drop"] == pytest.approx([0.89, 0.11])  # the SMF paper's headline shape
    assert nq["exact_match"]["relative_drop"] == pytest.approx([0.9, -0.25])  # improvement = negative drop
    assert nq["f1"]["delta"] == pytest.approx([-0.356, -0.044])
    ppl = rep["tasks"]["ppl"]["metrics"]["bits_per_byte"]
    assert ppl["higher_is_better"] is False and ppl["relative_drop"] == pytest.approx([0.25, -0.05])
    assert rep["tasks"]["zero"]["metrics"]["f1"]["relative_drop"] == [None, None]  # zero base; smf lacks the task
    assert rep["summary"]["full"]["nq"] == pytest.approx(0.89) and rep["summary"]["smf"]["ppl"] == pytest.approx(-0.05)
    assert relative_drop(0.5, 0.25) == 0.5 and relative_drop(0.0, 0.3) is None
    assert "+89.0%" in format_report(rep)
    png = plot_forgetting(rep, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_columns_are_named_by_run():
    paths = ["runs/smf/export", "runs/full_ft/export", "runs/lora/checkpoints/last.ckpt", "runs/mem/results.json"]
    assert run_labels(paths) == ["smf", "full_ft", "lora", "mem"]
    assert run_labels(["a/smf/export", "b/smf/export"]) == ["a/smf", "b/smf"]  # parents until they differ
    assert run_labels(["runs/smf/export", "runs/smf/export"]) == ["1:runs/smf", "2:runs/smf"]


def test_forgetting_script(exports, tmp_path, capsys):
    base, after = exports
    tasks = f"mc:{FIXTURES / 'mc.jsonl'},ppl:{FIXTURES / 'heldout.txt'}"
    assert forgetting_main(["--base", str(base), "--after", str(after), str(base), "--tasks", tasks,
                            "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert (tmp_path / "out" / "forgetting.png").stat().st_size > 1000
    assert set(rep["tasks"]) == {"mc", "heldout"} and len(rep["after"]) == 2
    assert rep["summary"][rep["after"][1]]["heldout"] == pytest.approx(0.0, abs=1e-6)  # base vs itself: no drop
    assert "| heldout | bits_per_byte |" in capsys.readouterr().out
