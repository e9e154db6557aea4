"""UltraMem, UltraMemV2 and PEER: retrieval parity, IVE/MCS references, invariants, accounting, generation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_model import uncached_greedy

from memlm import MemLM, ModelConfig
from memlm.config import ConfigError, MemoryConfig, from_dict
from memlm.model import flops_per_token, param_counts
from memlm.model.memory import PEER, UltraMem, UltraMemV2, row_dot, value_lookup
from memlm.model.memory.ultramem import virtual_slot_map
from memlm.model.memory.ultramem_v2 import act_second_moment

VARIANTS = {
    "ultramem": dict(kind="ultramem"),  # r=2, 2 cores, E=4
    "ultramem_plain": dict(kind="ultramem", tucker_rank=1, cores=1, expansion=1),
    "ultramem_skip": dict(kind="ultramem", layers=[0], skip=1, mode="parallel"),
    "ultramem_v2": dict(kind="ultramem_v2", layers=[0, 1], mode="parallel", window_stride=32),
    "peer": dict(kind="peer", mode="parallel"),
}


def variant_config(name: str) -> ModelConfig:
    return tiny_config(**VARIANTS[name])


def ultramem(n_keys=16, knn=4, heads=2, rank=2, cores=2, expansion=1, dim=32, v_dim=16) -> UltraMem:
    cfg = MemoryConfig(
        kind="ultramem",
        n_keys=n_keys,
        knn=knn,
        heads=heads,
        k_dim=16,
        tucker_rank=rank,
        cores=cores,
        expansion=expansion,
    )
    return UltraMem(dim, cfg, v_dim, seed=3)


# ---------------------------------------------------------------------------------------------- every variant
@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward_and_causality(name):
    model = MemLM(variant_config(name))
    idx = torch.randint(0, 64, (2, 20))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 20, 64) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"
    model.eval()
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_memory_and_only_retrieved_rows(name):
    model = MemLM(variant_config(name))
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    layers = model.memory_layers
    for layer in layers:
        assert layer.query.proj.weight.grad.abs().sum() > 0
        assert layer.keys.weight.grad.abs().sum() > 0
        if isinstance(layer, UltraMem):
            assert layer.core.grad.abs().sum() > 0
    for table in model.value_tables():  # value tables + PEER's u + UltraMemV2's pre-values
        touched = torch.zeros(table.n_slots, dtype=torch.bool)
        for layer in layers:
            if table in layer.sparse_tables():
                touched[layer.last_indices.reshape(-1)] = True
        nonzero = table.weight.grad.abs().sum(-1) > 0
        assert nonzero.any()
        assert not (nonzero & ~touched).any(), "a row that was not retrieved got gradient"
        assert nonzero[touched].float().mean() > 0.9


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_generation_equals_uncached(name):
    model = MemLM(variant_config(name)).eval()
    prompts = [[3, 5, 7, 9, 11, 2, 4], [1, 2], [60, 61, 62, 63]]
    out = model.generate(prompts, max_new_tokens=8)
    for p, o in zip(prompts, out):
        assert o == uncached_greedy(model, p, 8)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_accounting_matches_model(name):
    cfg = variant_config(name)
    counts = param_counts(cfg)
    assert counts["total"] == MemLM(cfg).num_params()
    assert counts["active"] < counts["total"]
    assert flops_per_token(cfg) > flops_per_token(ModelConfig(**{**cfg.__dict__, "memory": None})) * 0.5


# ---------------------------------------------------------------------------------------------- UltraMem TDQKR
def brute_rank1(layer: UltraMem, x: torch.Tensor):
    """Scores of all n_keys**2 slots under the summed core: (M, heads, N)."""
    s_row, s_col = layer.half_scores(x)  # (M, heads, n, r)
    c = layer.core.sum(1)  # (heads, r, r)
    return torch.einsum("mhir,hrs,mhjs->mhij", s_row, c, s_col).flatten(-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cores", [1, 2])
def test_tdqkr_rank1_equals_brute_force(seed, cores):
    torch.manual_seed(seed)
    layer = ultramem(rank=1, cores=cores)
    with torch.no_grad():
        layer.core.normal_()  # signed cores: the rank-1 score can be negative
    x = torch.randn(40, 32)
    with torch.no_grad():
        weights, virtual, scores = layer.retrieve(x)
        full = brute_rank1(layer, x)  # (40, heads, 256)
    ref = full.topk(4, -1)
    torch.testing.assert_close(scores, ref.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(virtual.sort(-1).values, ref.indices.sort(-1).values)
    torch.testing.assert_close(weights.sum(-2), scores, atol=1e-5, rtol=1e-5)  # MCS weights add up to the score


def test_tdqkr_exact_rank1_core_with_r2():
    """A rank-2 parameterization whose summed core IS rank 1: the search is exact over all slots."""
    layer = ultramem(rank=2, cores=2)
    with torch.no_grad():
        u, v = torch.randn(2, 2), torch.randn(2, 2)
        layer.core.copy_(torch.einsum("hr,hs->hrs", u, v).unsqueeze(1).expand(-1, 2, -1, -1) / 2)
    x = torch.randn(30, 32)
    with torch.no_grad():
        _, virtual, scores = layer.retrieve(x)
        ref = brute_rank1(layer, x).topk(4, -1)
    torch.testing.assert_close(scores, ref.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_tdqkr_rank2_rescoring_equals_brute_force_over_candidate_grid(seed):
    torch.manual_seed(seed)
    layer = ultramem(rank=2, cores=2, n_keys=16, knn=4)
    with torch.no_grad():
        layer.core.normal_()
    x = torch.randn(30, 32)
    with torch.no_grad():
        weights, virtual, scores = layer.retrieve(x)
        s_row, s_col = layer.half_scores(x)  # (M, heads, n, r)
        c = layer.core.sum(1)
        uu, _, vh = torch.linalg.svd(c)
        a = torch.einsum("mhnr,hr->mhn", s_row, uu[..., 0])
        b = torch.einsum("mhnr,hr->mhn", s_col, vh[..., 0, :])
        full = brute_rank1(layer, x).view(30, 2, 16, 16)  # exact scores of every (row, col)
        for m in range(30):
            for h in range(2):
                rows = torch.cat([a[m, h].topk(4).indices, a[m, h].topk(4, largest=False).indices])
                cols = torch.cat([b[m, h].topk(4).indices, b[m, h].topk(4, largest=False).indices])
                grid = full[m, h][rows][:, cols]  # (8, 8)
                top = grid.flatten().topk(4)
                ref_idx = rows[top.indices // 8] * 16 + cols[top.indices % 8]
                torch.testing.assert_close(scores[m, h], top.values, atol=1e-5, rtol=1e-5)
                assert set(virtual[m, h].tolist()) == set(ref_idx.tolist())
    # rescoring with the exact core beats (or equals) the rank-1 marginal ranking alone
    assert (scores[..., 0] <= brute_rank1(layer, x).max(-1).values + 1e-5).all()


def test_svd_refresh_once_per_step():
    layer = ultramem(rank=2, cores=2)
    x = torch.randn(5, 32)
    layer.retrieve(x)
    key = layer._svd_key
    layer.retrieve(x)
    assert layer._svd_key == key  # no change, no refresh
    opt = torch.optim.SGD([layer.core], lr=0.1)
    layer.core.grad = torch.randn_like(layer.core)
    opt.step()
    assert layer._svd_key != layer._core_key()  # stale after the step
    layer.refresh()  # what the training loop calls
    u, _, vh = torch.linalg.svd(layer.core.detach().sum(1))
    torch.testing.assert_close(layer.svd_u.abs(), u[..., 0].abs())
    torch.testing.assert_close(layer.svd_v.abs(), vh[..., 0, :].abs())
    with torch.no_grad():
        layer.core.add_(1.0)  # changed without refresh(): the next forward refreshes itself
    layer.retrieve(x)
    assert layer._svd_key == layer._core_key()


def test_core_aux_loss():
    model = MemLM(variant_config("ultramem"))
    idx = torch.randint(0, 64, (1, 8))
    logits, loss = model(idx, idx)
    layer = model.memory_layers[0]
    assert layer.aux_loss.item() == 0.0  # init: sigma_2 < tau
    with torch.no_grad():
        layer.core.copy_(torch.eye(2).expand_as(layer.core))  # summed core = 2 I: sigma_2 = 2
    logits, loss = model(idx, idx)
    expected = 0.001 * layer.heads * (2.0 - 0.15) ** 2
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-4)
    ce = F.cross_entropy(logits.view(-1, 64), idx.view(-1))
    assert (loss - ce).item() == pytest.approx(expected, rel=1e-3)
    loss.backward()
    assert layer.core.grad.abs().sum() > 0
    model.eval()  # validation loss is pure cross-entropy: the regulariser belongs to training only
    logits, loss = model(idx, idx)
    assert layer.aux_loss is None
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 64), idx.view(-1)).item(), rel=1e-6)


def test_ultramem_core_no_weight_decay_and_fp32_scores_under_autocast():
    model = MemLM(variant_config("ultramem"))
    layer = model.memory_layers[0]
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups(0.1, lr=1e-3)}
    assert id(layer.core) in groups["no_decay"] and id(layer.core) not in groups["decay"]
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, _, scores = layer.retrieve(x)  # raw scores are the mixing weights: kept in fp32
        s_row, _ = layer.half_scores(x)
    assert weights.dtype == scores.dtype == s_row.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- UltraMem IVE / MCS
def test_virtual_map_is_a_bijection():
    n_virtual, E = 64, 4
    p = virtual_slot_map(n_virtual, E, seed=5)
    rows, groups = p % (n_virtual // E), p // (n_virtual // E)
    pairs = set(zip(rows.tolist(), groups.tolist()))
    assert len(pairs) == n_virtual
    assert pairs == {(r, g) for r in range(n_virtual // E) for g in range(E)}
    assert torch.equal(virtual_slot_map(n_virtual, E, seed=5), p)  # fixed by the seed
    assert torch.equal(virtual_slot_map(n_virtual, 1, seed=5), torch.arange(n_virtual))  # E = 1: identity
    layer = ultramem(n_keys=8, expansion=4)
    assert torch.equal(layer.virtual_map, virtual_slot_map(64, 4, seed=3))
    assert layer.values.n_slots == 16


def test_ive_e1_equals_plain_layer():
    """E = 1, one core: the layer is a plain memory read (one value table, one projection) with the same weights."""
    layer = ultramem(expansion=1, cores=1, rank=2)
    x = torch.randn(2, 6, 32)
    out = layer(x)
    weights, virtual, scores = layer.retrieve(x)  # (2, 6, heads, 1, knn), (2, 6, heads, knn)
    ref = layer.out(value_lookup(layer.values.weight, virtual.flatten(-2), weights[..., 0, :].flatten(-2)))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights[..., 0, :], scores)
    assert torch.equal(layer.last_indices, virtual)


@pytest.mark.parametrize("expansion,cores", [(2, 2), (4, 1), (4, 2)])
def test_ive_mcs_equals_naive_loop(expansion, cores):
    layer = ultramem(n_keys=8, knn=3, expansion=expansion, cores=cores, v_dim=8)
    x = torch.randn(1, 3, 32)
    out = layer(x)
    weights, virtual, _ = layer.retrieve(x)
    V, n_rows, sl = layer.values.weight, layer.n_slots, 8 // cores
    ref = torch.zeros(1, 3, 32)
    for t in range(3):
        pooled = torch.zeros(expansion, 8)
        for h in range(layer.heads):
            for k in range(3):
                p = int(layer.virtual_map[virtual[0, t, h, k]])
                row, group = p % n_rows, p // n_rows
                for c in range(cores):
                    pooled[group, c * sl : (c + 1) * sl] += weights[0, t, h, c, k] * V[row, c * sl : (c + 1) * sl]
        ref[0, t] = layer.out(pooled.flatten())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- UltraMemV2
def test_v2_windows_of_the_global_table():
    cfg = tiny_config(**VARIANTS["ultramem_v2"])  # 64 slots per window, stride 32: windows overlap by half
    model = MemLM(cfg)
    assert model.memory_values.values.n_slots == 32 + 64
    assert model.memory_values.pre.n_slots == 32 + 64
    model(torch.randint(0, 64, (2, 16)))
    for m, layer in enumerate(model.memory_layers):
        assert layer.value_table is model.memory_values.values
        assert int(layer.last_indices.min()) >= 32 * m and int(layer.last_indices.max()) < 32 * m + 64
    assert sum(1 for n, _ in model.named_parameters() if "memory_values" in n) == 2


@pytest.mark.parametrize("score_fn", ["softmax"])
def test_v2_init_variance_independent_of_knn_heads_depth(score_fn):
    torch.manual_seed(0)
    dim, x = 64, torch.randn(4096, 64)
    variances = {}
    for knn, heads, n_mem in [(4, 1, 1), (16, 1, 1), (4, 4, 1), (16, 4, 1), (8, 2, 4)]:
        cfg = MemoryConfig(kind="ultramem_v2", n_keys=32, knn=knn, heads=heads, k_dim=32, score_fn=score_fn)
        from memlm.model.memory import GlobalValues

        pool = GlobalValues(cfg.n_slots, 32, cfg.pre_dim)
        layer = UltraMemV2(dim, cfg, pool, 0, n_mem, init_std=0.02)
        with torch.no_grad():
            variances[(knn, heads, n_mem)] = float(layer(x).var()) * n_mem / 0.02**2  # per-layer share x depth
    vals = list(variances.values())
    assert max(vals) / min(vals) < 1.6, variances
    assert all(0.5 < v < 1.6 for v in vals), variances


def test_act_second_moment():
    assert act_second_moment("relu") == pytest.approx(0.5, abs=1e-4)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    assert act_second_moment("gelu") == pytest.approx(float(F.gelu(z).pow(2).mean()), rel=1e-2)


# ---------------------------------------------------------------------------------------------- PEER
def test_peer_equals_naive_loop_over_experts():
    torch.manual_seed(0)
    cfg = MemoryConfig(kind="peer", n_keys=4, heads=2, knn=3, k_dim=8)
    layer = PEER(16, cfg)
    x = torch.randn(5, 16, requires_grad=True)
    out = layer(x)
    U, V = layer.down.weight, layer.up.weight
    ref = []
    for t in range(5):
        all_scores = layer.keys.slot_scores(layer.query(x[t]))  # (heads, 16) every expert
        y = torch.zeros(16)
        for h in range(2):
            top = all_scores[h].topk(3)
            gate = F.softmax(top.values, -1)
            for g, i in zip(gate, top.indices):
                y = y + g * F.gelu(U[i] @ x[t]) * V[i]
        ref.append(y)
    ref = torch.stack(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # gradients through row_dot's custom backward agree with autograd through the naive loop
    g1 = torch.autograd.grad(out.pow(2).sum(), [x, U, V])
    g2 = torch.autograd.grad(ref.pow(2).sum(), [x, U, V])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_row_dot_gradcheck_and_sparse():
    table = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 10, (3, 4))
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, v: row_dot(t, idx, v), (table, x))
    dense = torch.autograd.grad(row_dot(table, idx, x).sum(), table)[0]
    sparse = torch.autograd.grad(row_dot(table, idx, x, sparse=True).sum(), table)[0]
    assert sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "mem,needle",
    [
        ({"kind": "ultramem", "n_keys": 6, "knn": 4, "expansion": 5}, "memory.expansion"),
        ({"kind": "ultramem", "tucker_rank": 0}, "memory.tucker_rank"),
        ({"kind": "ultramem", "cores": 3}, "memory.cores"),  # 64 / 2 = 32 value dims, not divisible by 3
        ({"kind": "ultramem", "sparse_grad": True}, "memory.sparse_grad"),
        ({"kind": "peer", "v_dim": 32}, "memory.v_dim"),
        ({"kind": "peer", "gated": True}, "memory.gated"),
        ({"kind": "ultramem_v2", "window_stride": -1}, "memory.window_stride"),
        ({"kind": "ultramem", "layers": [3], "skip": 1}, "memory.skip"),
        ({"kind": "ultramem", "aux_tau": -1}, "memory.aux_tau"),
        ({"kind": "peer", "peer_act": "tanh"}, "memory.peer_act"),
    ],
)
def test_bad_variant_config_names_the_field(mem, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(ModelConfig, {"dim": 64, "n_layers": 4, "memory": mem})


def test_kind_defaults_of_variants():
    assert MemoryConfig(kind="ultramem").value_expansion == 4 and MemoryConfig(kind="pkm").value_expansion == 1
    assert MemoryConfig(kind="ultramem", n_keys=8).physical_rows == 16
    assert MemoryConfig(kind="ultramem_v2").use_shared_values and MemoryConfig(kind="ultramem_v2").use_qk_norm
    assert ModelConfig(dim=64, memory=MemoryConfig(kind="ultramem")).value_dim == 32
    assert ModelConfig(dim=64, memory=MemoryConfig(kind="peer")).value_dim == 64
    m = MemoryConfig(kind="ultramem_v2", layers=[0, 1, 2], n_keys=8)
    assert m.global_rows() == 3 * 64 and MemoryConfig(**{**m.__dict__, "window_stride": 16}).global_rows() == 96


@pytest.mark.parametrize("name", ["ultramem_v2", "peer", "ultramem"])
def test_local_slots_cover_what_each_layer_addresses(name):
    """Usage statistics are taken over the slots a layer can address: UltraMemV2 layers over their window of the
    global table (global row ids would cap each layer's used fraction at 1 / n_layers)."""
    model = MemLM(variant_config(name))
    model(torch.randint(0, 64, (2, 16)))
    for layer in model.memory_layers:
        rows, n = layer.local_slots(layer.last_indices)
        assert n == (layer.window if name == "ultramem_v2" else layer.n_slots)
        assert rows.min() >= 0 and rows.max() < n
    if name == "ultramem_v2":
        assert model.memory_layers[1].last_indices.min() >= model.memory_layers[1].offset > 0
