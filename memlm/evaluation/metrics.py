"""The one metric implementation of memlm: QA (EM / F1), multiple choice, perplexity.

QA scoring follows the official SQuAD v1.1 script, which TriviaQA and NQ-open evaluations also use:
``normalize_answer`` lowercases, removes ASCII punctuation (``string.punctuation``), removes the articles
a / an / the as whole words, and collapses whitespace. Exact match is 1 when the normalized prediction equals any
normalized alias; token F1 is the bag-of-tokens F1 against each alias, maximised over aliases (not binarized).
As in v1.1, F1 is 0 when prediction and answer share no token (also when both normalize to the empty string).

Aggregates are fractions in [0, 1] (lm-eval's convention), with the standard error of the mean beside them.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# metric name -> True if higher is better (used by the forgetting report and the table)
HIGHER_IS_BETTER = {
    "exact_match": True,
    "f1": True,
    "acc": True,
    "acc_norm": True,
    "token_perplexity": False,
    "word_perplexity": False,
    "byte_perplexity": False,
    "bits_per_byte": False,
}


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalization: lower, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """Bag-of-tokens F1 between the normalized prediction and one answer."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(answer).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` of one prediction against all accepted aliases (max over aliases)."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("qa_scores needs at least one answer")
    return {
        "exact_match": max(exact_match(prediction, a) for a in answers),
        "f1": max(token_f1(prediction, a) for a in answers),
    }


def mc_scores(logliks: Sequence[float], choices: Sequence[str], label: int) -> dict[str, float]:
    """Multiple choice: ``acc`` = argmax log-likelihood is the label; ``acc_norm`` divides by the choice's UTF-8 bytes.

    Ties go to the first choice (like ``argmax``).
    """
    if len(logliks) != len(choices) or not choices:
        raise ValueError("mc_scores needs one log-likelihood per choice")
    best = max(range(len(logliks)), key=lambda i: logliks[i])
    normed = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices)]
    best_norm = max(range(len(normed)), key=lambda i: normed[i])
    return {"acc": float(best == label), "acc_norm": float(best_norm == label)}


def perplexity_scores(loglik: float, n_tokens: int, n_bytes: int, n_words: int) -> dict[str, float]:
    """Corpus-level perplexities from a summed natural-log likelihood and the counts it covers."""
    nll = -loglik
    return {
        "token_perplexity": math.exp(nll / max(1, n_tokens)),
        "word_perplexity": math.exp(nll / max(1, n_words)),
        "byte_perplexity": math.exp(nll / max(1, n_bytes)),
        "bits_per_byte": nll / max(1, n_bytes) / math.log(2),
    }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (sample std / sqrt(n); 0 for n < 2)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean (and ``<name>_stderr``) of every per-example metric."""
    out: dict[str, float] = {}
    if not per_example:
        return out
    for name in per_example[0]:
        mean, se = mean_and_stderr([ex[name] for ex in per_example])
        out[name] = mean
        out[f"{name}_stderr"] = se
    return out


def higher_is_better(metric: str) -> bool:
    """Direction of a metric (unknown names count as higher-is-better)."""
    return HIGHER_IS_BETTER.get(metric, True)
