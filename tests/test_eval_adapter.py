"""MemLMAdapter: batched == unbatched generation, cache == no cache, log-likelihoods equal hand computations."""

import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import tiny_model, tiny_tokenizer

from memlm.evaluation import MemLMAdapter

PROMPTS = [
    "The capital of France is",
    "Question: What is the capital of Kenya?\nAnswer:",
    "Gold",
    "Kenya is a country in Africa. Japan is a country in Asia. The currency of Japan is",
    "A spider has",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, max_seq_len=48)


def test_generate_batched_equals_unbatched_and_no_cache(model, tok):
    until = ["\n"]
    one = MemLMAdapter(model, tok, batch_size=1).generate_until(PROMPTS, until, max_new_tokens=10)
    four = MemLMAdapter(model, tok, batch_size=4).generate_until(PROMPTS, until, max_new_tokens=10)
    slow = MemLMAdapter(model, tok, batch_size=3, use_cache=False).generate_until(PROMPTS, until, max_new_tokens=10)
    assert one == four == slow
    assert any(o for o in one)  # a random model still produces text


def test_generate_matches_model_generate_tokens(model, tok):
    adapter = MemLMAdapter(model, tok, batch_size=2)
    out = adapter.generate_until(PROMPTS[:2], until=[], max_new_tokens=6)
    ref = model.generate([[tok.bos_id] + tok.encode(p) for p in PROMPTS[:2]], 6, stop_tokens={tok.eos_id})
    assert out == [tok.decode(r).strip() for r in ref]


def test_stop_sequences_cut_decoded_text(model, tok):
    assert MemLMAdapter.cut_at_stops("Paris. The end", [".", ","]) == "Paris"
    assert MemLMAdapter.cut_at_stops("Paris, France.", [".", ","]) == "Paris"
    assert MemLMAdapter.cut_at_stops("9.6 million. Next", [". "]) == "9.6 million"
    assert MemLMAdapter.cut_at_stops("no stop", ["\n"]) == "no stop"
    adapter = MemLMAdapter(model, tok)
    stops = adapter.stop_tokens([".", ","])
    assert tok.eos_id in stops
    assert all(tok.decode([i]).strip()[:1] in (".", ",") for i in stops if i != tok.eos_id)
    # stopping inside the decoding loop never changes the result: the same text as decoding everything, then cutting
    free = adapter.generate_until(PROMPTS, until=[], max_new_tokens=12)
    cut = adapter.generate_until(PROMPTS, until=["e", "a"], max_new_tokens=12)
    assert cut == [MemLMAdapter.cut_at_stops(f, ["e", "a"]).strip() for f in free]


def _hand_loglik(model, tokens: list[int], n: int) -> tuple[float, bool]:
    """Sum of log p(last n tokens) from one forward over the whole sequence."""
    x = torch.tensor([tokens])
    logits, _ = model(x[:, :-1])
    logp = F.log_softmax(logits[0], dim=-1)  # (T-1, V)
    tgt = x[0, 1:]
    rows = torch.arange(len(tokens) - 1 - n, len(tokens) - 1)
    return logp[rows, tgt[rows]].sum().item(), bool((logp[rows].argmax(-1) == tgt[rows]).all())


def test_loglikelihood_equals_hand_computation(model, tok):
    pairs = [
        ("The capital of France is", " Paris"),
        ("Gold has the chemical symbol", " Au"),
        ("Kenya is a country in", " Africa. Japan is a country in Asia"),  # longer than the context: cropped
        ("A spider has ", "eight legs"),
    ]
    got = MemLMAdapter(model, tok, batch_size=3).loglikelihood(pairs)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()) :] + cont  # trailing space moves to the continuation
        whole = tok.encode(ctx + cont)
        n = len(whole) - len(tok.encode(ctx))
        full = ([tok.bos_id] + whole)[-(model.cfg.max_seq_len + 1) :]  # long pairs lose context from the left
        ref, _ = _hand_loglik(model, full, min(n, len(full) - 1))
        assert ll == pytest.approx(ref, abs=1e-4)
        assert ll < 0


def test_loglikelihood_is_greedy(model, tok):
    ctx = [tok.bos_id] + tok.encode("The capital of France is")
    greedy = model.generate([ctx], 4)[0]
    adapter = MemLMAdapter(model, tok)
    (ll, is_greedy), (_, other) = adapter._score([(ctx + greedy, len(greedy)), (ctx + [5, 6], 2)], "t")
    assert is_greedy and ll == pytest.approx(_hand_loglik(model, ctx + greedy, len(greedy))[0], abs=1e-4)
    assert other == _hand_loglik(model, ctx + [5, 6], 2)[1]


def test_rolling_equals_model_loss_times_tokens(model, tok):
    text = "Kenya is a country in Africa."
    ids = [tok.bos_id] + tok.encode(text)
    assert len(ids) <= model.cfg.max_seq_len + 1
    x = torch.tensor([ids])
    _, loss = model(x[:, :-1], targets=x[:, 1:])
    adapter = MemLMAdapter(model, tok, batch_size=2)
    (ll,) = adapter.loglikelihood_rolling([text])
    assert ll == pytest.approx(-loss.item() * (len(ids) - 1), rel=1e-5)
    assert adapter.count_tokens(text) == len(ids) - 1


def test_rolling_windows_cover_every_token_once(model, tok):
    adapter = MemLMAdapter(model, tok)
    L = model.cfg.max_seq_len
    tokens = list(range(3 * L + 7))
    windows = adapter.rolling_windows(tokens)
    scored = []
    for w, n in windows:
        assert len(w) <= L + 1
        scored += w[len(w) - n :]
    assert scored == tokens[1:]
    # long texts (several windows) score without error and batch-independently
    long_text = " ".join(["The capital of France is Paris."] * 30)
    a = MemLMAdapter(model, tok, batch_size=1).loglikelihood_rolling([long_text, "Gold"])
    b = MemLMAdapter(model, tok, batch_size=8).loglikelihood_rolling([long_text, "Gold"])
    assert a == pytest.approx(b, abs=1e-3)


def test_lm_eval_wrapper_with_a_stub_harness(model, tok, tmp_path, monkeypatch):
    """The optional lm-eval LM subclass, against a stand-in for the lm_eval package (not installed by default)."""
    import importlib
    import sys
    import types

    from memlm import save_pretrained

    registered = {}
    api, mod, reg = types.ModuleType("lm_eval.api"), types.ModuleType("lm_eval.api.model"), types.ModuleType("x")
    mod.LM = type("LM", (), {"__init__": lambda self: None})
    reg.register_model = lambda name: lambda cls: registered.setdefault(name, cls)
    for name, m in {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": api, "lm_eval.api.model": mod,
                    "lm_eval.api.registry": reg}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.delitem(sys.modules, "memlm.evaluation.lm_eval_model", raising=False)
    wrapper = importlib.import_module("memlm.evaluation.lm_eval_model")
    export = save_pretrained(model, tmp_path / "exp", tokenizer=tok)
    lm = registered["memlm"](pretrained=str(export), batch_size="auto")
    assert lm is not None and wrapper.MemLMHarnessLM is registered["memlm"]
    R = types.SimpleNamespace
    reqs = [R(args=(p, {"until": ["\n"], "max_gen_toks": 8})) for p in PROMPTS] + [R(args=(PROMPTS[0], {}))]
    direct = MemLMAdapter(model, tok).generate_until(PROMPTS, ["\n"], 8)
    assert lm.generate_until(reqs)[:-1] == direct
    pairs = [("The capital of France is", " Paris")]
    assert lm.loglikelihood([R(args=p) for p in pairs]) == MemLMAdapter(model, tok).loglikelihood(pairs)
    assert lm.loglikelihood_rolling([R(args=("Gold",))]) == MemLMAdapter(model, tok).loglikelihood_rolling(["Gold"])
