"""Memory inspection (memlm.inspection, eval/inspect_memory.py) on a tiny Memory+ model with planted slots."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from eval_fixtures import CORPUS, REPO, tiny_tokenizer

from memlm import MemLM, save_pretrained
from memlm.config import MemoryConfig, ModelConfig
from memlm.continual.background import FILE_NAME, BackgroundStats, weights_hash
from memlm.inspection import (
    TokenReadout,
    capture,
    diff_checkpoints,
    qa_example,
    record_corpus,
    slot_contexts,
    slot_writes,
    text_example,
    trace_example,
)
from memlm.inspection.cli import main

TEXT = "The capital of France is"
QA = {"id": "fact/france", "question": "What is the capital of France?", "answers": ["Paris"]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def memory_model(vocab: int, seed: int = 0) -> MemLM:
    torch.manual_seed(seed)
    mem = MemoryConfig(kind="memory_plus", layers=[1], n_keys=8, heads=2, knn=4, k_dim=16)
    return MemLM(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, max_seq_len=64, memory=mem)).eval()


def target_token(model, tok) -> int:
    """A token whose own (gain-scaled) embedding direction reads out as itself first (precondition of the plant)."""
    readout = TokenReadout(model)
    emb = model.lm_head.weight.detach()
    words = [i for i in range(4, tok.vocab_size) if not tok.id_to_piece(i).startswith("<")]  # no byte pieces
    for cand in sorted(words, key=lambda i: -len(tok.id_to_piece(i))):  # a word-like token first
        ids, _ = readout.top_tokens((emb[cand] / model.norm.weight.detach())[None], 1)
        if int(ids[0, 0]) == cand:
            return cand
    raise AssertionError("no self-reading token")


def top_slot(model, ids: list[int], t: int) -> int:
    """The slot with the largest summed weight at position t of memory layer 0."""
    cap = capture(model, torch.tensor([ids]))
    idx, w = cap.layers[0].indices[0, t], cap.layers[0].weights[0, t]  # (heads, knn)
    total = torch.zeros(model.memory_layers[0].n_slots).index_add_(0, idx.reshape(-1), w.reshape(-1))
    return int(total.argmax())


@torch.no_grad()
def plant(model, ids: list[int], t: int, slot: int, token: int, scale: float = 30.0) -> None:
    """Overwrite ``slot``'s value so that what it writes at position t is ``scale`` x (embedding of ``token`` / final
    norm gain): through the gate and W_o at that token, exactly (W_o is square here)."""
    layer = model.memory_layers[0]
    cap = capture(model, torch.tensor([ids]))
    rec = cap.layers[0]
    x, idx, w = rec.x[0, t], rec.indices[0, t], rec.weights[0, t]
    w_s = float(w[idx == slot].sum())
    gate = torch.nn.functional.silu(layer.gate(x))  # (v_dim,)
    d = scale * model.lm_head.weight[token] / model.norm.weight  # (dim,)
    u = torch.linalg.solve(layer.out.weight, d)  # W_o u = d
    layer.value_table.weight[slot] = u / (gate * w_s)
    # check: the slot's write at t is d
    cap = capture(model, torch.tensor([ids]))
    rec = cap.layers[0]
    writes = slot_writes(layer, rec.x[0, t], rec.indices[0, t], rec.weights[0, t])  # (heads, knn, dim)
    got = (writes * (rec.indices[0, t] == slot).unsqueeze(-1)).sum((0, 1))
    torch.testing.assert_close(got, d, rtol=1e-3, atol=1e-3)


def export(model, path, tok):
    return str(save_pretrained(model, path, tokenizer=tok))


# --------------------------------------------------------------------------------------------- slot writes are exact
@pytest.mark.parametrize(
    "kind,kw",
    [("pkm", {}), ("memory_plus", {}), ("ultramem", {}), ("ultramem_v2", {"layers": [0, 1]}), ("peer", {})],
)
def test_slot_writes_sum_to_layer_output(kind, kw):
    model = MemLM(tiny_config(kind, **kw)).eval()
    cap = capture(model, torch.randint(0, 64, (2, 9)))
    for rec, layer in zip(cap.layers, model.memory_layers):
        writes = slot_writes(layer, rec.x, rec.indices, rec.weights)  # (B, T, heads, knn, dim)
        torch.testing.assert_close(writes.sum((-2, -3)), rec.out.float(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- planted value vectors
def test_planted_value_is_named_with_its_token(tok):
    model = memory_model(tok.vocab_size)
    ex = text_example(tok, TEXT, 64)
    t = ex.positions[-1]  # the last token: predicts what follows "is"
    slot, token = top_slot(model, ex.ids, t), target_token(model, tok)
    plant(model, ex.ids, t, slot, token)
    tr = trace_example(model, tok, ex, TokenReadout(model, tok), top_slots=3, top_tokens=3)
    last = tr["positions"][-1]
    first = last["layers"][0]["slots"][0]
    assert first["slot"] == slot
    assert first["promotes"][0]["token"] == token
    assert first["promotes"][0]["piece"] == tok.id_to_piece(token)
    assert last["predicts"] == tok.id_to_piece(token)  # scale 30: the planted slot decides the prediction


def test_slot_planted_through_the_keys(tok):
    """Make a query hit an arbitrary slot by aligning its sub-keys with the query, then plant its value."""
    model = memory_model(tok.vocab_size)
    ex = text_example(tok, TEXT, 64)
    t = ex.positions[-1]
    layer = model.memory_layers[0]
    slot = 37
    i, j = divmod(slot, layer.keys.n_keys)
    with torch.no_grad():
        q = layer.query(capture(model, torch.tensor([ex.ids])).layers[0].x[0, t])  # (heads, k_dim)
        half = layer.keys.half
        layer.keys.weight[0, 0, i] = q[0, :half] * 10
        layer.keys.weight[0, 1, j] = q[0, half:] * 10
    assert top_slot(model, ex.ids, t) == slot
    token = target_token(model, tok)
    plant(model, ex.ids, t, slot, token)
    tr = trace_example(model, tok, ex, TokenReadout(model, tok), top_slots=2, top_tokens=2)
    s = tr["positions"][-1]["layers"][0]["slots"][0]
    assert (s["slot"], s["promotes"][0]["token"], s["heads"]) == (slot, token, [0])


def test_cli_text_report_names_slot_and_token(tok, tmp_path, capsys):
    model = memory_model(tok.vocab_size)
    ex = text_example(tok, TEXT, 64)
    t = ex.positions[-1]
    slot, token = top_slot(model, ex.ids, t), target_token(model, tok)
    plant(model, ex.ids, t, slot, token)
    ckpt = export(model, tmp_path / "planted", tok)
    # background statistics beside the checkpoint: the report shows each slot's df
    df = [torch.arange(layer.value_table.weight.shape[0]) % 5 for layer in model.memory_layers]
    BackgroundStats(4, df, [d.double() for d in df], df, weights_hash(model)).save(f"{ckpt}/{FILE_NAME}")
    out = tmp_path / "out"
    assert main(["--ckpt", ckpt, "--text", TEXT, "--out", str(out), "--top-slots", "3"]) == 0
    text = capsys.readouterr().out
    piece = tok.id_to_piece(token)
    line = next(ln for ln in text.splitlines() if f"slot {slot:>8}" in ln and f"df {slot % 5}/4" in ln)
    assert repr(piece) in line
    rep = json.loads((out / "report.json").read_text())
    last = rep["traces"][0]["positions"][-1]["layers"][0]["slots"][0]
    assert (last["slot"], last["promotes"][0]["piece"], last["df"]) == (slot, piece, slot % 5)
    assert (out / "fact_slots.png").stat().st_size > 0 and (out / "report.txt").is_file()


# --------------------------------------------------------------------------------------------- checkpoint diff
def test_diff_lists_exactly_the_changed_rows(tok, tmp_path, capsys):
    base = memory_model(tok.vocab_size)
    after = copy.deepcopy(base)
    ex = qa_example(tok, QA, 64)
    t = ex.positions[0]  # predicts the first answer token
    slot, token = top_slot(after, ex.ids, t), target_token(after, tok)
    plant(after, ex.ids, t, slot, token)
    table = after.memory_layers[0].value_table.weight
    with torch.no_grad():
        table[3, 5] = torch.nextafter(table[3, 5], torch.tensor(10.0))  # one ulp: still a change
        table[40] += 0.25
    want = sorted({3, 40, slot})
    d = diff_checkpoints(base, after)
    assert [t.rows.tolist() for t in d.tables if t.is_value] == [want]
    assert d.other_changed == {}
    qa = tmp_path / "new_facts.jsonl"
    qa.write_text(json.dumps(QA) + "\n")
    b, a = export(base, tmp_path / "base", tok), export(after, tmp_path / "after", tok)
    out = tmp_path / "diff"
    assert main(["--ckpt", b, "--after", a, "--qa", str(qa), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"3 of {table.shape[0]} rows changed" in text and "every other parameter" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["diff"]["tables"][0]["changed_rows"] == want
    hits = rep["new_fact_hits"][0]["positions"][0]["layers"][0]
    assert slot in [s["slot"] for s in hits["slots"]]
    planted = next(s for s in hits["slots"] if s["slot"] == slot)
    assert planted["promotes"][0]["token"] == token and planted["target_logit"] != 0
    assert (out / "row_changes.png").is_file()


def test_diff_reports_dense_parameter_changes(tok):
    base = memory_model(tok.vocab_size)
    after = copy.deepcopy(base)
    with torch.no_grad():
        after.blocks[0].attn.wq.weight[0, 0] += 1.0
    d = diff_checkpoints(base, after)
    assert d.other_changed == {"blocks.0.attn.wq.weight": 1}
    assert all(len(t.rows) == 0 for t in d.tables)


# --------------------------------------------------------------------------------------------- slot -> contexts
def test_slot_contexts(tok, tmp_path, capsys):
    model = memory_model(tok.vocab_size)
    record = record_corpus(model, tok, CORPUS, batch_size=4, progress=False, queries_of=[0])
    usage = record.usage(0)
    slot = int(usage.argmax())
    info = slot_contexts(model, tok, record, 0, slot, top=5, readout=TokenReadout(model, tok))
    assert info["hits"] > 0 and info["usage_rank"] == 1
    assert info["hits"] == int((record.indices[0] == slot).any(-1).any(-1).sum())
    ws = [c["weight"] for c in info["contexts"]]
    assert ws == sorted(ws, reverse=True) and "[" in info["contexts"][0]["text"]
    assert len(info["promotes"]) == 8
    # the faiss search over recorded queries == the brute-force score of the slot at every token and head
    layer = model.memory_layers[0]
    x = capture(model, record.tokens).layers[0].x  # (W, T, dim)
    with torch.no_grad():
        scores = layer.slot_scores(x)[..., slot]  # (W, T, heads)
    best = info["nearest"][0]
    assert best["score"] == pytest.approx(float(scores.max()), abs=1e-4)
    assert best["score"] == pytest.approx(float(scores[best["window"], best["pos"], best["head"]]), abs=1e-4)
    assert best["retrieved"]  # the most-used slot is in the top-k of its best-scoring token
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    ckpt = export(model, tmp_path / "m", tok)
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--slot", str(slot), "--layer", "0", "--corpus", str(corpus), "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert f"== slot {slot} of memory layer 0" in capsys.readouterr().out
    assert (out / "usage.png").is_file()
    assert main([*args[:2], "--slot", "64", "--corpus", str(corpus), "--quiet"]) == 2  # 8 x 8 = 64 slots: 0..63
    assert "--slot 64 out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- CLI errors
def _script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # memlm comes from the (editable) install
    return subprocess.run([sys.executable, str(REPO / "eval" / "inspect_memory.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip


def test_cli_errors(tok, tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "missing"), "--text", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'missing'}"
    dense = MemLM(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()
    ckpt = export(dense, tmp_path / "dense", tok)
    assert main(["--ckpt", ckpt, "--text", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no memory layers" in err[0]
    mem = export(memory_model(tok.vocab_size), tmp_path / "mem", tok)
    assert main(["--ckpt", mem]) == 2
    assert "nothing to inspect" in capsys.readouterr().err
    assert main(["--ckpt", mem, "--text", "x", "--layer", "3"]) == 2
    assert "--layer 3 out of range" in capsys.readouterr().err


def test_script_runs_from_a_checkout(tok, tmp_path):
    """``python eval/inspect_memory.py`` runs as a script (no eval/ file shadows a standard-library module)."""
    mem = export(memory_model(tok.vocab_size), tmp_path / "mem", tok)
    r = _script("--ckpt", mem, "--text", TEXT, "--top-slots", "2")
    assert r.returncode == 0, r.stderr
    assert "memory layer 0 (block 1)" in r.stdout


def test_readout_excludes_tokens_and_returns_vocab_ids(tok):
    model = memory_model(tok.vocab_size)
    full, part = TokenReadout(model, tok), TokenReadout(model, tok, exclude=list(range(0, tok.vocab_size, 2)))
    v = torch.randn(3, 32)
    ids_full, s_full = full.top_tokens(v, tok.vocab_size)
    ids_part, s_part = part.top_tokens(v, 5)
    assert (ids_part % 2 == 1).all()
    odd = ids_full % 2 == 1  # the full ranking restricted to odd ids == the ranking of the reduced index
    for r in range(3):
        assert ids_part[r].tolist() == ids_full[r][odd[r]][:5].tolist()
        torch.testing.assert_close(s_part[r], s_full[r][odd[r]][:5])
