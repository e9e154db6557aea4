"""The real lm-evaluation-harness (optional extra ``[lm_eval]``) on a tiny memlm export: ``simple_evaluate`` with
``model="memlm"`` on the local YAML tasks of eval/lm_eval_tasks/, one per request type. Skipped without lm_eval."""

import math

import pytest
import torch
from eval_fixtures import REPO, tiny_export

lm_eval = pytest.importorskip("lm_eval", reason="optional extra: pip install -e '.[lm_eval]'")


def test_simple_evaluate_runs_all_three_request_types(tmp_path, monkeypatch):
    import importlib
    import sys

    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    try:
        get_model("memlm")
    except (KeyError, ValueError):  # imported earlier against a stand-in lm_eval (test_eval_adapter): import it anew
        sys.modules.pop("memlm.evaluation.lm_eval_model", None)
        importlib.import_module("memlm.evaluation.lm_eval_model")  # registers "memlm" with the real harness

    export = tiny_export(tmp_path / "export", tmp_path / "cache")
    monkeypatch.chdir(REPO)  # the tasks' data_files are relative to the repository root
    tasks = ["memlm_local_qa", "memlm_local_mc", "memlm_local_text"]
    out = lm_eval.simple_evaluate(
        model="memlm", model_args=f"pretrained={export},batch_size=4", tasks=tasks, limit=3,
        log_samples=True,
        task_manager=TaskManager(include_path=str(REPO / "eval" / "lm_eval_tasks"), include_defaults=False),
    )  # fmt: skip
    res = out["results"]
    assert 0.0 <= res["memlm_local_qa"]["exact_match,strip"] <= 1.0  # generate_until
    assert 0.0 <= res["memlm_local_mc"]["acc,none"] <= 1.0  # loglikelihood
    assert math.isfinite(res["memlm_local_text"]["word_perplexity,none"])  # loglikelihood_rolling
    assert res["memlm_local_text"]["word_perplexity,none"] > 1.0
    assert {s["doc_id"] for s in out["samples"]["memlm_local_mc"]} == {0, 1, 2}
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["memlm_local_qa"])


def test_command_line_options_do_not_collide_with_model_args(tmp_path):
    from memlm.evaluation.lm_eval_model import MemLMHarnessLM

    export = tiny_export(tmp_path / "export", tmp_path / "cache")
    extra = {"batch_size": 8, "device": "cuda"}  # lm_eval's command line defaults to cuda
    lm = MemLMHarnessLM.create_from_arg_string(f"pretrained={export},batch_size=4", extra)
    assert lm.adapter.batch_size == 4  # model_args wins over lm_eval's --batch_size
    if not torch.cuda.is_available():
        assert next(lm.adapter.model.parameters()).device.type == "cpu"  # falls back instead of failing
