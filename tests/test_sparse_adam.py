"""Row-sparse (lazy) optimizer updates: == dense Adam restricted to the touched rows; untouched rows bitwise unchanged.

Pure torch on CPU (the fused Triton step is tested against ``impl="reference"`` in test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from memlm.model.memory import sparse_update
from memlm.model.memory.sparse_update import RowSparseAdam, adam_rows_, coalesce_rows, sgd_rows_


def _sparse_grad(n, d, rows, gen):
    vals = torch.randn(rows.numel(), d, generator=gen)  # (R, D)
    return torch.sparse_coo_tensor(rows[None], vals, (n, d), check_invariants=True).coalesce()


def test_row_sparse_adam_equals_dense_adam_on_fixed_rows():
    gen = torch.Generator().manual_seed(0)
    n, d = 20, 8
    init = torch.randn(n, d, generator=gen)
    rows = torch.tensor([1, 4, 5, 11, 19])
    dense_p = init.clone().requires_grad_()
    sparse_p = init.clone().requires_grad_()
    dense_opt = torch.optim.Adam([dense_p], lr=1e-2, foreach=False)
    sparse_opt = RowSparseAdam([sparse_p], lr=1e-2)
    for _ in range(4):
        g = _sparse_grad(n, d, rows, gen)
        dense_p.grad = g.to_dense()
        sparse_p.grad = g
        dense_opt.step()
        sparse_opt.step()
    torch.testing.assert_close(sparse_p[rows], dense_p[rows], atol=0, rtol=1e-6)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(sparse_p[untouched], init[untouched])


def test_row_sparse_adam_varying_rows_matches_sparse_adam_and_leaves_rest_bitwise():
    gen = torch.Generator().manual_seed(1)
    n, d = 30, 6
    init = torch.randn(n, d, generator=gen)
    ref_p = init.clone().requires_grad_()
    p = init.clone().requires_grad_()
    ref_opt = torch.optim.SparseAdam([ref_p], lr=1e-2)
    opt = RowSparseAdam([p], lr=1e-2)
    for _ in range(5):
        rows = torch.randperm(n, generator=gen)[:7]
        before_p, before_m = p.detach().clone(), opt.state[p]["exp_avg"].clone() if opt.state[p] else None
        g = _sparse_grad(n, d, rows, gen)
        ref_p.grad, p.grad = g, g
        ref_opt.step()
        opt.step()
        torch.testing.assert_close(p, ref_p, atol=1e-5, rtol=1e-5)  # SparseAdam rounds differently
        other = torch.ones(n, dtype=torch.bool)
        other[rows] = False
        assert torch.equal(p.detach()[other], before_p[other])
        if before_m is not None:
            assert torch.equal(opt.state[p]["exp_avg"][other], before_m[other])


def test_row_sparse_adam_per_row_step_and_dense_grad_rows():
    gen = torch.Generator().manual_seed(2)
    n, d = 10, 4
    p = torch.randn(n, d, generator=gen, requires_grad=True)
    opt = RowSparseAdam([p], lr=0.1, per_row_step=True)
    p.grad = torch.zeros(n, d)
    p.grad[3] = 1.0  # dense gradient: the non-zero rows are the touched ones
    opt.step()
    assert opt.state[p]["step"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    p.grad = torch.zeros(n, d)
    p.grad[7] = -1.0
    before = p.detach().clone()
    opt.step()
    # row 7's first update is a bias-corrected first Adam step: exactly -lr * sign(g) (up to eps)
    torch.testing.assert_close(p.detach()[7] - before[7], torch.full((d,), 0.1), atol=1e-6, rtol=0)
    assert torch.equal(p.detach()[3], before[3])
    assert opt.state[p]["step"].tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]


def test_adam_rows_functional_bf16_and_sgd_and_coalesce():
    n, d = 12, 5
    p = torch.randn(n, d).to(torch.bfloat16)
    m, v = torch.zeros(n, d), torch.zeros(n, d)
    before = p.clone()
    rows = torch.tensor([2, 9])
    adam_rows_(p, rows, torch.ones(2, d), m, v, step=1, lr=0.5)
    assert torch.equal(p[[0, 1, 3]], before[[0, 1, 3]]) and not torch.equal(p[2], before[2])
    q = torch.zeros(n, d)
    sgd_rows_(q, rows, torch.ones(2, d), lr=2.0)
    assert q[2].eq(-2.0).all() and q.sum() == -2.0 * 2 * d
    uniq, summed = coalesce_rows(torch.tensor([4, 1, 4]), torch.ones(3, d))
    assert uniq.tolist() == [1, 4] and summed[:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="grad_rows"):
        sgd_rows_(q, rows, torch.ones(3, d), lr=1.0)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_rows_torch_path_equals_op_by_op_reference(monkeypatch, dtype, per_row):
    """impl="torch" (gather + torch's fused Adam + scatter, in CPU chunks) == the formula op by op, over steps with
    varying rows; per-row step counts take the op-by-op formula chunk by chunk."""
    monkeypatch.setattr(sparse_update, "CPU_CHUNK_ELEMS", 4 * 9)  # 4 rows per chunk: several chunks, a partial last
    gen = torch.Generator().manual_seed(3)
    n, d = 40, 9
    init = torch.randn(n, d, generator=gen).to(dtype)
    states = {impl: (init.clone(), torch.zeros(n, d), torch.zeros(n, d)) for impl in ("torch", "reference")}
    counts = torch.zeros(n, dtype=torch.long)
    for step in range(1, 5):
        rows = torch.randperm(n, generator=gen)[:15]
        g = torch.randn(15, d, generator=gen)
        counts[rows] += 1
        for impl, (p, m, v) in states.items():
            t = counts[rows] if per_row else step
            adam_rows_(p, rows, g, m, v, t, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, impl=impl)
    (p1, m1, v1), (p2, m2, v2) = states["torch"], states["reference"]
    torch.testing.assert_close(m1, m2, atol=0, rtol=1e-6)
    torch.testing.assert_close(v1, v2, atol=0, rtol=1e-6)
    torch.testing.assert_close(p1, p2, **({"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {}))
    assert not torch.equal(p1, init)


def test_adam_rows_impl_errors():
    p, m, v = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)
    rows, g = torch.tensor([1]), torch.ones(1, 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        adam_rows_(p, rows, g, m, v, 1, lr=0.1, impl="cuda")
    with pytest.raises(RuntimeError, match="needs Triton"):  # CPU tensors: the fused kernel cannot run
        adam_rows_(p, rows, g, m, v, 1, lr=0.1, impl="triton")
    assert p.eq(0).all() and m.eq(0).all()  # nothing was half-written


def test_bf16_table_resume_keeps_fp32_moments_exactly():
    """torch's load_state_dict casts state to the parameter's dtype; a bf16 table's fp32 moments come back exact."""
    import copy

    gen = torch.Generator().manual_seed(4)

    def grad(t):
        rows = torch.tensor([1, 3 + t % 4])
        return torch.sparse_coo_tensor(rows[None], torch.randn(2, 6, generator=gen), (10, 6)).coalesce()

    def run(split):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 60).view(10, 6).to(torch.bfloat16))
        opt = RowSparseAdam([p], lr=0.1)
        for t in range(1, 6):
            if t == split:
                sd = copy.deepcopy(opt.state_dict())
                opt = RowSparseAdam([p], lr=0.1)
                opt.load_state_dict(sd)
                assert opt.state[p]["exp_avg"].dtype == torch.float32
                assert torch.equal(opt.state[p]["exp_avg_sq"], sd["state"][0]["exp_avg_sq"])
            p.grad = grad(t).to(torch.bfloat16)
            opt.step()
        return p.detach()

    gen.manual_seed(4)
    a = run(None)
    gen.manual_seed(4)
    assert torch.equal(a, run(3))


def test_adam_rows_step_shape_checked_and_empty_rows():
    p, m, v = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="per-row step counts"):
        adam_rows_(p, torch.tensor([1, 2]), torch.ones(2, 2), m, v, torch.tensor(3), lr=0.1)
    adam_rows_(p, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), m, v, 1, lr=0.1)  # nothing read: no-op
    assert p.eq(0).all() and m.eq(0).all()
