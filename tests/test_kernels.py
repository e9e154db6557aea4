"""Fused value-lookup kernels == the F.embedding_bag reference; row-sparse Adam == dense Adam on touched rows.

With CUDA the Triton kernels are compiled and run on the GPU. Without it they run on CPU through the Triton
interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is first imported (triton's own library
functions are decorated at import) and stay on while kernels run. If this module is imported before triton, it sets
the variable itself (for the rest of the session: harmless without a GPU); if triton was already imported (e.g. by
lightning in a whole-suite run), the kernel tests here skip and ``test_interpreter_in_subprocess`` reruns this file
in a fresh interpreter-mode process.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlm.model.memory.sparse_update import _bias_corrections, adam_rows_, grad_to_rows
from memlm.model.memory.values import value_lookup, value_lookup_reference

HAS_CUDA = torch.cuda.is_available()
LOOKUP = "memlm.model.memory.kernels.lookup"
_INTERP_ENV = os.environ.get("TRITON_INTERPRET") == "1"
# on CPU, interpreter mode works in this process only if triton is not imported yet (or the env was set from the start)
IN_PROCESS = HAS_CUDA or _INTERP_ENV or "triton" not in sys.modules
try:
    if not HAS_CUDA and IN_PROCESS:
        # read when triton decorates its (and our) kernels and again when they run: it stays set (CPU-only machine)
        os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")

# (N rows, D, leading shape, K): odd D, D over one 1024-column tile, K over one K tile, multi-dim leading shapes
SHAPES = [(64, 48, (3, 5), 7), (40, 100, (6,), 3), (16, 1030, (2,), 9), (8, 64, (2, 2), 33)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kern():
    """(kernel module, device): compiled on CUDA, else interpreted on CPU."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not IN_PROCESS:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; see test_interpreter_in_subprocess")
    return importlib.import_module(LOOKUP), ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(IN_PROCESS or not HAS_TRITON, reason="kernel tests already run in this process")
def test_interpreter_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "not subprocess"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def _inputs(n, d, lead, k, dtype, device, seed=0, dup=True):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n, d, generator=g).to(dtype)  # (N, D)
    idx = torch.randint(0, n, (*lead, k), generator=g)  # (..., K)
    if dup and k > 1:
        idx[..., 1] = idx[..., 0]  # the same row twice in every bag
    w = torch.randn(*lead, k, generator=g)  # (..., K) fp32, like softmax scores
    gout = torch.randn(*lead, d, generator=g).to(dtype)  # (..., D)
    return table.to(device), idx.to(device), w.to(device), gout.to(device)


def _reference(table, idx, w, gout):
    """float64 reference (output, dense table grad, weights grad) from the same (rounded) inputs."""
    t = table.detach().cpu().double().requires_grad_()
    wr = w.detach().cpu().double().requires_grad_()
    out = value_lookup_reference(t, idx.cpu(), wr)
    out.backward(gout.cpu().double())
    return out.detach(), t.grad, wr.grad


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(kern, shape, dtype):
    mod, dev = kern
    table, idx, w, gout = _inputs(*shape, dtype, dev)
    out = mod.lookup_forward(table, idx, w)
    ref, _, _ = _reference(table, idx, w, gout)
    assert out.dtype == dtype and out.shape == (*shape[2], shape[1])
    torch.testing.assert_close(out.cpu().double(), ref, **_tol(dtype))


BACKWARDS = [("dense", "rows"), ("sparse", "rows"), ("atomic", "rows"), ("dense", "ranges"), ("sparse", "ranges")]


@pytest.mark.parametrize("mode,kernel", BACKWARDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(kern, monkeypatch, shape, dtype, mode, kernel):
    mod, dev = kern
    monkeypatch.setitem(mod.CONFIG, "bwd_kernel", kernel)  # the table-gradient pass (per row, or segment ranges)
    monkeypatch.setitem(mod.CONFIG, "range_block_p", 4)  # several chunks per range: carries between chunks
    monkeypatch.setitem(mod.CONFIG, "bwd_block_d", 64 if shape[1] > 64 else 1024)  # several column tiles, or one
    monkeypatch.setitem(mod.CONFIG, "bwd_block_j", 2 ** (SHAPES.index(shape) % 3))  # 1, 2, 4 occurrences per step
    n, d = shape[:2]
    table, idx, w, gout = _inputs(*shape, dtype, dev)
    rows, gtab, gw = mod.lookup_backward(table, idx, w, gout, mode=mode)
    _, ref_gt, ref_gw = _reference(table, idx, w, gout)
    if mode == "sparse":
        assert torch.equal(rows.cpu(), torch.unique(idx.cpu()))  # sorted unique touched rows
        full = torch.zeros(n, d, dtype=torch.float64)
        full[rows.cpu()] = gtab.cpu().double()
        gtab = full
    assert gw.dtype == w.dtype and gw.shape == w.shape
    torch.testing.assert_close(gtab.cpu().double(), ref_gt, **_tol(dtype))
    torch.testing.assert_close(gw.cpu().double(), ref_gw, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sparse", [False, True])
def test_autograd_through_value_lookup(kern, sparse):
    mod, dev = kern
    table, idx, w, gout = _inputs(50, 36, (4, 3), 6, torch.float32, dev)
    t = table.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    out = value_lookup(t, idx, wr, sparse=sparse, impl="triton")
    out.backward(gout)
    ref_out, ref_gt, ref_gw = _reference(table, idx, w, gout)
    torch.testing.assert_close(out.detach().cpu().double(), ref_out, atol=1e-5, rtol=1e-5)
    assert t.grad.is_sparse == sparse
    gt = t.grad.to_dense() if sparse else t.grad
    torch.testing.assert_close(gt.cpu().double(), ref_gt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wr.grad.cpu().double(), ref_gw, atol=1e-5, rtol=1e-5)
    if sparse:  # usable by the row-sparse optimizer as is
        rows, grad_rows = grad_to_rows(t.grad)
        assert torch.equal(rows.cpu(), torch.unique(idx.cpu()))


def test_only_weights_or_only_table_need_grad(kern):
    mod, dev = kern
    table, idx, w, gout = _inputs(30, 20, (5,), 4, torch.float32, dev)
    _, ref_gt, ref_gw = _reference(table, idx, w, gout)
    wr = w.clone().requires_grad_()
    value_lookup(table, idx, wr, impl="triton").backward(gout)
    torch.testing.assert_close(wr.grad.cpu().double(), ref_gw, atol=1e-5, rtol=1e-5)
    t = table.clone().requires_grad_()
    value_lookup(t, idx, w, impl="triton").backward(gout)
    torch.testing.assert_close(t.grad.cpu().double(), ref_gt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_deterministic_bitwise(kern, mode):
    mod, dev = kern
    # few rows, many bags: every row is read many times, so the summation order matters
    table, idx, w, gout = _inputs(6, 40, (24,), 8, torch.float32, dev, seed=3)
    outs = [mod.lookup_forward(table, idx, w) for _ in range(2)]
    grads = [mod.lookup_backward(table, idx, w, gout, mode=mode) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])


@pytest.mark.parametrize("kernel", ["rows", "ranges"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_heavy_rows_chunked_pass(kern, monkeypatch, mode, dtype, kernel):
    """Rows read more than CONFIG['bwd_cap'] times take the chunked path; same result, still deterministic."""
    mod, dev = kern
    monkeypatch.setitem(mod.CONFIG, "bwd_cap", 3)
    monkeypatch.setitem(mod.CONFIG, "bwd_kernel", kernel)  # "ranges" compacts the heavy rows' positions out
    monkeypatch.setitem(mod.CONFIG, "range_block_p", 4)
    table, idx, w, gout = _inputs(7, 100, (30,), 6, dtype, dev, seed=4)
    idx[:5, :] = 2  # one hot row next to rows just over the cap
    n, d = table.shape
    _, ref_gt, ref_gw = _reference(table, idx, w, gout)
    res = [mod.lookup_backward(table, idx, w, gout, mode=mode) for _ in range(2)]
    rows, gtab, gw = res[0]
    if mode == "sparse":
        full = torch.zeros(n, d, dtype=torch.float64)
        full[rows.cpu()] = gtab.cpu().double()
        gtab = full
    torch.testing.assert_close(gtab.cpu().double(), ref_gt, **_tol(dtype))
    torch.testing.assert_close(gw.cpu().double(), ref_gw, atol=1e-4, rtol=1e-4)
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])


def test_empty_and_errors(kern):
    mod, dev = kern
    table = torch.randn(10, 12, device=dev)
    idx = torch.zeros(0, 4, dtype=torch.long, device=dev)
    w = torch.zeros(0, 4, device=dev)
    assert mod.lookup_forward(table, idx, w).shape == (0, 12)
    _, gt, gw = mod.lookup_backward(table, idx, w, torch.zeros(0, 12, device=dev))
    assert gt.shape == (10, 12) and not gt.any() and gw.shape == (0, 4)
    with pytest.raises(ValueError, match="same shape"):
        mod.value_lookup(table, torch.zeros(3, 4, dtype=torch.long, device=dev), torch.zeros(3, 5, device=dev))
    with pytest.raises(ValueError, match="mode"):
        mod.lookup_backward(table, idx, w, torch.zeros(0, 12, device=dev), mode="nope")


def test_lookup_backward_rows_api(kern):
    from memlm.model.memory import kernels

    mod, dev = kern
    table, idx, w, gout = _inputs(20, 16, (5,), 4, torch.float32, dev)
    rows, grad_rows, gw = kernels.lookup_backward_rows(table, idx, w, gout)
    _, ref_gt, _ = _reference(table, idx, w, gout)
    torch.testing.assert_close(grad_rows.cpu().double(), ref_gt[rows.cpu()], atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_dispatch_larger_bf16():
    from memlm.model.memory import kernels

    table, idx, w, gout = _inputs(4096, 1024, (256, 4), 32, torch.bfloat16, "cuda", seed=5)
    assert kernels.available(table)
    t = table.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    out = value_lookup(t, idx, wr)  # impl="auto" picks the Triton path on CUDA
    assert "ValueLookupFunction" in type(out.grad_fn).__name__
    out.backward(gout)
    ref_out, ref_gt, ref_gw = _reference(table, idx, w, gout)
    torch.testing.assert_close(out.detach().cpu().double(), ref_out, atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(t.grad.cpu().double(), ref_gt, atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(wr.grad.cpu().double(), ref_gw, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# fused product-key top-k

TOPK_CASES = [  # (T, heads, n_keys, knn, dtype, rows per program): odd n_keys (padded columns), knn = n_keys
    (5, 3, 64, 8, torch.float32, 1),
    (4, 2, 100, 16, torch.bfloat16, 2),
    (3, 1, 33, 4, torch.float32, 4),
    (2, 2, 8, 8, torch.float32, 1),
]


@pytest.fixture(scope="module")
def topk_kern(kern):
    return importlib.import_module("memlm.model.memory.kernels.topk"), kern[1]


def _slot_grads(idx, g, n):
    """float64 gradient of s (..., 2, n) for scores s1[i] + s2[j] at the given slots i * n + j."""
    gs = torch.zeros(*idx.shape[:-1], 2, n, dtype=torch.float64)
    gs[..., 0, :].scatter_add_(-1, idx // n, g)
    gs[..., 1, :].scatter_add_(-1, idx % n, g)
    return gs


@pytest.mark.parametrize("case", TOPK_CASES)
def test_fused_topk_matches_exhaustive_search(topk_kern, monkeypatch, case):
    mod, dev = topk_kern
    t, h, n, knn, dtype, rows = case
    monkeypatch.setitem(mod.CONFIG, "fwd_rows", rows)
    monkeypatch.setitem(mod.CONFIG, "bwd_rows", rows)
    g = torch.Generator().manual_seed(n)
    s = torch.randn(t, h, 2, n, generator=g).to(dtype)  # bf16: many exact ties among candidate sums
    sd = s.to(dev).requires_grad_()
    scores, idx = mod.ProductTopKFunction.apply(sd, knn)
    scores, idx = scores.cpu(), idx.cpu()
    s64 = s.double()
    full = (s64[..., 0, :, None] + s64[..., 1, None, :]).flatten(-2)  # (T, H, n*n) every slot's exact score
    ref_scores = full.topk(knn, dim=-1).values
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (t, h, knn)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-6, rtol=1e-6)  # sorted, exact top-k values
    torch.testing.assert_close(full.gather(-1, idx), scores.double(), atol=1e-6, rtol=1e-6)  # ids match scores
    assert all(len(set(r)) == knn for r in idx.view(-1, knn).tolist())  # distinct slots
    grad = torch.randn(t, h, knn, generator=g)
    sd.grad = None
    out, _ = mod.ProductTopKFunction.apply(sd, knn)
    out.backward(grad.to(dev))
    assert sd.grad.dtype == dtype
    torch.testing.assert_close(sd.grad.cpu().double(), _slot_grads(idx, grad.double(), n), **_tol(dtype))


def test_fused_topk_agrees_with_pytorch_path_in_product_keys(topk_kern):
    from memlm.model.memory.product_keys import ProductKeys

    _, dev = topk_kern
    torch.manual_seed(0)
    keys = ProductKeys(heads=2, n_keys=40, k_dim=16, qk_norm=True).to(dev)
    q = torch.randn(3, 5, 2, 16, device=dev)
    s_ref, i_ref = keys.retrieve(q, 8, impl="torch")
    s_fused, i_fused = keys.retrieve(q, 8, impl="triton")
    assert torch.equal(i_ref, i_fused)  # fp32 random scores: no ties
    torch.testing.assert_close(s_fused, s_ref.float(), atol=1e-6, rtol=1e-6)
    # gradients into queries and keys agree too
    grads = []
    for impl in ("torch", "triton"):
        keys.zero_grad(set_to_none=True)
        qq = q.clone().requires_grad_()
        sc, _ = keys.retrieve(qq, 8, impl=impl)
        sc.float().square().sum().backward()
        grads.append((qq.grad, keys.weight.grad))
    for a, b in zip(grads[0], grads[1]):  # dense vs sparse backward formulations: fp32 rounding only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fused_topk_deterministic_and_supported_sizes(topk_kern):
    mod, dev = topk_kern
    s = torch.randn(6, 2, 2, 16).to(dev).requires_grad_()
    res = []
    for _ in range(2):
        s.grad = None
        sc, idx = mod.ProductTopKFunction.apply(s, 4)
        sc.backward(torch.ones_like(sc))  # duplicate sub-keys in a row: summed in a fixed order
        res.append((sc, idx, s.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(res[0], res[1]))
    # scores in a permuted layout (as a batched matmul leaves them): read in place, gradient in the same layout
    base = torch.randn(2, 2, 6, 16).to(dev)  # (H, 2, T, N) storage
    sp = base.permute(2, 0, 1, 3).requires_grad_()  # (T, H, 2, N) view
    sc, idx = mod.ProductTopKFunction.apply(sp, 4)
    ref, _ = mod.ProductTopKFunction.apply(sp.detach().contiguous(), 4)
    assert torch.equal(sc, ref)
    sc.backward(torch.ones_like(sc))
    assert sp.grad.stride() == sp.stride()
    torch.testing.assert_close(sp.grad.cpu().double(), _slot_grads(idx.cpu(), torch.ones(6, 2, 4).double(), 16))
    assert mod.supported(1024, 32) and not mod.supported(1024, 24) and not mod.supported(16, 32)


# ----------------------------------------------------------------------------------------------------------------------
# the PyTorch path: table gradient per touched row (pure torch, no Triton)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_lookup_equals_embedding_bag_reference(sparse, dtype):
    from memlm.model.memory.values import value_lookup_segmented

    table, idx, w, gout = _inputs(30, 20, (4, 3), 6, dtype, "cpu", seed=7)  # duplicate rows in every bag
    ref_out, ref_gt, ref_gw = _reference(table, idx, w, gout)
    t = table.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    out = value_lookup(t, idx, wr, sparse=sparse)  # impl="auto" on CPU: the segmented path
    out.backward(gout)
    assert t.grad.is_sparse == sparse and out.dtype == dtype
    gt = t.grad.coalesce().to_dense() if sparse else t.grad
    if sparse:  # one row per touched slot, sorted, ready for the row-sparse optimizer
        assert torch.equal(t.grad._indices()[0], torch.unique(idx))
    tol = _tol(dtype) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(out.detach().double(), ref_out, **tol)
    torch.testing.assert_close(gt.double(), ref_gt, **tol)
    torch.testing.assert_close(wr.grad.double(), ref_gw, **tol)
    with torch.no_grad():  # no autograd: just the embedding bag
        assert torch.equal(value_lookup_segmented(table, idx, w), out.detach())


# ----------------------------------------------------------------------------------------------------------------------
# fused row-sparse Adam step

ADAM_CASES = [  # (N rows, trailing shape, param dtype, per-row step counts): odd D, D over one column tile, 3-D table
    (50, (100,), torch.float32, False),
    (40, (1030,), torch.bfloat16, True),
    (30, (3, 7), torch.float32, True),
]


@pytest.mark.parametrize("case", ADAM_CASES)
def test_fused_adam_rows_matches_reference(kern, case):
    from memlm.model.memory import kernels

    dev = kern[1]
    n, trailing, dtype, per_row = case
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(n, *trailing, generator=gen).to(dtype)
    p_ref, m_ref, v_ref = init.clone(), torch.zeros(n, *trailing), torch.zeros(n, *trailing)
    p, m, v = init.clone().to(dev), m_ref.clone().to(dev), v_ref.clone().to(dev)
    counts = torch.zeros(n, dtype=torch.long)
    lr, betas, eps = 1e-2, ((0.9, 0.999) if per_row else (0.9, 0.99)), 1e-8
    for step in range(1, 4):
        rows = torch.randperm(n, generator=gen)[: n // 2]  # unique, unsorted
        g = torch.randn(rows.numel(), *trailing, generator=gen)
        counts[rows] += 1
        t = counts[rows] if per_row else step
        before = (p.cpu().clone(), m.cpu().clone(), v.cpu().clone())
        adam_rows_(p_ref, rows, g, m_ref, v_ref, t, lr, betas, eps, impl="reference")
        step_size, bc2 = _bias_corrections(t, lr, *betas)
        if per_row:
            step_size, bc2 = step_size.to(dev), bc2.to(dev)
        kernels.fused_adam_rows(p, rows.to(dev), g.to(dev), m, v, step_size, bc2, *betas, eps)
        torch.testing.assert_close(m.cpu(), m_ref, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(v.cpu(), v_ref, atol=1e-9, rtol=1e-6)
        torch.testing.assert_close(p.cpu(), p_ref, **({"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {}))
        p_ref.copy_(p.cpu())  # bf16: a 1-ulp rounding flip must not carry into the next step's comparison
        other = torch.ones(n, dtype=torch.bool)
        other[rows] = False
        for after, old in zip((p, m, v), before):
            assert torch.equal(after.cpu()[other], old[other])  # untouched rows: bitwise unchanged
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    kernels.fused_adam_rows(p, empty, torch.zeros(0, *trailing, device=dev), m, v, 1e-2, 1.0, *betas, eps)  # U = 0


@needs_cuda
@pytest.mark.parametrize("per_row_step", [False, True])
def test_cuda_row_sparse_adam_dispatch(per_row_step):
    """RowSparseAdam on a CUDA table takes the fused kernel (impl="auto") and matches the CPU reference step."""
    from memlm.model.memory.sparse_update import RowSparseAdam

    gen = torch.Generator().manual_seed(7)
    n, d = 4096, 512
    init = torch.randn(n, d, generator=gen)
    params = {dev: torch.nn.Parameter(init.clone().to(dev)) for dev in ("cpu", "cuda")}
    opts = {dev: RowSparseAdam([p], lr=1e-2, per_row_step=per_row_step) for dev, p in params.items()}
    for _ in range(3):
        rows = torch.randperm(n, generator=gen)[:1000].sort().values
        vals = torch.randn(1000, d, generator=gen)
        for dev, p in params.items():
            p.grad = torch.sparse_coo_tensor(rows[None], vals, (n, d)).coalesce().to(dev)
            opts[dev].step()
    torch.testing.assert_close(params["cuda"].detach().cpu(), params["cpu"].detach(), atol=1e-6, rtol=1e-5)
    st = {dev: opts[dev].state[p] for dev, p in params.items()}
    torch.testing.assert_close(st["cuda"]["exp_avg_sq"].cpu(), st["cpu"]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
