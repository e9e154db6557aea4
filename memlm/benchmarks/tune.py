"""Sweep the launch settings of the Triton kernels (``kernels.{lookup,topk,adam_rows}.CONFIG``) on this GPU.

For each setting: check the result against the current defaults (bitwise for the value lookup: every setting sums in
the same order; exact for the top-k), then time it. Prints one table per kernel with the fastest setting first;
the lookup and top-k defaults were chosen with this script on one H100 (the row-sparse Adam defaults are untuned).
Needs CUDA and Triton.

    python eval/tune_kernels.py                      # reference sizes: 1M x 1024 bf16 table, 16k tokens x 4 x 32
    python eval/tune_kernels.py --tokens 4096 --out runs/tune.json
    python eval/tune_kernels.py --speed "--out runs/speed.json"   # then eval/speed.py with the fastest settings
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import torch

from memlm.utils.cli import HelpFormatter


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sweep(
    config: dict,
    settings: list[dict],
    run: Callable[[], object],
    same: Callable[[object, object], bool],
    check: Callable[[], object] | None = None,
):
    """Time ``run`` under every setting (each patched into ``config``); rows sorted by time. Each setting's result
    (of ``check``, default ``run``) is compared with the defaults' by ``same``."""
    check = check or run
    defaults = dict(config)
    ref = check()
    rows = []
    for setting in settings:
        config.update(setting)
        try:
            ok = same(check(), ref)
            ms = _bench(run)
        except Exception as e:  # a setting the compiler rejects (e.g. out of shared memory) is reported, not fatal
            ok, ms = f"error: {type(e).__name__}", float("nan")
        finally:
            config.clear()
            config.update(defaults)
        rows.append(dict(setting=setting, ms=ms, matches_default=ok))
    return sorted(rows, key=lambda r: (r["ms"] != r["ms"], r["ms"]))


def _grid(**axes: list) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _print(title: str, rows: list[dict], defaults: dict) -> None:
    print(f"\n{title}")
    for r in rows:
        mark = "  <- default" if all(defaults[k] == v for k, v in r["setting"].items()) else ""
        print(f"  {r['ms']:8.3f} ms  matches default: {r['matches_default']!s:5}  {r['setting']}{mark}")


def tune_lookup(args: argparse.Namespace) -> dict:
    from memlm.model.memory.kernels import lookup

    torch.manual_seed(0)
    n, d, m, kk = args.rows, args.dim, args.tokens, args.heads * args.knn
    table = (torch.randn(n, d, device="cuda") * d**-0.5).to(torch.bfloat16)  # (N, D)
    idx = torch.randint(0, n, (m, kk), device="cuda")  # (T, H*K)
    w = torch.softmax(torch.randn(m, kk, device="cuda"), dim=-1)  # (T, H*K)
    gout = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)  # (T, D)
    out = {}
    for mode in ("dense", "sparse"):
        settings = _grid(bwd_kernel=["rows"], bwd_block_d=[256, 512, 1024], bwd_warps=[1, 2, 4], bwd_block_j=[1, 2, 4])
        settings += _grid(bwd_kernel=["ranges"], bwd_block_d=[256, 512], range_rows=[4, 8, 16],
                          range_block_p=[8, 16, 32], range_warps=[2, 4, 8])  # fmt: skip

        def run(mode=mode):
            return lookup.lookup_backward(table, idx, w, gout, mode=mode)

        def same(a, b):  # warps / the pass change the reduction trees and orders: equal up to rounding
            return all(
                (x is None and y is None) or torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-3)
                for x, y in zip(a, b)
            )

        rows = _sweep(lookup.CONFIG, settings, run, same)
        _print(f"lookup backward ({mode} grad), {n} x {d} bf16, {m} bags x {kk}", rows, lookup.CONFIG)
        out[mode] = rows
    return out


def tune_topk(args: argparse.Namespace) -> dict:
    from memlm.model.memory.kernels import topk

    torch.manual_seed(0)
    n, m, h, knn = args.n_keys, args.tokens, args.heads, args.knn
    out = {}
    for dtype in (torch.bfloat16,):  # what the training step sees under bf16 autocast
        s = torch.randn(h, 2, m, n, device="cuda").to(dtype).permute(2, 0, 1, 3)  # (T, H, 2, N), bmm output layout
        rows = _sweep(
            topk.CONFIG,
            _grid(fwd_rows=[1, 2, 4], fwd_warps=[1, 2, 4, 8]),
            lambda s=s: topk.topk_forward(s, knn),
            lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]),
        )
        _print(f"top-k forward, {dtype}, {m} x {h} rows, n_keys {n}, top-{knn}", rows, topk.CONFIG)
        out[f"fwd_{dtype}"] = rows
    s = torch.randn(h, 2, m, n, device="cuda").to(torch.bfloat16).permute(2, 0, 1, 3)
    _, idx = topk.topk_forward(s, knn)
    g = torch.randn(m, h, knn, device="cuda")
    rows = _sweep(
        topk.CONFIG,
        _grid(bwd_rows=[1, 2, 4, 8], bwd_warps=[1, 2, 4]),
        lambda: topk.topk_backward(g, idx, s),
        torch.equal,
    )
    _print(f"top-k backward, bf16 scores, {m} x {h} rows, n_keys {n}", rows, topk.CONFIG)
    out["bwd"] = rows
    return out


def tune_adam(args: argparse.Namespace) -> dict:
    from memlm.model.memory import kernels
    from memlm.model.memory.kernels import adam_rows

    torch.manual_seed(0)
    n, d = args.rows, args.dim
    u = int(0.9 * n)  # nearly every row touched: the worst case for the lazy step
    p0 = torch.randn(n, d, device="cuda")  # (N, D) fp32 table
    rows = torch.randperm(n, device="cuda")[:u].sort().values  # (U,)
    g = torch.randn(u, d, device="cuda")  # (U, D)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)

    def run():  # timed: steps the same state again and again
        kernels.fused_adam_rows(p, rows, g, m, v, 1e-3, 0.5, 0.9, 0.999, 1e-8)

    def check():  # one step from a fixed state, on copies
        pc, mc, vc = p0.clone(), torch.zeros_like(p0), torch.ones_like(p0)
        kernels.fused_adam_rows(pc, rows, g, mc, vc, 1e-3, 0.5, 0.9, 0.999, 1e-8)
        return pc, mc, vc

    rows_out = _sweep(
        adam_rows.CONFIG,
        _grid(tile_elems=[1024, 2048, 4096], block_d=[256, 512, 1024], warps=[2, 4, 8]),
        run,
        lambda a, b: all(torch.allclose(x, y, rtol=1e-6, atol=0) for x, y in zip(a, b)),
        check,
    )
    _print(f"row-sparse Adam step, {u} of {n} rows x {d} fp32", rows_out, adam_rows.CONFIG)
    return dict(step=rows_out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="eval/tune_kernels.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--kernels", default="topk,lookup,adam", help="comma-separated subset of topk,lookup,adam")
    p.add_argument("--rows", type=int, default=2**20, help="value-table rows")
    p.add_argument("--dim", type=int, default=1024, help="value dim")
    p.add_argument("--n_keys", type=int, default=1024, help="sub-keys per half")
    p.add_argument("--tokens", type=int, default=16384, help="query tokens per call")
    p.add_argument("--heads", type=int, default=4, help="memory heads per token")
    p.add_argument("--knn", type=int, default=32, help="slots read per head")
    p.add_argument("--out", type=Path, default=None, help="write all rows as JSON here")
    p.add_argument("--speed", default=None, help="then run eval/speed.py with these arguments, in this process, "
                   "with the fastest settings that match the defaults' results applied")  # fmt: skip
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the kernels are tuned where they run)")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    res = {}
    for name in args.kernels.split(","):
        res[name] = {"topk": tune_topk, "lookup": tune_lookup, "adam": tune_adam}[name.strip()](args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))
    if args.speed is not None:
        apply_fastest(res)
        from memlm.benchmarks.cli import main as speed_main

        speed_main(shlex.split(args.speed))
    return res


def apply_fastest(res: dict) -> None:
    """Patch the kernels' CONFIG with the fastest correct setting of each sweep (dense lookup grad, bf16 top-k,
    row-sparse Adam)."""
    from memlm.model.memory.kernels import adam_rows, lookup, topk

    picks = [(lookup.CONFIG, res.get("lookup", {}).get("dense")), (adam_rows.CONFIG, res.get("adam", {}).get("step"))]
    picks += [(topk.CONFIG, res.get("topk", {}).get(key)) for key in ("fwd_torch.bfloat16", "bwd")]
    for config, rows in picks:
        good = [r for r in rows or [] if r["matches_default"] is True]
        if good:
            config.update(good[0]["setting"])
    print(f"\napplied: lookup {lookup.CONFIG}\n         topk {topk.CONFIG}\n         adam {adam_rows.CONFIG}")
