"""Core model: retrieval parity with brute force, causality, gradients, shared pool, KV-cache generation."""

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import tiny_config

from memlm import MemLM, ModelConfig
from memlm.config import MemoryConfig
from memlm.model.memory import ProductKeyMemory, product_topk

ROOT = Path(__file__).resolve().parents[1]


def brute_force_topk(layer: ProductKeyMemory, x: torch.Tensor, knn: int):
    """Reference: faiss IndexFlatIP over the materialized keys of every slot, per head."""
    q = layer.query(x).float()  # (M, heads, k_dim)
    keys = layer.keys.materialized().detach().float()  # (heads, N, k_dim)
    if layer.keys.qk_norm:
        half = layer.keys.half
        q = torch.cat([h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) for h in q.split(half, -1)], -1)
    scores, idx = [], []
    for h in range(layer.heads):
        index = faiss.IndexFlatIP(keys.shape[-1])
        index.add(np.ascontiguousarray(keys[h].numpy()))
        d, i = index.search(np.ascontiguousarray(q[:, h].detach().numpy()), knn)
        scores.append(torch.from_numpy(d))
        idx.append(torch.from_numpy(i))
    return torch.stack(scores, 1), torch.stack(idx, 1)  # (M, heads, knn)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("heads,knn,qk_norm", [(1, 4, False), (2, 8, False), (4, 3, True)])
def test_retrieve_equals_brute_force(seed, heads, knn, qk_norm):
    torch.manual_seed(seed)
    cfg = MemoryConfig(kind="pkm", n_keys=16, heads=heads, knn=knn, k_dim=16, qk_norm=qk_norm)
    layer = ProductKeyMemory(32, cfg)
    x = torch.randn(50, 32)
    with torch.no_grad():
        scores, idx = layer.retrieve(x)
        ref_scores, ref_idx = brute_force_topk(layer, x, knn)
    assert scores.shape == idx.shape == (50, heads, knn)
    assert int(idx.min()) >= 0 and int(idx.max()) < 16**2
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    # slot_scores agrees with both
    full = layer.slot_scores(x).detach()  # (50, heads, 256)
    torch.testing.assert_close(full.topk(knn, -1).values, scores, atol=1e-5, rtol=1e-5)


def test_retrieve_with_ties():
    """Duplicated sub-keys make many slots score equal: the top-k scores must still be exact, indices distinct and
    each index's true score must equal the returned score."""
    cfg = MemoryConfig(kind="pkm", n_keys=8, heads=1, knn=6, k_dim=8)
    layer = ProductKeyMemory(16, cfg)
    with torch.no_grad():
        layer.keys.weight[:, :, 1::2] = layer.keys.weight[:, :, 0::2]  # every sub-key appears twice
    x = torch.randn(20, 16)
    with torch.no_grad():
        scores, idx = layer.retrieve(x)
        full = layer.slot_scores(x)
    torch.testing.assert_close(scores, full.topk(6, -1).values)
    torch.testing.assert_close(full.gather(-1, idx), scores)
    assert all(len(set(row.tolist())) == 6 for row in idx.view(-1, 6))


def test_product_topk_exact_random():
    s1, s2 = torch.randn(100, 32), torch.randn(100, 32)
    scores, idx = product_topk(s1, s2, 10)
    full = (s1[:, :, None] + s2[:, None, :]).flatten(1)
    ref = full.topk(10, -1)
    torch.testing.assert_close(scores, ref.values)
    assert torch.equal(idx, ref.indices)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_retrieve_sparse_backward_equals_dense_search_gradient(qk_norm):
    """The PyTorch path's O(knn) backward gives the same values and gradients as differentiating through the dense
    search over every sub-key (duplicate sub-keys among the selected slots included)."""
    from memlm.model.memory.product_keys import ProductKeys

    keys = ProductKeys(heads=3, n_keys=12, k_dim=8, qk_norm=qk_norm)
    q = torch.randn(2, 5, 3, 8, requires_grad=True)
    w = torch.randn(2, 5, 3, 6)  # a loss that weighs every selected score differently
    grads, outs = [], []
    for dense in (True, False):
        keys.zero_grad(set_to_none=True)
        q.grad = None
        if dense:
            s1, s2 = keys.half_scores(q)
            scores, idx = product_topk(s1, s2, 6)
        else:
            scores, idx = keys.retrieve(q, 6)
            assert "SearchWithSparseGrad" in type(scores.grad_fn).__name__  # not autograd through the dense search
        (scores * w).sum().backward()
        outs.append((scores.detach(), idx))
        grads.append((q.grad.clone(), keys.weight.grad.clone()))
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):  # other summation orders: fp32 rounding only
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,mode", [("pkm", "replace"), ("memory_plus", "replace"), ("memory_plus", "parallel")])
def test_causality(kind, mode):
    cfg = tiny_config(kind, mode=mode)
    model = MemLM(cfg).eval()
    idx = torch.randint(0, 64, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 64, (2, 20 - t - 1))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_batchnorm_query_is_not_causal_in_training():
    """The documented reason BatchNorm is opt-in: in training mode it leaks future tokens into past positions."""
    model = MemLM(tiny_config("pkm", query_norm="batchnorm")).train()
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    assert not torch.allclose(a[:, :10], b[:, :10])


@pytest.mark.parametrize("kind", ["pkm", "memory_plus"])
def test_gradients_reach_memory_and_only_retrieved_rows(kind):
    model = MemLM(tiny_config(kind))
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    layer = model.memory_layers[0]
    assert layer.query.proj.weight.grad.abs().sum() > 0
    assert layer.keys.weight.grad.abs().sum() > 0
    vgrad = layer.value_table.weight.grad
    touched = torch.zeros(layer.n_slots, dtype=torch.bool)
    touched[layer.last_indices.reshape(-1)] = True
    nonzero = vgrad.abs().sum(-1) > 0
    assert nonzero.any()
    assert not (nonzero & ~touched).any(), "a value row that was not retrieved got gradient"
    assert nonzero[touched].float().mean() > 0.9


def test_shared_value_pool():
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=3,
        n_heads=2,
        max_seq_len=32,
        memory=MemoryConfig(kind="memory_plus", layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=16),
    )
    model = MemLM(cfg)
    tables = [m.value_table for m in model.memory_layers]
    assert len(tables) == 2 and tables[0] is tables[1] is model.memory_values
    value_params = [n for n, p in model.named_parameters() if p is model.memory_values.weight]
    assert value_params == ["memory_values.weight"]
    assert sum(1 for k in model.state_dict() if "values" in k) == 1
    assert model.memory_layers[0].query is not model.memory_layers[1].query
    idx = torch.randint(0, 64, (1, 8))
    _, loss = model(idx, idx)
    loss.backward()
    rows = torch.cat([m.last_indices.reshape(-1) for m in model.memory_layers]).unique()
    assert (model.memory_values.weight.grad[rows].abs().sum(-1) > 0).all()


def test_pkm_layers_own_values():
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=3,
        n_heads=2,
        memory=MemoryConfig(kind="pkm", layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=16),
    )
    model = MemLM(cfg)
    assert model.memory_values is None
    assert model.memory_layers[0].value_table is not model.memory_layers[1].value_table


def uncached_greedy(model: MemLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("kind", ["pkm", "memory_plus"])
def test_kv_cache_generation_equals_uncached(kind):
    cfg = tiny_config(kind)
    cfg.n_kv_heads = 1  # exercise grouped-query attention too
    model = MemLM(cfg).eval()
    prompts = [[3, 5, 7, 9, 11, 2, 4], [1, 2], [60, 61, 62, 63]]
    out = model.generate(prompts, max_new_tokens=10)
    for p, o in zip(prompts, out):
        assert o == uncached_greedy(model, p, 10)


def test_generation_stop_tokens_and_sampling():
    model = MemLM(tiny_config()).eval()
    ref = uncached_greedy(model, [1, 2, 3], 8)
    out = model.generate([[1, 2, 3]], max_new_tokens=8, stop_tokens=[ref[3]])
    assert out[0] == ref[: ref.index(ref[3])]
    g = torch.Generator().manual_seed(0)
    s1 = model.generate([[1, 2, 3]], 8, temperature=1.0, top_k=5, generator=g)
    g = torch.Generator().manual_seed(0)
    s2 = model.generate([[1, 2, 3]], 8, temperature=1.0, top_k=5, generator=g)
    assert s1 == s2 and len(s1[0]) == 8


def test_loss_ignores_masked_targets():
    model = MemLM(tiny_config())
    idx = torch.randint(0, 64, (2, 8))
    tgt = idx.clone()
    tgt[:, :4] = -100
    logits, loss = model(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 64), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert model(idx)[1] is None


def test_param_groups():
    model = MemLM(tiny_config())
    groups = {g["name"]: g for g in model.param_groups(weight_decay=0.1, lr=3e-4, value_lr=1e-3)}
    assert groups["memory_values"]["lr"] == 1e-3 and groups["memory_values"]["weight_decay"] == 0.0
    assert groups["memory_values"]["params"] == [model.memory_values.weight]
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    mult = {g["name"]: g for g in model.param_groups(0.1, lr=1e-3, value_lr_mult=4.0)}
    assert mult["memory_values"]["lr"] == pytest.approx(4e-3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_config_builds(path):
    cfg = ModelConfig.from_yaml(path)
    if cfg.memory is not None and cfg.memory.n_slots > 70_000:
        pytest.skip("large memory: built on GPU only")
    model = MemLM(cfg)
    from memlm.model import param_counts

    assert param_counts(cfg)["total"] == model.num_params()
