"""Triton kernel for the lazy (row-sparse) Adam step on value tables: gather, update and scatter in ONE pass.

``param[rows]``, ``exp_avg[rows]``, ``exp_avg_sq[rows]`` are read once, updated with ``grad_rows`` and written back
in place; no (U, D) temporaries. Per fp32 element that is 4 reads + 3 writes (28 bytes), against ~76 bytes for
index_select + torch's fused Adam + index_copy_ (gather 6, update 7, scatter 6 tensor-sized reads or writes)
and ~120 for the formula op by op: the table's optimizer step at about the bandwidth floor instead of several times.

The math is ``torch.optim.Adam``'s (no weight decay, no amsgrad) in fp32: ``m += (1-b1)(g-m)``,
``v = b2 v + (1-b2) g^2``, ``p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)``, with the bias corrections either global
(scalars) or per row (``(U,)`` tensors). Rows must be unique (each row is written by exactly one program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adam_rows_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, rows_ptr, step_size_ptr, bc2_sqrt_ptr,
    U, D, stride_p, stride_g, stride_s,
    step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
    PER_ROW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (BLOCK_R touched rows, BLOCK_D columns)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) positions in rows / grad_rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    rmask = r < U
    mask = rmask[:, None] & (cols < D)[None, :]
    row = tl.load(rows_ptr + r, mask=rmask, other=0).to(tl.int64)  # (BLOCK_R,) table rows
    g = tl.load(g_ptr + r.to(tl.int64)[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s_off = row[:, None] * stride_s + cols[None, :]  # (BLOCK_R, BLOCK_D) into the fp32 moments
    p_off = row[:, None] * stride_p + cols[None, :]
    m = tl.load(m_ptr + s_off, mask=mask, other=0.0)
    v = tl.load(v_ptr + s_off, mask=mask, other=0.0)
    p = tl.load(p_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
    # 1 - beta comes from the host: 1 - fp32(0.999) would differ from torch's fp32(1 - 0.999) by 1.3e-5 relative
    m = m + one_minus_beta1 * (g - m)  # torch.lerp's formula for weight < 0.5
    v = v * beta2 + one_minus_beta2 * g * g
    if PER_ROW:
        lr_t = tl.load(step_size_ptr + r, mask=rmask, other=0.0)[:, None]  # (BLOCK_R, 1) lr / bc1 of each row
        bc2 = tl.load(bc2_sqrt_ptr + r, mask=rmask, other=1.0)[:, None]
    else:
        lr_t = step_size
        bc2 = bc2_sqrt
    p = p - lr_t * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2) + eps)  # IEEE-rounded, as torch (not approximate)
    tl.store(m_ptr + s_off, m, mask=mask)
    tl.store(v_ptr + s_off, v, mask=mask)
    tl.store(p_ptr + p_off, p.to(p_ptr.dtype.element_ty), mask=mask)


# tile of one program: ~2k elements x 7 streams keeps registers low with 4 warps (a streaming kernel: not tuned)
CONFIG = dict(tile_elems=2048, block_d=512, warps=4)


def adam_rows(
    param: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_size: float | torch.Tensor,
    bc2_sqrt: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In-place lazy Adam step on ``param[rows]`` (2-D (N, D) tables, rows unique).

    ``step_size`` = lr / (1 - beta1^t) and ``bc2_sqrt`` = sqrt(1 - beta2^t): Python floats (global step) or (U,)
    fp32 tensors (per-row step counts).
    """
    if param.dim() != 2 or param.stride(1) != 1:
        raise ValueError(f"adam_rows: param must be a row-major 2-D table, got shape {tuple(param.shape)}")
    for name, st in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if st.dtype != torch.float32 or st.shape != param.shape or st.stride() != exp_avg.stride() or st.stride(1) != 1:
            raise ValueError(f"adam_rows: {name} must be a row-major fp32 tensor shaped like the parameter")
    u, d = grad_rows.shape
    if u == 0:
        return
    if rows.shape != (u,):
        raise ValueError(f"adam_rows: rows must be ({u},), got {tuple(rows.shape)}")
    grad_rows = grad_rows if grad_rows.stride(1) == 1 else grad_rows.contiguous()
    rows = rows.contiguous()
    per_row = isinstance(step_size, torch.Tensor)
    if per_row:
        ss_t, bc_t = step_size.float().contiguous(), bc2_sqrt.float().contiguous()  # (U,), (U,)
        ss, bc = 0.0, 1.0
    else:
        ss_t = bc_t = rows  # placeholder pointers (not read)
        ss, bc = float(step_size), float(bc2_sqrt)
    bd = min(triton.next_power_of_2(d), CONFIG["block_d"])
    br = max(1, CONFIG["tile_elems"] // bd)
    grid = (triton.cdiv(u, br), triton.cdiv(d, bd))
    _adam_rows_kernel[grid](
        param, grad_rows, exp_avg, exp_avg_sq, rows, ss_t, bc_t,
        u, d, param.stride(0), grad_rows.stride(0), exp_avg.stride(0),
        ss, bc, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        PER_ROW=per_row, BLOCK_R=br, BLOCK_D=bd, num_warps=CONFIG["warps"],
    )  # fmt: skip
