"""What continual finetuning did to the knowledge the base model had (Lin et al. 2025 measure forgetting on tasks the
base model can do): the held-in facts the base model answers correctly, the memory slots those answers read, and
recall on exactly those facts after finetuning.

At small scale most held-in questions are answered wrongly (or right by guessing a common pattern) before any
finetuning, so the average over all of them hides forgetting in noise. Restricting to the facts the base model gets
right makes the base recall 1.0 by construction and the drop after finetuning a clean forgetting signal.
"""

from __future__ import annotations

from typing import Any

import torch

from memlm.continual.background import table_counts
from memlm.continual.stream import collate, encode_example

HELDIN_KNOWN = "heldin_known"


def known_predictions(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """The predictions of ``task`` in ``results`` that were exactly right (the facts the model knows)."""
    entry = results["tasks"].get(task) or {}
    return [p for p in entry.get("predictions", []) if p.get("exact_match", 0) >= 1.0]


def recall_on(results: dict[str, Any], task: str, ids: set[str]) -> dict[str, float]:
    """EM / F1 of ``task`` restricted to the examples whose id is in ``ids``."""
    preds = [p for p in results["tasks"][task].get("predictions", []) if p["id"] in ids]
    n = len(preds)
    return {
        "exact_match": sum(p["exact_match"] for p in preds) / n if n else 0.0,
        "f1": sum(p["f1"] for p in preds) / n if n else 0.0,
        "n": n,
    }


def known_forgetting(base: dict[str, Any], after: dict[str, Any], task: str, ids: set[str]) -> dict[str, Any]:
    """The forgetting entry of the known held-in facts: base (1.0 by construction), after, relative drop."""
    b, a = recall_on(base, task, ids), recall_on(after, task, ids)
    out: dict[str, Any] = {"primary_metric": "f1", "n": a["n"]}
    for m in ("exact_match", "f1"):
        drop = (b[m] - a[m]) / b[m] if b[m] > 0 else None
        out[m] = {"base": b[m], "after": a[m], "relative_drop": drop}
    return out


@torch.no_grad()
def answer_slots(model, tok, preds: list[dict[str, Any]], batch_size: int = 64) -> list[torch.Tensor]:
    """Per value table, a (rows,) bool mask of the slots read while the model predicts the answer tokens of each
    prediction's prompt + gold answer (the held-in facts' "core" slots, as far as the answer positions go)."""
    tables = model.value_tables()
    masks = [torch.zeros(t.weight.shape[0], dtype=torch.bool, device=t.weight.device) for t in tables]
    if not preds:
        return masks
    for layer in model.memory_layers:
        layer.record = True
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    preds = [p for p in preds if "{answer}" not in p["prompt"]]  # (a prompt cannot hold the placeholder itself)
    facts = [{"id": p["id"], "question": "", "answers": [p["answers"][0]]} for p in preds]
    exs = [encode_example(tok, f, p["prompt"].replace("{", "{{").replace("}", "}}") + " {answer}", max_len)
           for f, p in zip(facts, preds)]  # fmt: skip
    for i in range(0, len(exs), batch_size):
        batch = collate(exs[i : i + batch_size], tok.pad_id if tok.pad_id >= 0 else 0)
        model(batch.x.to(device))
        for m, c in zip(masks, table_counts(model, batch.answer)):
            m |= c.to(m.device) > 0
    model.train(was_training)
    return masks
