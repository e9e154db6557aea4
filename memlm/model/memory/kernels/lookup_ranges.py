"""Experimental table-gradient pass of the lookup backward: segment ranges with a segmented scan (``CONFIG["bwd_kernel"]
= "ranges"``; the default "rows" pass is in :mod:`.lookup`).

The default pass runs one program per (table row, column tile) and walks the row's occurrences one dependent load
after another (offsets -> position -> grad_out row): with ~2 reads per row it is latency-bound (~2x its bandwidth
floor on H100). Here one program takes R consecutive segments (rows) and loads the grad_out rows of P of their
occurrences at once, so P loads are in flight instead of one; a segmented inclusive scan (``tl.associative_scan``
over (value, segment-start flag)) sums each segment's occurrences in their sorted order, and each segment's last
position writes the sum. A segment that continues into the next chunk of P carries its partial sum over.
Deterministic (fixed order), but it sums in a different order than the "rows" pass (bits may differ in the last place).

Rows read more than ``bwd_cap`` times are left to the chunked pass of :mod:`.lookup` as before: their occurrences are
compacted out first (on the device, no host sync), so a hot row never serializes a program here.

Not yet measured on a GPU: ``eval/tune_kernels.py`` sweeps ``bwd_kernel`` with the other launch settings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _seg_add(a_v, a_f, b_v, b_f):
    """Combine of a segmented sum: restart at a segment start flag."""
    return tl.where(b_f, b_v, a_v + b_v), a_f | b_f


@triton.jit
def _bwd_ranges_kernel(
    table_ptr, gout_ptr, w_ptr, lperm_ptr, lseg_ptr, loff_ptr, seg_off_ptr, seg_row_ptr, out_ptr, gw_ptr,
    S, K, D, L, stride_t,
    ROW_IS_SEG: tl.constexpr, NEED_GW: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per R segments and column tile: zero-fill the untouched ones, then scan their light occurrences
    (``lperm``/``lseg``: compacted positions and their segment ids, ``loff``: per-segment offsets into them)."""
    s0 = tl.program_id(0) * R
    pd = tl.program_id(1)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    cmask = cols < D
    segs = s0 + tl.arange(0, R)  # (R,)
    smask = segs < S
    total = tl.load(seg_off_ptr + segs + 1, mask=smask, other=0) - tl.load(seg_off_ptr + segs, mask=smask, other=0)
    untouched = smask & (total == 0)  # (R,) zero gradient rows (dense mode); heavy rows: the chunked pass
    zero = tl.zeros([R, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + segs.to(tl.int64)[:, None] * D + cols[None, :], zero, mask=untouched[:, None] & cmask[None, :])
    start = tl.load(loff_ptr + s0)
    end = tl.load(loff_ptr + tl.minimum(s0 + R, S))
    ar = tl.arange(0, P)  # (P,)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)  # partial sum of a segment running into the next chunk
    carry_seg = tl.zeros([], dtype=tl.int32) - 1  # a typed scalar: it is loop-carried
    for j0 in range(start, end, P):
        js = j0 + ar  # (P,) compacted positions
        jmask = js < end
        pos = tl.load(lperm_ptr + js, mask=jmask, other=0).to(tl.int64)  # flat bag * K + k
        seg = tl.load(lseg_ptr + js, mask=jmask, other=-1).to(tl.int32)  # (P,) segment of each position
        prev = tl.load(lseg_ptr + js - 1, mask=jmask & (ar > 0), other=-1).to(tl.int32)
        nxt = tl.load(lseg_ptr + js + 1, mask=jmask & (js + 1 < end), other=-2).to(tl.int32)
        bag = pos // K
        m2 = jmask[:, None] & cmask[None, :]
        g = tl.load(gout_ptr + bag[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)  # (P, BLOCK_D)
        wj = tl.load(w_ptr + pos, mask=jmask, other=0.0).to(tl.float32)  # (P,)
        c = g * wj[:, None]
        c += tl.where(((ar == 0) & (seg == carry_seg))[:, None], carry[None, :], 0.0)  # the carried-in partial
        flag = (seg != prev)[:, None] & m2  # a segment starts here (every chunk starts one)
        v, _ = tl.associative_scan((c, flag), 0, _seg_add)  # (P, BLOCK_D) running sums within segments
        last = jmask & (seg != nxt)  # (P,) a segment ends here
        tl.store(out_ptr + seg.to(tl.int64)[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=last[:, None] & cmask[None, :])  # fmt: skip
        tail = (ar == P - 1) & jmask & ~last  # (P,) the chunk's last segment goes on in the next chunk
        carry = tl.sum(tl.where(tail[:, None], v, 0.0), axis=0)
        carry_seg = tl.max(tl.where(tail, seg, -1), axis=0)
        if NEED_GW:
            if ROW_IS_SEG:
                row = seg.to(tl.int64)
            else:
                row = tl.load(seg_row_ptr + seg, mask=jmask, other=0).to(tl.int64)
            trow = tl.load(table_ptr + row[:, None] * stride_t + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(gw_ptr + pd.to(tl.int64) * L + pos, tl.sum(g * trow, axis=1), mask=jmask)


def light_positions(
    perm: torch.Tensor, pos_seg: torch.Tensor, seg_off: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact the sorted positions of segments with at most ``cap`` occurrences, in order, on the device (no host
    sync): (positions (L+1,), their segment ids (L+1,), per-segment offsets into them (S+1,)); slot L is a dump."""
    big_l = perm.numel()
    counts = seg_off[1:] - seg_off[:-1]  # (S,)
    light = counts <= cap
    loff = torch.zeros_like(seg_off)  # (S+1,)
    torch.cumsum(torch.where(light, counts, 0), 0, out=loff[1:])
    seg = pos_seg.long()  # (L,)
    dest = loff[seg] + (torch.arange(big_l, device=perm.device) - seg_off[seg])  # (L,) rank among light positions
    dest = torch.where(light[seg], dest, big_l)  # heavy rows' positions all go to the dump slot
    lperm = torch.empty(big_l + 1, device=perm.device, dtype=perm.dtype).scatter_(0, dest, perm)
    lseg = torch.empty(big_l + 1, device=perm.device, dtype=torch.int32).scatter_(0, dest, pos_seg.to(torch.int32))
    return lperm, lseg, loff


def table_grad_ranges(table, go, w, perm, pos_seg, seg_rows, seg_off, gtab, gw_part, k, big_l, dense, need_weights,
                      block_d, config) -> None:  # fmt: skip
    """The light segments' table gradient (and their weight gradients) into ``gtab`` / ``gw_part``; zero rows for
    untouched segments. Heavy segments (> ``config["bwd_cap"]`` occurrences) are left to the chunked pass."""
    lperm, lseg, loff = light_positions(perm, pos_seg, seg_off, config["bwd_cap"])
    n_seg, d = gtab.shape
    r = config["range_rows"]
    _bwd_ranges_kernel[(triton.cdiv(n_seg, r), triton.cdiv(d, block_d))](
        table, go, w, lperm, lseg, loff, seg_off, seg_rows, gtab, gw_part, n_seg, k, d, big_l, table.stride(0),
        ROW_IS_SEG=dense, NEED_GW=need_weights, R=r, P=config["range_block_p"], BLOCK_D=block_d,
        num_warps=config["range_warps"],
    )  # fmt: skip
