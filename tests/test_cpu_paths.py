"""The CPU fast paths of the memory layers against plain references: row dots by sampled matmul, the staircase top-k
of the product grid, and sparse gradients re-flagged coalesced instead of re-sorted; and the layers without numba."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memlm.model.memory import values
from memlm.model.memory.product_keys import product_topk, product_topk_halves, staircase_pairs
from memlm.model.memory.sparse_update import RowSparseAdam, coalesced
from memlm.model.memory.values import row_dots, value_lookup


def _gathered_dots(table, idx, x):
    return torch.einsum("mkd,md->mk", F.embedding(idx, table.double()), x.double())  # (M, K) in fp64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_dots_equal_gathered_dots_with_duplicate_rows(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 12, generator=g).to(dtype)
    idx = torch.randint(0, 30, (17, 9), generator=g)
    idx[:, 1] = idx[:, 0]  # the same row twice in every bag (several heads read one slot)
    x = torch.randn(17, 12, generator=g).to(dtype)
    monkeypatch.setattr(values, "_CHUNK_ELEMS", 12 * 9 * 4)  # the chunked fallback (bf16) takes 5 chunks
    got = row_dots(table, idx, x)
    assert got.shape == (17, 9) and got.dtype == dtype
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), _gathered_dots(table, idx, x), **tol)
    assert row_dots(table, idx[:0], x[:0]).shape == (0, 9)  # no tokens


@pytest.mark.parametrize("knn", [1, 2, 5, 8, 32])
def test_staircase_topk_equals_full_grid(knn):
    g = torch.Generator().manual_seed(knn)
    s1, s2 = torch.randn(64, 40, generator=g), torch.randn(64, 40, generator=g)
    scores, idx = product_topk(s1, s2, knn)
    ref = (s1[:, :, None] + s2[:, None, :]).flatten(1).topk(knn, -1)
    torch.testing.assert_close(scores, ref.values)
    assert torch.equal(idx, ref.indices)
    both = product_topk_halves(torch.stack([s1, s2], dim=1), knn)  # one top-k call over the stacked halves
    assert torch.equal(both[0], scores) and torch.equal(both[1], idx)
    a, b = staircase_pairs(knn, "cpu")
    assert bool(((a + 1) * (b + 1) <= knn).all()) and len(set(zip(a.tolist(), b.tolist()))) == a.numel()
    assert a.numel() == sum(knn // (i + 1) for i in range(knn))  # ~ knn ln knn candidates, not knn^2
    assert staircase_pairs(32, "cpu")[0].numel() == 119


def test_coalesced_reflags_sorted_rows_without_copying_and_sums_duplicates():
    rows, vals = torch.tensor([[1, 4, 7]]), torch.randn(3, 5)
    g = torch.sparse_coo_tensor(rows, vals, (10, 5), check_invariants=True)  # sorted unique rows, not flagged
    assert not g.is_coalesced()
    c = coalesced(g)
    assert c.is_coalesced() and c._values().data_ptr() == vals.data_ptr()  # the same storage: nothing re-sorted
    dup = torch.sparse_coo_tensor(torch.tensor([[4, 1, 4]]), vals, (10, 5), check_invariants=True)
    torch.testing.assert_close(coalesced(dup).to_dense(), dup.to_dense())
    assert coalesced(dup)._indices().tolist() == [[1, 4]]


def test_lookup_gradient_reaches_the_optimizer_coalesced_as_built():
    """autograd may store the lookup's (coalesced) table gradient without the flag (when it steals the tensor); the
    step sees it re-flagged and moves exactly the rows a one-process dense reference moves."""
    g = torch.Generator().manual_seed(3)
    table = torch.nn.Parameter(torch.randn(40, 8, generator=g))
    ref = torch.nn.Parameter(table.detach().clone())
    idx = torch.randint(0, 40, (6, 5), generator=g)
    w = torch.rand(6, 5, generator=g)
    value_lookup(table, idx, w, sparse=True).square().sum().backward()
    value_lookup(ref, idx, w).square().sum().backward()
    assert table.grad.is_sparse
    assert coalesced(table.grad).is_coalesced()
    opt, ref_opt = RowSparseAdam([table], lr=0.1), RowSparseAdam([ref], lr=0.1)
    opt.step()
    ref_opt.step()  # a dense gradient: its non-zero rows
    torch.testing.assert_close(table.detach(), ref.detach())
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[idx.unique()] = False
    assert torch.equal(table.detach()[untouched], ref.detach()[untouched])


def test_staircase_cache_made_under_inference_mode_still_trains():
    """The staircase pairs are cached: built first under inference mode (a validation loop), they must still serve
    a later forward whose backward saves them."""
    from memlm.model.memory import product_keys

    product_keys._staircase_tensors.cache_clear()
    s1, s2 = torch.randn(3, 9), torch.randn(3, 9)
    with torch.inference_mode():
        product_topk(s1, s2, 4)
    a, b = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    scores, _ = product_topk(a, b, 4)
    scores.sum().backward()
    assert float(a.grad.sum()) == 3 * 4  # each of a row's 4 selected slots adds one to one of its s1 entries


def test_row_dot_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="leading shape"):
        values.row_dot(torch.randn(5, 4), torch.zeros(2, 3, 2, dtype=torch.long), torch.randn(2, 1, 4))


def test_memory_layers_import_and_run_without_numba():
    """numba is optional at import time: with it blocked, the kernels are off and a layer runs its PyTorch path."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from memlm.config import MemoryConfig\n"
        "from memlm.model.memory import ProductKeyMemory, cpu_kernels\n"
        "assert not cpu_kernels.available()\n"
        "layer = ProductKeyMemory(16, MemoryConfig(kind='memory_plus', n_keys=8, heads=2, knn=4, k_dim=16))\n"
        "layer(torch.randn(1, 3, 16)).sum().backward()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
