"""The new-fact stream of continual finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning").

Real QA pairs (TriviaQA by default, through :func:`memlm.data.qa.load_qa`) are split into ``stages`` sequential
stages of ``facts_per_stage`` facts. Two modes (``stream.mode``):

- ``paraphrase`` (the paper's fact setting): facts are learned one after another; each step's batch is
  ``stream.paraphrases`` distinct texts of ONE fact (:mod:`memlm.continual.paraphrase`; 64 in the paper), for
  ``stream.steps_per_fact`` steps;
- ``mixed``: each fact rendered by every ``stream.templates`` entry and repeated ``repetitions`` times; batches of
  ``train.batch_size`` texts are drawn from the whole stage.

Every example records which of its target tokens are the answer, so the loss and SMF's slot counts can be restricted
to answer tokens (the paper counts every non-padding token; ``smf.answer_only`` is an option).

Tokenization keeps the answer a clean token span: ``encode(prefix) + encode(answer + suffix)`` — the prefix ends with
a space before the answer, which is a natural SentencePiece boundary, and the answer is tokenized exactly as the model
would generate it after an evaluation prompt ending in ``"Answer:"``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from memlm.config import StreamConfig
from memlm.data.errors import DataError


class StreamError(ValueError):
    """The fact stream cannot be built (no facts, too few facts, bad template); the message says what to change."""


class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) input ids (right-padded)
    y: torch.Tensor  # (B, T) targets, -100 where no loss is taken
    answer: torch.Tensor  # (B, T) bool: the target at this position is an answer token
    valid: torch.Tensor  # (B, T) bool: a real (not padding) position
    fact: str | None = None  # the fact every text of the batch states (paraphrase mode), else None


@dataclass
class Example:
    fact_id: str
    text: str
    ids: list[int]  # bos + tokens + eos
    answer: list[bool]  # per TARGET position (len(ids) - 1): is the predicted token part of the answer


def load_facts(cfg: StreamConfig) -> list[dict]:
    """The facts of the stream: ``stages * facts_per_stage`` rows ``{id, question, answers}`` after ``offset``."""
    from memlm.data.qa import load_qa

    try:
        is_file = Path(cfg.dataset).suffix in (".jsonl", ".json", ".csv", ".gz")
        ds = load_qa(path=cfg.dataset, split=cfg.split) if is_file else load_qa(cfg.dataset, split=cfg.split)
        rows = list(ds)
    except DataError as e:
        if "has no rows" in str(e):
            raise StreamError(f"the fact stream is empty: {cfg.dataset} has no QA rows") from None
        raise StreamError(f"stream.dataset: {e}") from None
    if cfg.max_answer_words is not None:
        rows = [r for r in rows if len(r["answers"][0].split()) <= cfg.max_answer_words]
    rows = rows[cfg.offset :]  # after the filter: offsets k * n give disjoint blocks of usable facts
    need = cfg.stages * cfg.facts_per_stage
    if not rows:
        raise StreamError(
            f"the fact stream is empty: {cfg.dataset} has no usable facts after offset={cfg.offset}"
            + (f" and max_answer_words={cfg.max_answer_words}" if cfg.max_answer_words is not None else "")
        )
    if len(rows) < need:
        raise StreamError(
            f"the fact stream needs stages x facts_per_stage = {need} facts but {cfg.dataset} has only {len(rows)} "
            "usable ones: lower stream.stages / stream.facts_per_stage or stream.offset"
        )
    return rows[:need]


def split_stages(facts: list[dict], cfg: StreamConfig) -> list[list[dict]]:
    n = cfg.facts_per_stage
    return [facts[k * n : (k + 1) * n] for k in range(cfg.stages)]


def render(template: str, question: str, answer: str) -> tuple[str, str]:
    """-> (text before the answer, text after it). ``{answer}`` must occur exactly once."""
    parts = template.split("{answer}")
    if len(parts) != 2:
        raise StreamError(f"stream.templates: {template!r} must contain {{answer}} exactly once")
    return parts[0].format(question=question), parts[1].format(question=question)


def encode_example(tok, fact: dict, template: str, max_len: int) -> Example:
    """Tokenize one rendering of ``fact``; the answer mask marks target positions that predict answer tokens."""
    answer = fact["answers"][0]
    before, after = render(template, fact["question"], answer)
    pre = tok.encode(before.rstrip(" ")) if before.strip() else []  # keep a newline before the answer
    rest = tok.encode(answer + after)
    # number of tokens of `rest` that carry answer characters: the shortest prefix whose text covers the answer
    n_ans = len(rest)
    for k in range(1, len(rest) + 1):
        if len(tok.decode(rest[:k]).strip()) >= len(answer.strip()):
            n_ans = k
            break
    ids = [tok.bos_id, *pre, *rest, tok.eos_id]
    ans_pos = set(range(1 + len(pre), 1 + len(pre) + n_ans))  # positions in ids
    answer_mask = [(i + 1) in ans_pos for i in range(len(ids) - 1)]  # target of position i is ids[i + 1]
    if len(ids) > max_len + 1:  # keep the end (the answer is near it)
        cut = len(ids) - (max_len + 1)
        ids, answer_mask = ids[cut:], answer_mask[cut:]
    return Example(fact["id"], before + answer + after, ids, answer_mask)


def stage_examples(tok, facts: list[dict], cfg: StreamConfig, max_len: int) -> list[Example] | list[list[Example]]:
    """mixed: every fact x every template, ``repetitions`` times (unshuffled). paraphrase: per fact (in stream order)
    its ``paraphrases`` texts."""
    if cfg.mode == "paraphrase":
        return [fact_paraphrases(tok, f, cfg, max_len, i) for i, f in enumerate(facts)]
    one = [encode_example(tok, f, t, max_len) for f in facts for t in cfg.templates]
    return one * cfg.repetitions


def fact_paraphrases(tok, fact: dict, cfg: StreamConfig, max_len: int, index: int = 0) -> list[Example]:
    """The ``cfg.paraphrases`` texts of one fact (distinct up to :func:`paraphrase.n_distinct`); the sample of forms
    differs per fact (seeded by ``cfg.seed`` and the fact's position)."""
    from memlm.continual.paraphrase import paraphrase_templates

    templates = paraphrase_templates(cfg.paraphrases, seed=cfg.seed * 1_000_003 + index)
    return [encode_example(tok, fact, t, max_len) for t in templates]


def stage_steps(examples: list, cfg: StreamConfig, batch_size: int, steps_per_stage: int | None) -> int:
    """How many optimizer steps a stage takes."""
    if cfg.mode == "paraphrase":
        return len(examples) * cfg.steps_per_fact
    return steps_per_stage or -(-len(examples) // batch_size)


def stage_batches(examples: list, cfg: StreamConfig, batch_size: int, steps_per_stage: int | None, seed: int,
                  pad_id: int, loss_on: str = "all"):  # fmt: skip
    """The batches of one stage in either mode (see the module docstring)."""
    if cfg.mode == "paraphrase":
        for per_fact in examples:
            for _ in range(cfg.steps_per_fact):
                yield collate(per_fact, pad_id, loss_on)
        return
    yield from batches(examples, batch_size, steps_per_stage, seed, pad_id, loss_on)


def batches(examples: list[Example], batch_size: int, steps: int | None, seed: int, pad_id: int, loss_on: str = "all"):
    """Yield :class:`Batch` es of (B, T) tensors: right-padded, ``y = -100`` at padding (and at non-answer
    positions when ``loss_on == "answer"``). One shuffled pass when ``steps`` is None, else exactly ``steps``
    batches over reshuffled passes."""
    if not examples:
        raise StreamError("no training examples in this stage")
    rng = random.Random(seed)
    if steps is None:  # one shuffled pass
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        chunks = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    else:

        def endless():
            while True:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                yield from perm

        it = endless()
        chunks = ([next(it) for _ in range(batch_size)] for _ in range(steps))
    for chunk in chunks:
        yield collate([examples[i] for i in chunk], pad_id, loss_on)


def collate(exs: list[Example], pad_id: int, loss_on: str = "all") -> Batch:
    """(B, T) tensors, right-padded; ``y = -100`` at padding (and at non-answer positions when ``loss_on`` is
    ``"answer"``)."""
    T = max(len(e.ids) for e in exs) - 1
    x = torch.full((len(exs), T), pad_id, dtype=torch.long)
    y = torch.full((len(exs), T), -100, dtype=torch.long)
    m = torch.zeros((len(exs), T), dtype=torch.bool)
    valid = torch.zeros((len(exs), T), dtype=torch.bool)
    for b, e in enumerate(exs):
        n = len(e.ids) - 1
        x[b, :n] = torch.tensor(e.ids[:-1])
        y[b, :n] = torch.tensor(e.ids[1:])
        m[b, :n] = torch.tensor(e.answer)
        valid[b, :n] = True
    if loss_on == "answer":
        y = y.masked_fill(~m, -100)
    facts = {e.fact_id for e in exs}
    return Batch(x, y, m, valid, facts.pop() if len(facts) == 1 else None)


def write_facts(path: str | Path, facts: list[dict]) -> Path:
    """The facts as a QA JSONL file (the evaluation harness's ``qa_jsonl`` dataset)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in facts:
            f.write(json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"]}) + "\n")
    return path
