"""The paper's fact stream (Lin et al. 2025): one fact per step, the batch = N distinct paraphrases of that fact."""

import pytest
import torch

from memlm.config import ConfigError, StreamConfig
from memlm.continual import paraphrase, stream


class CharTok:
    """A tokenizer stand-in with SentencePiece's contract: one id per character (+ bos/eos/pad)."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, s):
        return [3 + ord(c) % 250 for c in s]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


FACTS = [{"id": f"f{i}", "question": f"Which city is number {i}?", "answers": [f"Town{i}"]} for i in range(3)]


def test_paraphrase_templates_distinct_and_start_with_the_eval_form():
    t = paraphrase.paraphrase_templates(64, seed=3)
    assert len(t) == 64 == len(set(t)) and paraphrase.n_distinct() >= 64
    assert t[0] == "Question: {question}\nAnswer: {answer}"
    assert paraphrase.paraphrase_templates(64, seed=3) == t  # deterministic
    assert paraphrase.paraphrase_templates(64, seed=4)[1:] != t[1:]
    many = paraphrase.paraphrase_templates(paraphrase.n_distinct() + 5)
    assert len(set(many)) == paraphrase.n_distinct()  # past the distinct set: repeats, never fewer distinct
    for tpl in t:
        assert tpl.count("{answer}") == 1 and tpl.count("{question}") == 1
    with pytest.raises(ValueError, match="> 0"):
        paraphrase.paraphrase_templates(0)


def test_paraphrase_stream_one_fact_per_batch():
    cfg = StreamConfig(mode="paraphrase", paraphrases=16, steps_per_fact=2, stages=1, facts_per_stage=3)
    per_fact = stream.stage_examples(CharTok(), FACTS, cfg, max_len=200)
    assert [len(e) for e in per_fact] == [16, 16, 16]
    assert stream.stage_steps(per_fact, cfg, batch_size=8, steps_per_stage=None) == 6
    batches = list(stream.stage_batches(per_fact, cfg, 8, None, seed=0, pad_id=0))
    assert len(batches) == 6
    for k, b in enumerate(batches):
        fact = FACTS[k // 2]  # facts in sequence, steps_per_fact batches each
        exs = per_fact[k // 2]
        assert b.x.shape[0] == 16
        assert len({e.text for e in exs}) == 16  # N distinct texts ...
        assert all(fact["answers"][0] in e.text and fact["question"] in e.text for e in exs)  # ... of ONE fact
        assert all(e.fact_id == fact["id"] for e in exs)
        # padding: invalid positions are -100 targets, never answer positions
        assert torch.all(b.y[~b.valid] == -100) and not torch.any(b.answer & ~b.valid)
        assert b.answer.sum(1).min() > 0  # every paraphrase marks its answer tokens
        assert not torch.all(b.valid)  # texts differ in length, so some rows are padded


def test_mixed_mode_unchanged():
    cfg = StreamConfig(mode="mixed", stages=1, facts_per_stage=3, repetitions=2)
    ex = stream.stage_examples(CharTok(), FACTS, cfg, max_len=200)
    assert len(ex) == 3 * len(cfg.templates) * 2
    assert stream.stage_steps(ex, cfg, batch_size=4, steps_per_stage=None) == -(-len(ex) // 4)
    assert sum(b.x.shape[0] for b in stream.stage_batches(ex, cfg, 4, None, 0, 0)) == len(ex)


@pytest.mark.parametrize("bad", [{"paraphrases": 0}, {"steps_per_fact": 0}, {"mode": "shuffled"}])
def test_bad_stream_settings(bad):
    with pytest.raises(ConfigError):
        StreamConfig.from_dict(bad)
