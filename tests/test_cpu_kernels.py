"""The numba CPU kernels (memlm/model/memory/cpu_kernels/) against brute force and against the PyTorch
paths they replace (``MEMLM_CPU_KERNELS=0``)."""

from __future__ import annotations

import pytest
import torch

from memlm.config import MemoryConfig
from memlm.model.memory import ProductKeyMemory, cpu_kernels
from memlm.model.memory.product_keys import all_pair_scores
from memlm.model.memory.sparse_update import adam_rows_
from memlm.model.memory.values import row_dots, table_grad_rows

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")


def _brute_topk(s: torch.Tensor, knn: int):
    """s (H, 2, M, n) -> the top-knn of all n^2 pair sums, (M, H, knn)."""
    full = all_pair_scores(s[:, 0], s[:, 1]).permute(1, 0, 2)  # (M, H, n^2)
    return full.topk(knn, dim=-1)


@pytest.mark.parametrize("n,knn", [(16, 1), (16, 2), (64, 5), (64, 8), (256, 32), (12, 12), (40, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_product_topk_equals_brute_force(n, knn, dtype):
    g = torch.Generator().manual_seed(n * 100 + knn)
    s = torch.randn(3, 2, 50, n, generator=g, dtype=dtype)
    scores, ids = cpu_kernels.topk_of_half_scores(s, knn)
    want, _ = _brute_topk(s, knn)
    assert torch.equal(scores, want)  # the same values in the same (descending) order
    sums = s[:, 0].permute(1, 0, 2).gather(-1, ids // n) + s[:, 1].permute(1, 0, 2).gather(-1, ids % n)
    assert torch.equal(sums, scores)  # each id is the slot its score belongs to
    assert all(len(set(row)) == knn for row in ids.reshape(-1, knn).tolist())  # distinct slots


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.zeros(2, 2, 8, 64),  # all tied: the threshold passes nothing
        lambda g: torch.randn(2, 2, 8, 64, generator=g).index_fill_(-1, torch.tensor([5]), 1e6),  # one outlier
        lambda g: torch.randn(2, 2, 8, 64, generator=g).exp() ** 4,  # heavy-tailed
        lambda g: torch.arange(64.0).expand(2, 2, 8, 64).contiguous(),  # sorted, evenly spread
        lambda g: torch.randint(0, 3, (2, 2, 8, 64), generator=g).float(),  # few distinct values, many ties
    ],
)
def test_product_topk_is_exact_on_rows_that_are_not_gaussian(make):
    """The row's mean + z std threshold is only a guess: rows where it lets too few scores through fall back to
    all of them, so the result stays exact."""
    s = make(torch.Generator().manual_seed(0))
    scores, ids = cpu_kernels.topk_of_half_scores(s, 8)
    want, _ = _brute_topk(s, 8)
    assert torch.equal(scores, want)
    sums = s[:, 0].permute(1, 0, 2).gather(-1, ids // 64) + s[:, 1].permute(1, 0, 2).gather(-1, ids % 64)
    assert torch.equal(sums, scores)


def _spread_block(g: torch.Generator) -> torch.Tensor:
    """80 of each row's 512 scores near 1 and the rest near 0: the threshold lets all 80 through (more than the
    rank selection takes, so they are insertion-sorted)."""
    s = torch.randn(2, 2, 8, 512, generator=g) * 1e-3
    s[..., 100:180] += 1.0
    return s


@pytest.mark.parametrize(
    "make,knn",
    [
        (lambda g: torch.randn(4, 2, 64, 512, generator=g), 8),  # ~10 % of the rows take the lower threshold
        (lambda g: torch.randn(4, 2, 64, 512, generator=g), 32),  # ~36 candidates: the variable-width ranking
        (lambda g: torch.randn(3, 2, 10, 8, generator=g), 4),  # 8 sub-keys: the fixed-width ranking pads past n
        (lambda g: torch.randn(2, 2, 40, 200, generator=g), 8),  # 3 vector blocks of 64 and a scalar tail of 8
        (_spread_block, 8),  # more candidates than RANK_MAX
        (lambda g: torch.randn(2, 2, 8, 512, generator=g).round(decimals=1), 8),  # ties among the candidates
    ],
)
def test_product_topk_selection_paths(make, knn):
    """Each way a half's candidates are taken: the tight threshold, its retry, rank selection (fixed width up to
    RANK_FIXED candidates, variable up to RANK_MAX), insertion above RANK_MAX, vector blocks with a scalar tail; ties
    keep the lower sub-key id first (as torch.topk here)."""
    s = make(torch.Generator().manual_seed(knn))
    n = s.shape[-1]
    scores, ids = cpu_kernels.topk_of_half_scores(s, knn)
    want, _ = _brute_topk(s, knn)
    assert torch.equal(scores, want)
    sums = s[:, 0].permute(1, 0, 2).gather(-1, ids // n) + s[:, 1].permute(1, 0, 2).gather(-1, ids % n)
    assert torch.equal(sums, scores)
    assert all(len(set(row)) == knn for row in ids.reshape(-1, knn).tolist())


def test_product_topk_rows_with_nan_or_inf_get_valid_slots():
    """A NaN or inf makes the row's threshold NaN: the whole row is insertion-sorted, and every slot id stays a
    valid, distinct slot (the lookup indexes the value table with them unchecked)."""
    s = torch.randn(2, 2, 6, 128, generator=torch.Generator().manual_seed(1))
    s[0, 0, 0, 7] = float("nan")
    s[1, 1, 2, :] = float("nan")
    s[0, 1, 3, 9] = float("inf")
    s[1, 0, 4, 11] = float("-inf")
    _, ids = cpu_kernels.topk_of_half_scores(s, 8)
    assert ((ids >= 0) & (ids < 128 * 128)).all()
    assert all(len(set(row)) == 8 for row in ids.reshape(-1, 8).tolist())


@pytest.mark.parametrize(
    "half,tile_bytes",
    [(16, None), (cpu_kernels.CHUNK_MAX_HALF, None), (cpu_kernels.CHUNK_MAX_HALF + 8, None), (16, 4000), (8, 1)],
)  # 4000 bytes: tiles of 5 of the 24 queries, the last of 4; 1 byte: tiles of one query
def test_product_topk_from_queries_matches_the_torch_search(half, tile_bytes, monkeypatch):
    """Both ways of scoring: chunks of queries into a tile (narrow halves; also tiles of a few queries, the last one
    partial, and of one query) and one batched matmul (wide halves)."""
    if tile_bytes is not None:
        monkeypatch.setattr("memlm.model.memory.cpu_kernels.topk.TILE_BYTES", tile_bytes)
    g = torch.Generator().manual_seed(half)
    q, keys = torch.randn(4, 6, 3, 2, half, generator=g), torch.randn(3, 2, 32, half, generator=g)
    scores, ids = cpu_kernels.product_topk(q, keys, 8)
    assert scores.shape == ids.shape == (4, 6, 3, 8)
    s = torch.einsum("...hsd,hsnd->...hsn", q, keys)  # (4, 6, 3, 2, 32)
    want = all_pair_scores(s[..., 0, :], s[..., 1, :]).topk(8, dim=-1).values
    torch.testing.assert_close(scores, want)  # the dots' summation order differs: close, not equal
    got = s[..., 0, :].gather(-1, ids // 32) + s[..., 1, :].gather(-1, ids % 32)
    torch.testing.assert_close(got, scores)  # each id is the slot its score belongs to
    assert all(len(set(row)) == 8 for row in ids.reshape(-1, 8).tolist())  # distinct slots
    for bad in (0, 33):
        with pytest.raises(ValueError, match="must be in"):
            cpu_kernels.product_topk(q, keys, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_backward_equals_autograd_through_the_selected_scores(dtype):
    """The sub-keys' and the queries' gradients of the selected scores, against autograd through the dense scores
    gathered at the selected slots (duplicated sub-keys across queries and ranks included)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 3, 2, 2, 12, generator=g, dtype=dtype, requires_grad=True)
    keys = torch.randn(2, 2, 16, 12, generator=g, dtype=dtype, requires_grad=True)
    _, ids = cpu_kernels.product_topk(q.detach(), keys.detach(), 5)  # (7, 3, 2, 5)
    gs = torch.randn(ids.shape, generator=g, dtype=dtype)
    s = torch.einsum("...hsd,hsnd->...hsn", q, keys)  # (7, 3, 2, 2, 16)
    picked = s[..., 0, :].gather(-1, ids // 16) + s[..., 1, :].gather(-1, ids % 16)
    want_q, want_k = torch.autograd.grad((picked * gs).sum(), (q, keys))
    got_q, got_k = cpu_kernels.search_backward(q.detach(), keys.detach(), ids, gs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)


def _lookup_case(dtype, n=50, m=30, k=6, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n, d, generator=g, dtype=dtype)
    idx = torch.randint(0, n, (m, k), generator=g)
    idx[0] = 7  # one bag reads the same row k times
    w = torch.rand(m, k, generator=g, dtype=dtype)
    go = torch.randn(m, d, generator=g, dtype=dtype)
    return table, idx, w, go


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lookup_backward_equals_the_gathered_gradients(dtype):
    table, idx, w, go = _lookup_case(dtype)
    uniq, rows, gw = cpu_kernels.lookup_backward(table, idx, w, go, True, True)
    assert torch.equal(uniq, idx.unique())
    dense = torch.zeros_like(table).index_add_(0, idx.reshape(-1), (w.unsqueeze(-1) * go.unsqueeze(1)).reshape(-1, 24))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, dense[uniq], **tol)
    torch.testing.assert_close(gw, torch.einsum("mkd,md->mk", table[idx], go), **tol)
    only_rows = cpu_kernels.lookup_backward(None, idx, w, go, True, False)
    assert only_rows[2] is None and torch.equal(only_rows[1], rows)
    only_dots = cpu_kernels.lookup_backward(table, idx, w, go, False, True)
    assert only_dots[1] is None and torch.equal(only_dots[2], gw)


def test_lookup_kernels_match_the_torch_paths(monkeypatch):
    """table_grad_rows and row_dots give the same numbers with and without the kernels; so does a whole layer."""
    table, idx, w, go = _lookup_case(torch.float32, n=300, m=64, k=8, d=32, seed=2)
    with_k = table_grad_rows(idx, w, go), row_dots(table, idx, go)
    monkeypatch.setenv("MEMLM_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    without = table_grad_rows(idx, w, go), row_dots(table, idx, go)
    assert torch.equal(with_k[0][0], without[0][0])
    torch.testing.assert_close(with_k[0][1], without[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_k[1], without[1], rtol=1e-5, atol=1e-6)
    assert row_dots(table, idx[:0], go[:0]).shape == (0, 8)


def _layer_grads(kind: str, sparse: bool):
    torch.manual_seed(0)
    cfg = MemoryConfig(kind=kind, n_keys=32, heads=2, knn=8, k_dim=32, sparse_grad=sparse)
    layer = ProductKeyMemory(48, cfg)
    layer.record = False
    x = torch.randn(2, 10, 48, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("kind,sparse", [("pkm", True), ("pkm", False), ("memory_plus", True)])
def test_layer_forward_and_backward_match_without_kernels(monkeypatch, kind, sparse):
    y1, gx1, g1 = _layer_grads(kind, sparse)
    monkeypatch.setenv("MEMLM_CPU_KERNELS", "0")
    y0, gx0, g0 = _layer_grads(kind, sparse)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("per_row", [False, True])
def test_adam_rows_kernel_matches_torch_and_leaves_other_rows_bitwise(per_row):
    g = torch.Generator().manual_seed(4)
    n, d = 40, 12
    rows = torch.tensor([0, 3, 4, 17, 39])
    state = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 0.1, torch.rand(n, d, generator=g)]
    ours, ref = [t.clone() for t in state], [t.clone() for t in state]
    for step in range(1, 4):
        grad = torch.randn(rows.numel(), d, generator=g)
        t = torch.full((rows.numel(),), step + 2) if per_row else step
        adam_rows_(*ours[:1], rows, grad, *ours[1:], t, lr=1e-2, impl="auto")  # the numba pass
        adam_rows_(*ref[:1], rows, grad, *ref[1:], t, lr=1e-2, impl="reference" if per_row else "torch")
    other = torch.ones(n, dtype=torch.bool)
    other[rows] = False
    for a, b, s in zip(ours, ref, state, strict=True):
        torch.testing.assert_close(a[rows], b[rows], rtol=1e-6, atol=1e-7)
        assert torch.equal(a[other], s[other])
    assert not torch.equal(ours[0][rows], state[0][rows])


def test_adam_rows_kernel_bumps_versions_and_takes_a_tensor_lr():
    """Written through raw pointers, the step still bumps the version counters, so autograd refuses a backward
    through a tensor it changed (as after any in-place op); a one-element tensor lr works as in the torch path."""
    p = torch.randn(5, 4, requires_grad=True)
    y = (p * p).sum()
    m, v = torch.zeros(5, 4), torch.zeros(5, 4)
    with torch.no_grad():
        adam_rows_(p, torch.tensor([0, 3]), torch.ones(2, 4), m, v, 1, lr=torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    assert not torch.equal(m[0], torch.zeros(4)) and torch.equal(m[1], torch.zeros(4))


@pytest.mark.parametrize("shape", [(0, 4), (3,), (7, 5), (2 * cpu_kernels.grad_norm.BLOCK + 3,), (700, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_norm_equals_the_exact_norm(shape, dtype):
    """Block sums (a partial last block, fewer elements than one block, none) against the float64 norm."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    got = cpu_kernels.l2_norm(x)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, torch.linalg.vector_norm(x.double()).float(), rtol=1e-6, atol=0)
    if x.dim() == 2:  # a transposed (non-contiguous) view: the same norm
        torch.testing.assert_close(cpu_kernels.l2_norm(x.t()), got)
    if x.numel():  # a NaN or inf element reaches the norm, as in torch's
        y = x.clone()
        y.view(-1)[-1] = float("nan")
        assert cpu_kernels.l2_norm(y).isnan()
        y.view(-1)[-1] = float("inf")
        assert cpu_kernels.l2_norm(y).isposinf()


def test_switch_and_dtypes(monkeypatch):
    assert cpu_kernels.available(torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    assert not cpu_kernels.available(torch.zeros(2, dtype=torch.bfloat16))  # numba has no bf16: PyTorch path
    assert not cpu_kernels.available(torch.zeros(2, dtype=torch.int32))  # the views take int64 ids only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_kernels.available(torch.zeros(2))  # the wrappers' own ops would autocast
    monkeypatch.setenv("MEMLM_CPU_KERNELS", "0")
    assert not cpu_kernels.available(torch.zeros(2))
