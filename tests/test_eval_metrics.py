"""QA / multiple-choice / perplexity metrics against hand-checked cases and the SQuAD v1.1 scoring rules."""

import math
import random
import re
import string
from collections import Counter

import pytest

from memlm.evaluation.metrics import (
    aggregate,
    exact_match,
    mc_scores,
    normalize_answer,
    perplexity_scores,
    qa_scores,
    token_f1,
)

# (raw, normalized) checked by hand against the SQuAD v1.1 rules
NORMALIZE_CASES = [
    ("Paris", "paris"),
    ("The Beatles", "beatles"),  # leading article
    ("a dog and an apple and the cat", "dog and apple and cat"),  # every article, as whole words only
    ("Theater anthem", "theater anthem"),  # 'the' / 'an' inside words stay
    ("  lots \t of\n  space ", "lots of space"),
    ("U.S.A.", "usa"),  # punctuation is deleted, not replaced by a space
    ("rock-n-roll!", "rocknroll"),
    ("'Hello,' she said.", "hello she said"),
    ("the", ""),
    ("", ""),
    ("ÉCOLE Normale", "école normale"),  # unicode letters lowercase and survive
    ("Zürich", "zürich"),
    ("“Quoted” — text", "“quoted” — text"),  # v1.1 strips ASCII punctuation only
    ("A", ""),
    ("1,000,000", "1000000"),
]


@pytest.mark.parametrize("raw,expected", NORMALIZE_CASES)
def test_normalize_hand_checked(raw, expected):
    assert normalize_answer(raw) == expected


# ------------------------------------------------------------------------------------------ reference rules
def _squad_v11_normalize(s: str) -> str:
    """The v1.1 script's steps in its order: lower -> remove punctuation -> remove articles -> fix whitespace."""
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _squad_v11_f1(pred: str, gold: str) -> float:
    p, g = _squad_v11_normalize(pred).split(), _squad_v11_normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def test_agrees_with_squad_v11_rules_on_random_strings():
    rng = random.Random(0)
    vocab = ["the", "The", "a", "An", "an", "cat", "Cat", "théâtre", "x", "U.S.", ",", ".", "!", "-", "  ", "\t",
             "anthem", "dog's", "1,000", "ÉCOLE", "the.", "(a)", "é", "“", "?"]  # fmt: skip
    for _ in range(500):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6)))
        gold = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6)))
        assert normalize_answer(pred) == _squad_v11_normalize(pred)
        assert exact_match(pred, gold) == float(_squad_v11_normalize(pred) == _squad_v11_normalize(gold))
        assert token_f1(pred, gold) == pytest.approx(_squad_v11_f1(pred, gold))


# ------------------------------------------------------------------------------------------ EM / F1
QA_CASES = [
    # prediction, answers, EM, F1
    ("Paris", ["Paris"], 1.0, 1.0),
    ("paris.", ["Paris"], 1.0, 1.0),
    ("The Paris", ["Paris"], 1.0, 1.0),
    ("Paris, France", ["Paris"], 0.0, 2 / 3),  # P = 1/2, R = 1
    ("the Eiffel tower in Paris", ["Eiffel Tower"], 0.0, 2 / 3),  # P = 2/4, R = 2/2
    ("Shakespeare", ["William Shakespeare", "Shakespeare"], 1.0, 1.0),  # any alias
    ("William", ["William Shakespeare", "Bill"], 0.0, 2 / 3),  # max over aliases: P = 1, R = 1/2
    ("", ["Paris"], 0.0, 0.0),  # empty prediction
    ("Berlin", ["Paris", "Lyon"], 0.0, 0.0),
    ("the the", ["The"], 1.0, 0.0),  # both normalize to "": EM 1, but v1.1 F1 is 0 (no common token)
    ("new york new york", ["New York"], 0.0, 2 / 3),  # bag of tokens: common = 2, P = 2/4, R = 1
    ("Zürich", ["zurich", "Zürich"], 1.0, 1.0),
]


@pytest.mark.parametrize("pred,answers,em,f1", QA_CASES)
def test_qa_scores_hand_checked(pred, answers, em, f1):
    s = qa_scores(pred, answers)
    assert s["exact_match"] == em
    assert s["f1"] == pytest.approx(f1)


def test_qa_scores_single_string_and_no_answers():
    assert qa_scores("Paris", "paris")["exact_match"] == 1.0
    with pytest.raises(ValueError):
        qa_scores("Paris", [])


# ---------------------------------------------------------------------------------- MC / perplexity / aggregates
def test_mc_accuracy_and_length_normalization():
    # raw log-likelihood prefers the short wrong choice; per byte the long right one wins
    s = mc_scores([-4.0, -6.0], ["no", "yes indeed"], label=1)
    assert s == {"acc": 0.0, "acc_norm": 1.0}
    assert mc_scores([-1.0, -2.0, -3.0], ["a", "b", "c"], label=0) == {"acc": 1.0, "acc_norm": 1.0}
    with pytest.raises(ValueError):
        mc_scores([-1.0], ["a", "b"], 0)


def test_perplexity_numbers():
    s = perplexity_scores(loglik=-20.0, n_tokens=10, n_bytes=40, n_words=8)
    assert s["token_perplexity"] == pytest.approx(math.exp(2.0))
    assert s["word_perplexity"] == pytest.approx(math.exp(2.5))
    assert s["byte_perplexity"] == pytest.approx(math.exp(0.5))
    assert s["bits_per_byte"] == pytest.approx(0.5 / math.log(2))


def test_aggregate_mean_and_stderr():
    agg = aggregate([{"f1": 1.0}, {"f1": 0.0}, {"f1": 0.5}, {"f1": 0.5}])
    assert agg["f1"] == pytest.approx(0.5)
    assert agg["f1_stderr"] == pytest.approx(math.sqrt((0.25 + 0.25) / 3 / 4))
