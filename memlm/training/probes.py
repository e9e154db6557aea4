"""Quick factual-recall probe used at the end of training: greedy answers to a sample of pretraining facts."""

from __future__ import annotations

import random

from memlm.config import DataConfig
from memlm.evaluation.metrics import qa_scores

PROMPT = "Question: {question}\nAnswer:"


def fact_recall(model, tokenizer, data_cfg: DataConfig, n: int = 200, max_new_tokens: int = 12, batch_size: int = 32):
    """Exact match / F1 of greedy answers on ``n`` seeded-sampled facts of the ``pretrain`` split."""
    from memlm.data.facts import worldfacts_qa

    f = data_cfg.facts
    rows = worldfacts_qa(
        "pretrain", heldout_fraction=f.heldout_fraction, seed=f.seed, groups=f.groups,
        min_city_population=f.min_city_population, cache_dir=data_cfg.cache_dir,
    )  # fmt: skip
    rows = random.Random(0).sample(rows, min(n, len(rows)))
    device = next(model.parameters()).device
    stop = {tokenizer.eos_id} | set(tokenizer.encode("\n"))
    em = f1 = 0.0
    examples = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [tokenizer.encode(PROMPT.format(question=r["question"]), bos=True) for r in chunk]
        outs = model.to(device).generate(prompts, max_new_tokens, stop_tokens=stop, pad_id=max(tokenizer.pad_id, 0))
        for r, o in zip(chunk, outs):
            pred = tokenizer.decode(o).split("\n")[0].strip()
            s = qa_scores(pred, r["answers"])
            em += s["exact_match"]
            f1 += s["f1"]
            if len(examples) < 5:
                examples.append({"question": r["question"], "prediction": pred, "answers": r["answers"][:3]})
    k = max(1, len(rows))
    return {"n": len(rows), "exact_match": em / k, "f1": f1 / k, "examples": examples}
