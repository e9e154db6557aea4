"""Which memory slots fact prompts read, and how many other facts read the same slots: a diagnostic of a memory
model's capacity on the invented-people facts (``docs/capacity.md``).

For each QA row the model reads the cloze prompt; at one position of it every memory layer selects ``heads x knn``
slots: the ``answer`` position (the last one, where the first answer token is predicted) or the ``subject``
position (the last token of the person's name, where factual recall in transformers is known to read the subject's
attributes). Over a set of facts this gives, per layer:

- ``coverage``: distinct slots read by all the fact prompts / the slots the layer can address;
- ``slots_per_fact``: distinct slots one prompt reads (at most heads x knn);
- ``shared_frac``: the share of a fact's slots that a fact about *another person* reads too (at the subject position
  the facts of one person read the same slots by construction: one prefix);
- ``conflict_frac``: the share of a fact's slots that another person's fact with *another answer* reads too. Such a
  slot cannot hold the answer for both facts alone; a table whose fact reads are mostly conflicted has to store facts
  in the combination of many slots (or in the dense layers), not in slots of their own;
- ``top1_weight``: the mean largest selection weight (how peaked the read is);

overall and per exposure level (the never-seen level 0 is the control: its prompts name people the model never saw,
so its reads show what an unfamiliar name selects).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def fact_slot_reads(
    model, tokenizer, rows: Sequence[dict], batch_size: int = 64, position: str = "answer"
) -> list[dict[str, torch.Tensor]]:
    """Per memory layer ``{"slots": (n, heads*knn) long, "weights": (n, heads*knn) float, "n_slots": int}``: the
    slots each row's prompt reads at ``position`` (``answer`` or ``subject``; BOS prepended, as the evaluation
    does)."""
    if position not in ("answer", "subject"):
        raise ValueError(f"position must be 'answer' or 'subject', got {position!r}")
    from memlm.inspection.capture import require_memory

    require_memory(model)
    layers = model.memory_layers
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    out: list[dict[str, list]] = [{"slots": [], "weights": []} for _ in layers]
    n_slots = [0] * len(layers)
    try:
        for start in range(0, len(rows), batch_size):
            ids = [bos + tokenizer.encode(r["prompt"]) for r in rows[start : start + batch_size]]
            T = max(map(len, ids))
            x = torch.full((len(ids), T), max(tokenizer.pad_id, 0), dtype=torch.long)
            for i, seq in enumerate(ids):
                x[i, : len(seq)] = torch.tensor(seq)  # right padding: a causal model's earlier positions ignore it
            if position == "answer":
                last = torch.tensor([len(s) - 1 for s in ids])
            else:  # the prompt's prefix up to the end of the name, tokenized alone: its last token
                chunk = rows[start : start + batch_size]
                last = torch.tensor([len(bos) + len(tokenizer.encode(_through_name(r))) - 1 for r in chunk])
            model(x.to(device))
            for j, layer in enumerate(layers):
                slots, n_slots[j] = layer.local_slots(layer.last_indices)  # (B, T, heads, knn)
                b = torch.arange(len(ids))
                out[j]["slots"].append(slots[b, last.to(slots.device)].flatten(1).cpu())
                out[j]["weights"].append(layer.last_weights[b, last.to(slots.device)].flatten(1).float().cpu())
    finally:
        model.train(was_training)
    return [{"slots": torch.cat(o["slots"]), "weights": torch.cat(o["weights"]), "n_slots": n} for o, n in
            zip(out, n_slots)]  # fmt: skip


def _through_name(row: dict) -> str:
    i = row["prompt"].find(row["person"])
    if i < 0:
        raise ValueError(f"row {row.get('id')}: the prompt does not name {row['person']!r}")
    return row["prompt"][: i + len(row["person"])]


def sharing_stats(read: dict[str, torch.Tensor], rows: Sequence[dict]) -> dict[str, Any]:
    """The statistics of the module docstring for one layer's reads of ``rows`` (overall and per ``level``)."""
    slots, weights = read["slots"], read["weights"]
    answers = [r["answers"][0] for r in rows]
    person = [r["person"] for r in rows]
    per_fact = [sorted(set(s.tolist())) for s in slots]
    readers: dict[int, set[int]] = defaultdict(set)  # slot -> facts that read it
    for i, ss in enumerate(per_fact):
        for s in ss:
            readers[s].add(i)
    shared, conflict = [], []
    for i, ss in enumerate(per_fact):
        shared.append(sum(any(person[j] != person[i] for j in readers[s]) for s in ss) / len(ss))
        conflict.append(
            sum(any(person[j] != person[i] and answers[j] != answers[i] for j in readers[s]) for s in ss) / len(ss)
        )
    top1 = weights.abs().max(-1).values

    def summary(idx: list[int]) -> dict[str, float]:
        union = {s for i in idx for s in per_fact[i]}
        return {
            "n_facts": len(idx),
            "distinct_slots": len(union),
            "coverage": len(union) / read["n_slots"],
            "slots_per_fact": sum(len(per_fact[i]) for i in idx) / len(idx),
            "shared_frac": sum(shared[i] for i in idx) / len(idx),
            "conflict_frac": sum(conflict[i] for i in idx) / len(idx),
            "top1_weight": float(top1[idx].mean()),
        }

    levels = sorted({r["level"] for r in rows})
    return {
        "n_slots": read["n_slots"],
        **summary(list(range(len(rows)))),
        "levels": {str(k): summary([i for i, r in enumerate(rows) if r["level"] == k]) for k in levels},
    }


def fact_slot_report(
    model, tokenizer, rows: Sequence[dict], batch_size: int = 64, position: str = "answer"
) -> list[dict[str, Any]]:
    """``sharing_stats`` of every memory layer of ``model`` over ``rows`` at ``position``."""
    return [sharing_stats(read, rows) for read in fact_slot_reads(model, tokenizer, rows, batch_size, position)]
