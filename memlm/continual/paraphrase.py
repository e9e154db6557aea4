"""Paraphrases of one fact for the fact setting of Lin et al. 2025 ("Continual Learning via Sparse Memory Finetuning").

The paper rewrites each TriviaQA question as a statement and trains on a batch of 64 paraphrases of that ONE fact per
step. The paraphrases were written by a language model; offline we compose them: a lead-in (how the text opens) x a
form (question -> answer, or the question turned into a statement around the answer). Every (lead-in, form) pair is a
distinct text, so ``len(LEADS) * len(FORMS)`` distinct paraphrases exist per fact (128 here, >= the paper's 64).

Simplification vs the paper (documented in docs/smf.md): the paraphrases vary the wording around the question, not the
question's own wording, since rewriting a question into a fluent statement needs a language model. Every form keeps the
answer a clean token span (the answer is followed by punctuation or the end of the text), so the loss and the slot
counts can be restricted to it.
"""

from __future__ import annotations

import random

# how the text opens (the empty lead-in first: the plain forms come first in the order)
LEADS = ("", "Trivia. ", "Fact check. ", "Here is one. ", "Quiz: ", "Did you know? ", "From a book: ", "Next. ")

# the fact itself; each has {question} and {answer} once. No word recurs across many forms: SMF counts every token of
# the batch, and a template word in most of the 64 texts (e.g. "answer") would out-rank the fact's own slots in the
# TF-IDF (rare in pretraining, frequent in the batch) -- the paper's rewritten statements have no shared template.
FORMS = (
    "Question: {question}\nAnswer: {answer}",  # the evaluation prompt's form
    "Q: {question}\nA: {answer}",
    "{question} {answer}.",
    "{question} - {answer}.",
    "{question}\n{answer}",
    "{question} That would be {answer}.",
    "{question} Well, it is {answer}.",
    "{question} I am fairly sure: {answer}.",
    "{question} Correct reply: {answer}.",
    "{question} Solution: {answer}.",
    "{question} Easy. {answer}.",
    "{question} The right one is {answer}.",
    "Someone asked: {question} We told them {answer}.",
    "{question} Response: {answer}.",
    "{question} It was {answer}.",
    "{question} ... {answer}!",
)


def n_distinct() -> int:
    """How many distinct paraphrases :func:`paraphrase_templates` can give per fact."""
    return len(LEADS) * len(FORMS)


def paraphrase_templates(n: int, seed: int = 0) -> list[str]:
    """``n`` templates (``{question}`` / ``{answer}`` placeholders): all distinct while ``n <= n_distinct()``, then the
    distinct set again in a new order. The first template is the evaluation prompt's form ("Question: ...\\nAnswer:"),
    so the fact is always seen once exactly as it will be asked; the rest are a seeded sample."""
    if n <= 0:
        raise ValueError(f"the paraphrase count must be > 0, got {n}")
    every = [lead + form for form in FORMS for lead in LEADS]  # (n_distinct,)
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        rest = every[1:]
        rng.shuffle(rest)
        out.extend([every[0], *rest])
    return out[:n]
