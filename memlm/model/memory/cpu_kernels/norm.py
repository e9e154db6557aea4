"""RMS norm on CPU: one kernel pass forward, one backward (the query net's RMSNorm, Memory+'s qk-norm)."""

from __future__ import annotations

import math

import torch

from memlm.model.memory.cpu_kernels._base import _np, _threads, numba

if numba is not None:
    from numba import njit, prange

    # Every scalar the kernels mix with x comes in x's dtype (``consts``: scale, eps, 1 / D, 1): a Python float or an
    # int divisor would promote each float32 element to float64 and keep the loops scalar (numpy's rules); float32
    # sums are also what PyTorch's CPU rms_norm accumulates in.

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _rms_norm_fwd_kernel(x, gain, consts, y, rinv):
        """Rows of x (R, D): rinv[r] = 1 / sqrt(mean(x^2) + eps); y = x * rinv * gain * scale (gain: (D,) or (0,))."""
        rows, d = x.shape
        scale, eps, inv_d, one = consts[0], consts[1], consts[2], consts[3]
        has_gain = gain.shape[0] > 0
        for r in prange(rows):
            xr = x[r]
            sq = one - one
            for j in range(d):
                sq += xr[j] * xr[j]
            inv = one / math.sqrt(sq * inv_d + eps)
            rinv[r] = inv
            f = inv * scale
            yr = y[r]
            if has_gain:
                for j in range(d):
                    yr[j] = xr[j] * f * gain[j]
            else:
                for j in range(d):
                    yr[j] = xr[j] * f

    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _rms_norm_bwd_kernel(x, rinv, gain, consts, gy, gx, ggain_parts, chunk):
        """gx = rinv (g - xhat mean(g xhat)) with xhat = x rinv, g = gy * gain * scale; the gain's gradient
        sum_r gy xhat scale, summed per chunk of rows into ggain_parts (chunks, D)."""
        rows, d = x.shape
        scale, inv_d, one = consts[0], consts[2], consts[3]
        has_gain = gain.shape[0] > 0
        for c in prange((rows + chunk - 1) // chunk):
            part = ggain_parts[c]
            for r in range(c * chunk, min(rows, (c + 1) * chunk)):
                xr, gyr, gxr = x[r], gy[r], gx[r]
                inv = rinv[r]
                dot = one - one
                for j in range(d):
                    gj = gyr[j] * scale * (gain[j] if has_gain else one)
                    dot += gj * xr[j] * inv
                dot = dot * inv_d
                for j in range(d):
                    xh = xr[j] * inv
                    gj = gyr[j] * scale * (gain[j] if has_gain else one)
                    gxr[j] = inv * (gj - xh * dot)
                    if has_gain:
                        part[j] += gyr[j] * xh * scale


def _consts(x: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """The kernels' scalars in x's dtype: (scale, eps, 1 / D, 1)."""
    return torch.tensor([scale, eps, 1.0 / x.shape[-1], 1.0], dtype=x.dtype)


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) * gain * scale over the last dim: one kernel pass forward, one backward (PyTorch's CPU
    rms_norm differentiates through ~10 elementwise ops)."""

    @staticmethod
    def forward(ctx, x, gain, scale: float, eps: float):  # noqa: D102
        d = x.shape[-1]
        x2 = x.detach().reshape(-1, d).contiguous()
        g = gain.detach().contiguous() if gain is not None else x2.new_empty(0)
        y = torch.empty_like(x2)
        rinv = x2.new_empty(x2.shape[0])
        consts = _consts(x2, scale, eps)  # kept alive while the kernel reads its view
        _threads()
        _rms_norm_fwd_kernel(_np(x2), _np(g), _np(consts), _np(y), _np(rinv))
        ctx.save_for_backward(x2, rinv, g)
        ctx.scale, ctx.eps, ctx.has_gain, ctx.shape = scale, eps, gain is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # noqa: D102
        x2, rinv, g = ctx.saved_tensors
        gy2 = gy.reshape(x2.shape).to(x2.dtype).contiguous()
        gx = torch.empty_like(x2)
        chunk = 256
        parts = x2.new_zeros((x2.shape[0] + chunk - 1) // chunk if ctx.has_gain else 0, x2.shape[1])
        consts = _consts(x2, ctx.scale, ctx.eps)
        _threads()
        _rms_norm_bwd_kernel(_np(x2), _np(rinv), _np(g), _np(consts), _np(gy2), _np(gx), _np(parts), chunk)
        ggain = parts.sum(0) if ctx.has_gain and ctx.needs_input_grad[1] else None
        return gx.view(ctx.shape), ggain, None, None


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None = None, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """``F.rms_norm(x, (D,), gain, eps) * scale`` over the last dim, differentiable, as two kernel passes (CPU
    float32/float64 tensors, see :func:`available`)."""
    return _RMSNorm.apply(x, gain, float(scale), float(eps))
