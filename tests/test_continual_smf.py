"""Sparse memory finetuning: ranking on constructed count tables, background statistics, and the bitwise invariant
(after any number of SMF steps, every value row that was never selected and every other parameter is unchanged)."""

import math

import pytest
import torch
from conftest import tiny_config

from memlm.config import FinetuneConfig
from memlm.continual.background import (
    BackgroundError,
    BackgroundStats,
    compute_background,
    table_counts,
    weights_hash,
)
from memlm.continual.smf import SparseMemoryFinetuning, kl_scores, row_mask, select_top_t, tfidf_scores
from memlm.continual.stream import Batch
from memlm.model import MemLM

# ----------------------------------------------------------------------------------------------------------------------
# ranking


def test_tfidf_on_constructed_table():
    counts = torch.tensor([4.0, 2.0, 2.0, 0.0, 2.0])
    df = torch.tensor([0, 9, 0, 0, 4])  # slot 1 is in 9 of 9 background batches, slot 4 in 4
    s = tfidf_scores(counts, df, n_batches=9)
    tf = counts / 10
    want = tf * torch.log(torch.tensor([10.0, 1.0, 10.0, 10.0, 2.0]))
    assert torch.allclose(s, want.double())
    assert s[1] == 0 and s[3] == 0  # common in the background / not accessed
    assert select_top_t(s, counts, 2).tolist() == [0, 2]  # highest scores, returned sorted
    assert select_top_t(s, counts, 3).tolist() == [0, 2, 4]
    # t larger than the number of accessed slots: every accessed slot, never an unaccessed one
    assert select_top_t(s, counts, 5).tolist() == [0, 1, 2, 4]


def test_kl_on_constructed_table():
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    bg = torch.tensor([0.0, 96.0, 0.0, 0.0])
    s = kl_scores(counts, bg)
    p_b = torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64)
    p_bg = torch.tensor([1.0, 97.0, 1.0, 1.0], dtype=torch.float64) / 100  # add-one smoothing: (c + 1) / (96 + 4)
    assert s[0] == pytest.approx(0.75 * math.log(0.75 / 0.01))
    assert s[1] == pytest.approx(0.25 * math.log(0.25 / 0.97))  # negative: the slot is MORE common in the background
    assert s[2] == 0 and s[3] == 0
    assert torch.allclose(s[:2], (p_b * torch.log(p_b / p_bg))[:2])
    assert select_top_t(s, counts, 1).tolist() == [0]


def test_select_top_t_breaks_ties_towards_lower_ids():
    counts = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0, 1.0, 3.0])
    scores = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # zero IDF: many equal scores
    assert select_top_t(scores, counts, 3).tolist() == [0, 1, 2]  # 1 by score, then the two lowest accessed ids
    assert select_top_t(scores, counts, 4).tolist() == [0, 1, 2, 3]


def test_row_mask():
    m = row_mask(torch.tensor([1, 3]), 5)
    assert m.tolist() == [False, True, False, True, False]


# ----------------------------------------------------------------------------------------------------------------------
# background statistics


def _batches(n, B=3, T=8, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (B, T), generator=g),) for _ in range(n)]


def test_background_counts_and_hash(tmp_path):
    model = MemLM(tiny_config())
    wh = weights_hash(model)
    stats = compute_background(model, _batches(6), n_batches=5, wh=wh, settings={"k": 1}, progress=False)
    layer = model.memory_layers[0]
    assert stats.n_batches == 5
    assert int(stats.df[0].max()) <= 5 and int(stats.df[0].min()) >= 0
    assert stats.counts[0].sum() == 5 * 3 * 8 * layer.heads * layer.knn  # every access counted once
    assert torch.equal(stats.layer_df[0], stats.df[0])  # one layer reads the table
    p = stats.save(tmp_path / "bg.pt")
    back = BackgroundStats.load(p)
    assert torch.equal(back.df[0], stats.df[0]) and back.weights_hash == wh
    back.check(model, wh, {"k": 1}, "x")  # same checkpoint, same settings: fine
    other = MemLM(tiny_config())  # another init -> other weights
    with pytest.raises(BackgroundError, match="another checkpoint"):
        back.check(other, weights_hash(other), {"k": 1}, "x")
    with pytest.raises(BackgroundError, match="other settings"):
        back.check(model, wh, {"k": 2}, "x")


def test_sequence_df_counts_each_sequence_once():
    from memlm.continual.background import table_seq_df

    model = MemLM(tiny_config())
    stats = compute_background(model, _batches(4), n_batches=4, wh="h", progress=False)
    assert stats.n_seqs == 4 * 3 and int(stats.seq_df[0].max()) <= 12
    assert torch.all(stats.seq_df[0] >= stats.df[0])  # a row read in a batch was read in >= 1 of its sequences
    x = torch.randint(0, 64, (3, 8))
    model(x)
    idx = model.memory_layers[0].last_indices  # (3, 8, heads, knn)
    want = torch.zeros(model.value_tables()[0].weight.shape[0], dtype=torch.int64)
    for b in range(3):
        want[idx[b].reshape(-1).unique()] += 1
    assert torch.equal(table_seq_df(model)[0], want)
    assert stats.doc_freq(0, "sequence")[1] == 12 and stats.doc_freq(0, "batch")[1] == 4
    old = BackgroundStats(4, stats.df, stats.counts, stats.layer_df, "h", {})  # a format-1 file: no sequence counts
    with pytest.raises(BackgroundError, match="recompute_background"):
        old.doc_freq(0, "sequence")


def test_answer_only_counts_respect_mask():
    model = MemLM(tiny_config())
    x = torch.randint(0, 64, (2, 6))
    model(x)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = True
    c = table_counts(model, mask)[0]
    layer = model.memory_layers[0]
    assert c.sum() == layer.heads * layer.knn
    assert torch.equal(c.nonzero().squeeze(1), layer.last_indices[0, 2].reshape(-1).unique())


# ----------------------------------------------------------------------------------------------------------------------
# the bitwise invariant


def _random_stats(model, seed):
    g = torch.Generator().manual_seed(seed)
    tables = model.value_tables()
    n = 20
    df = [torch.randint(0, n + 1, (t.weight.shape[0],), generator=g) for t in tables]
    counts = [d.double() * 3 for d in df]
    seq_df = [torch.randint(0, 4 * n + 1, (t.weight.shape[0],), generator=g) for t in tables]
    return BackgroundStats(n, df, counts, [df[0]], weights_hash(model), {}, seq_df, 4 * n)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("ranking", ["tfidf", "tfidf_seq", "kl", "tf"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_smf_only_selected_rows_move(optim, ranking, sparse_grad):
    """Property test over random models, batches and several steps: after each step, value rows outside the step's
    selection and every other parameter/buffer are bitwise unchanged; selected rows move."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = MemLM(tiny_config(sparse_grad=sparse_grad))
        lr = 2.0 if optim == "sgd" else 1e-2
        unit = "sequence" if ranking.endswith("_seq") else "batch"
        cfg = FinetuneConfig.from_dict({"method": "sparse_memory", "optim": {"name": optim, "lr": lr},
                                        "smf": {"top_t": 5 + 3 * seed, "ranking": ranking.removesuffix("_seq"),
                                                "df_unit": unit}})  # fmt: skip
        smf = SparseMemoryFinetuning(model, cfg, _random_stats(model, seed))
        values = model.value_tables()[0].weight
        ever = torch.zeros(values.shape[0], dtype=torch.bool)
        g = torch.Generator().manual_seed(100 + seed)
        for step in range(4):
            B, T = 2 + step % 2, 5 + step
            x = torch.randint(0, 64, (B, T), generator=g)
            y = torch.randint(0, 64, (B, T), generator=g)
            valid = torch.ones(B, T, dtype=torch.bool)
            valid[0, -2:] = False  # padding positions neither count nor train
            y[~valid] = -100
            before = {k: v.clone() for k, v in model.state_dict().items()}
            logs = smf.step(Batch(x, y, valid.clone(), valid))
            rows = smf.last_rows[0]
            assert 0 < rows.numel() <= cfg.smf.top_t and logs["smf/selected"] == rows.numel()
            assert 0 < logs["smf/access_coverage"] <= 1 and 0 <= logs["smf/overlap_prev"] <= 1
            assert logs["smf/rows_read"] >= rows.numel() >= logs["smf/selected_zero_score"] >= 0
            assert logs["smf/rel_change"] > 0 and logs["smf/rel_change_median_row"] > 0
            # all-token counting (answer_only false): padding positions read slots but are never counted
            counted = table_counts(model, valid)[0]
            assert logs["smf/rows_read"] == float((counted > 0).sum())
            assert counted.sum() == valid.sum() * model.memory_layers[0].heads * model.memory_layers[0].knn
            sel = row_mask(rows, values.shape[0])
            ever |= sel
            after = model.state_dict()
            for name, v in after.items():
                if v.data_ptr() == values.data_ptr():
                    assert torch.equal(v[~sel], before[name][~sel]), f"unselected rows moved ({name}, step {step})"
                    assert not torch.equal(v[sel], before[name][sel]), "selected rows did not move"
                else:
                    assert torch.equal(v, before[name]), f"{name} moved at step {step}"
            for p in model.parameters():
                assert p.grad is None
        if optim == "adam":  # optimizer state of never-selected rows is untouched too
            st = smf.opt.state[values]
            assert torch.all(st["exp_avg"][~ever] == 0) and torch.all(st["exp_avg_sq"][~ever] == 0)
        assert smf.summary()["rows_updated"] == int(ever.sum())


def test_smf_rejects_too_large_t_and_dense_model():
    from memlm.config import ModelConfig
    from memlm.continual.methods import MethodError

    model = MemLM(tiny_config())
    cfg = FinetuneConfig.from_dict({"method": "sparse_memory", "smf": {"top_t": 65}})  # the table has 8**2 = 64 rows
    with pytest.raises(MethodError, match="top_t"):
        SparseMemoryFinetuning(model, cfg, _random_stats(model, 0))
    dense = MemLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32))
    with pytest.raises(MethodError, match="no memory layers|has none"):
        SparseMemoryFinetuning(dense, FinetuneConfig(), None)


@pytest.mark.parametrize("kind", ["peer", "ultramem_v2"])
def test_smf_updates_every_table_a_slot_indexes(kind):
    """PEER's input experts and UltraMemV2's pre-values are indexed by the same slot ids as the values: SMF selects
    the same rows in each and updates them all (before: those tables never counted, so never moved)."""
    extra = {"layers": [0, 1], "mode": "parallel", "window_stride": 32} if kind == "ultramem_v2" else {}
    model = MemLM(tiny_config(kind=kind, **extra))
    cfg = FinetuneConfig.from_dict({"method": "sparse_memory", "optim": {"name": "sgd", "lr": 2.0},
                                    "smf": {"top_t": 6}})  # fmt: skip
    tables = [t.weight for t in model.value_tables()]
    assert len(tables) == 2
    zero = [torch.zeros(w.shape[0], dtype=torch.int64) for w in tables]  # IDF = log(21): ranking by batch counts
    stats = BackgroundStats(20, zero, [z.double() for z in zero], [z.clone() for z in zero[:1]] * 2, "", {})
    smf = SparseMemoryFinetuning(model, cfg, stats)
    before = [w.detach().clone() for w in tables]
    valid = torch.ones(2, 8, dtype=torch.bool)
    smf.step(Batch(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)), valid, valid))
    rows = smf.last_rows
    assert rows[0].numel() == 6 and torch.equal(rows[0], rows[1])
    for w, b in zip(tables, before):
        moved = (w.detach() != b).any(dim=1)
        assert moved.nonzero().squeeze(1).tolist() == rows[0].tolist()
    s = smf.summary()
    assert s["rows_updated"] == 12 and s["trainable_params_per_step"] == sum(6 * w[0].numel() for w in tables)
    # fact-to-fact overlap: the first fact has no predecessor; a second fact's selection is compared with the first's
    x = torch.randint(0, 64, (2, 8))
    first = smf.step(Batch(x, x, valid, valid, "a"))
    again = smf.step(Batch(x, x, valid, valid, "b"))  # same texts, another fact id: the same rows again
    assert first["smf/overlap_prev_fact"] == 0.0 and 0.5 < again["smf/overlap_prev_fact"] <= 1.0
    # statistics counted before every table was counted (the companion table all zeros) are refused
    stale = BackgroundStats(20, [torch.ones_like(zero[0]), zero[1]], [z.double() for z in zero], [], "h", {})
    with pytest.raises(BackgroundError, match="recompute_background"):
        stale.check(model, "h", {}, "stale.pt")
