"""Lazy Adam on the touched rows of an fp32 table, in place, on CPU."""

from __future__ import annotations

import math

import torch

from memlm.model.memory.cpu_kernels._base import PREFETCH_AHEAD, _np, _threads, numba

if numba is not None:
    import numpy as np
    from numba import njit, prange

    from memlm.model.memory.cpu_kernels._base import prefetch_row

    @njit(parallel=True, cache=True)
    def _adam_rows_kernel(param, exp_avg, exp_avg_sq, rows, grad, step_size, bc2_sqrt, beta2, omb1, omb2, eps, ahead):
        """Lazy Adam on param[rows] (fp32, rows unique); step_size / bc2_sqrt (U,) per row (a global step repeats
        one value). torch.optim.Adam's formula, to a few ulps: m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2;
        p -= step_size (m / (sqrt(v) / bc2_sqrt + eps)). The three tables' rows ``ahead`` rows on are prefetched."""
        d = grad.shape[1]
        u_count = rows.shape[0]
        for i in prange(u_count):
            if ahead > 0 and i + ahead < u_count:
                nxt = rows[i + ahead]
                prefetch_row(param, nxt)
                prefetch_row(exp_avg, nxt)
                prefetch_row(exp_avg_sq, nxt)
            r = rows[i]
            p, m, v, g = param[r], exp_avg[r], exp_avg_sq[r], grad[i]
            lr, bc = step_size[i], bc2_sqrt[i]
            for j in range(d):
                gj = g[j]
                mj = m[j] + omb1 * (gj - m[j])
                vj = v[j] * beta2 + omb2 * gj * gj  # addcmul's (value * g) * g
                m[j] = mj
                v[j] = vj
                p[j] = p[j] - lr * mj / (math.sqrt(vj) / bc + eps)  # addcdiv's (value * m) / denom


def adam_rows_(param, rows, grad_rows, exp_avg, exp_avg_sq, step_size, bc2_sqrt, beta1, beta2, eps) -> None:
    """Lazy Adam on the (U,) unique ``rows`` of contiguous fp32 ``param`` / moments, in place. ``step_size`` and
    ``bc2_sqrt`` are Adam's lr / bias_correction1 and sqrt(bias_correction2): floats (one global step) or (U,)
    tensors (per-row steps)."""
    u = rows.numel()
    if u == 0:
        return
    d = param[0].numel()

    def per_row(v):  # a numpy array that owns its memory
        if isinstance(v, torch.Tensor) and v.numel() == u and v.dim() > 0:
            return v.detach().to(torch.float32).reshape(u).numpy().copy()
        return np.full(u, float(v), dtype=np.float32)  # a float, or a one-element tensor (e.g. a tensor lr)

    g = grad_rows.detach().to(torch.float32).reshape(u, d).contiguous()
    p, m, v, r = param.detach().view(-1, d), exp_avg.view(-1, d), exp_avg_sq.view(-1, d), rows.contiguous()
    _threads()
    _adam_rows_kernel(_np(p), _np(m), _np(v), _np(r), _np(g), per_row(step_size), per_row(bc2_sqrt), np.float32(beta2),
                      np.float32(1 - beta1), np.float32(1 - beta2), np.float32(eps), PREFETCH_AHEAD)  # fmt: skip
    for t in (param, exp_avg, exp_avg_sq):  # written through raw pointers: tell autograd, as an in-place op would
        torch.autograd.graph.increment_version(t)
