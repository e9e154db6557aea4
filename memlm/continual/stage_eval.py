"""What continual finetuning is judged on after every stage (Lin et al. 2025, "Continual Learning via Sparse Memory
Finetuning"), computed through the evaluation harness (:func:`memlm.evaluation.evaluate`, one metric code path):

1. learning — recall (EM, F1) on the new facts trained so far;
2. forgetting of pretraining knowledge — recall on held-in pretraining facts (worldfacts) and perplexity on held-out
   general text (validation documents of the checkpoint's non-fact pretraining sources), relative to the base model
   (:func:`memlm.evaluation.forgetting_report`);
3. retention of earlier stages' new facts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memlm.config import FinetuneConfig

HELDIN, PPL = "heldin", "heldout_text"


def stage_task(k: int) -> str:
    return f"new_facts_stage{k + 1}"


def write_heldout_text(run_config: dict[str, Any], path: Path, n_docs: int | None) -> Path | None:
    """Validation documents of the checkpoint's pretraining corpus (non-worldfacts sources when there are any) as a
    JSONL file for a perplexity task; None when the corpus has no validation documents."""
    from memlm.config import DataConfig, from_dict, to_dict
    from memlm.data.corpus import build_corpus
    from memlm.data.datamodule import in_val

    raw = to_dict(from_dict(DataConfig, run_config.get("data") or {}, prefix="data"))
    general = [s for s in raw["sources"] if s["kind"] != "worldfacts"] or raw["sources"]
    data = from_dict(DataConfig, {**raw, "sources": general}, prefix="data")
    docs = list(dict.fromkeys(d for d in build_corpus(data).documents if in_val(d, data.val_fraction, data.seed)))
    docs = docs[:n_docs] if n_docs else docs
    if not docs:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def task_groups(cfg: FinetuneConfig, fact_files: list[Path], ppl_file: Path | None) -> list[tuple[list, int | None]]:
    """(task specs, limit) groups: the new facts of each stage, held-in facts, held-out text, extra tasks."""
    from memlm.evaluation.tasks import resolve_task

    e = cfg.eval
    new = [
        {"name": stage_task(k), "type": "generate", "dataset": "qa_jsonl", "path": str(f), "template": e.prompt,
         "until": list(e.until), "max_new_tokens": e.max_new_tokens, "metrics": ["exact_match", "f1"]}
        for k, f in enumerate(fact_files)
    ]  # fmt: skip
    heldin = resolve_task(e.heldin_task).to_dict()
    heldin["name"] = HELDIN
    groups: list[tuple[list, int | None]] = [(new, None), ([heldin], e.heldin_limit)]
    if e.ppl_task:
        spec = resolve_task(e.ppl_task).to_dict()
        groups.append(([{**spec, "name": PPL}], e.ppl_docs))
    elif ppl_file is not None:
        groups.append(([{"name": PPL, "type": "perplexity", "dataset": "jsonl", "path": str(ppl_file)}], None))
    if e.extra_tasks:
        groups.append((list(e.extra_tasks), e.extra_limit))
    return groups


def run_eval(model, tokenizer, groups, run_config: dict, batch_size: int, progress: bool = False) -> dict[str, Any]:
    """Every group through :func:`memlm.evaluation.evaluate`; one merged results dict."""
    from memlm.evaluation import evaluate

    out: dict[str, Any] = {"tasks": {}}
    for specs, limit in groups:
        r = evaluate(model, tokenizer, specs, limit=limit, batch_size=batch_size, progress=progress,
                     run_config=run_config, predictions=True)  # fmt: skip
        out["tasks"].update(r["tasks"])
    return out


def _recall(results: dict, names: list[str]) -> dict[str, float]:
    """EM / F1 over the union of the facts of ``names`` (weighted by their sizes)."""
    n = sum(results["tasks"][t]["n"] for t in names)
    em = sum(results["tasks"][t]["metrics"]["exact_match"] * results["tasks"][t]["n"] for t in names)
    f1 = sum(results["tasks"][t]["metrics"]["f1"] * results["tasks"][t]["n"] for t in names)
    return {"exact_match": em / n if n else 0.0, "f1": f1 / n if n else 0.0, "n": n}


def summarize(base: dict, after: dict, stage: int, n_stages: int) -> dict[str, Any]:
    """One stage's learning / forgetting / retention numbers (relative to ``base``)."""
    from memlm.evaluation import forgetting_report

    so_far = [stage_task(k) for k in range(stage + 1)]
    rep = forgetting_report(base, [after], labels=["after"])
    forgetting = {}
    for task, entry in rep["tasks"].items():
        if task.startswith("new_facts_"):
            continue
        forgetting[task] = {
            m: {"base": r["base"], "after": r["after"][0], "relative_drop": r["relative_drop"][0]}
            for m, r in entry["metrics"].items()
        }
        forgetting[task]["primary_metric"] = entry["primary_metric"]
    return {
        "stage": stage + 1,
        "learning": _recall(after, so_far),
        "current_stage": _recall(after, [so_far[-1]]),
        "retention": {stage_task(k): _recall(after, [stage_task(k)]) for k in range(stage)},
        "not_yet_trained": _recall(after, [stage_task(k) for k in range(stage + 1, n_stages)]),
        "base_learning": _recall(base, so_far),
        "forgetting": forgetting,
    }


def strip_predictions(results: dict[str, Any], keep: int = 20) -> dict[str, Any]:
    """Results with at most ``keep`` predictions per task (JSON files stay small but inspectable)."""
    out = {"tasks": {}}
    for t, e in results["tasks"].items():
        out["tasks"][t] = {**e, "predictions": e.get("predictions", [])[:keep]}
    return out
