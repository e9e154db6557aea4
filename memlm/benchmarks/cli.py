"""Speed benchmarks of the memory layers, the command line behind ``eval/speed.py``: a table per section + JSON.

Sections (``--sections a,b,c,d,e,f``):
  a  value lookup forward+backward vs. the bandwidth floor (bytes that must move / device copy bandwidth measured in
     the same run) and vs. stock PyTorch (fp32 F.embedding_bag; the bf16 gather fallback, since PyTorch has no bf16
     CUDA backward for embedding_bag with per-sample weights).
  b  training tokens/s (forward + backward + clipping + optimizer step, bf16 autocast on GPU) of Memory+
     (configs/model/small_memory_plus.yaml) vs. its equal-FLOP dense baseline (``memlm.model.dense_matched_config``),
     with dense AdamW and with row-sparse value updates.
  c  full training-step time as the slot count grows 16x at fixed width: dense AdamW vs. row-sparse value updates.
  d  product-key retrieval time vs. slot count (should grow like sqrt(N): two n_keys-row sub-key tables).
  e  one Memory+ layer forward+backward at the PAPERS.md reference size (d=1024, 16k tokens, 1M slots, 4 x 32)
     vs. a dense 4x FFN: time and peak memory ratios.
  f  the value table's optimizer step (``--model_config``'s table): dense fused Adam vs. the row-sparse Adam
     implementations (op by op, torch fused, Triton one-pass) vs. the bandwidth floor of the touched rows.
  g  (CPU, opt-in: not in the default list) the CPU targets at 1 and 2 threads: memlm's layers vs the PyPI PKM / PEER /
     UltraMem packages (``pip install -e ".[peers]"``; timed alone without them), the value-table optimizer step vs
     dense fused Adam, tiny-model training tokens/s at 262k slots vs the equal-FLOP dense twin.

Usage:
    python eval/speed.py --out runs/speed.json                            # all sections, GPU reference sizes
    python eval/speed.py --sections b,c --out runs/speed.json
    python eval/speed.py --device cpu --quick                             # tiny CPU smoke run (< 1 min)
    python eval/speed.py --device cpu --sections g --out runs/g.json      # the CPU targets (~3 min, 2 cores)

Each section is a function ``(args, device, bandwidth) -> dict`` in ``memlm.benchmarks`` (registered in
``memlm.benchmarks.SECTIONS``); it prints its own table and returns JSON-able rows.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from memlm.benchmarks import SECTIONS
from memlm.benchmarks.timing import copy_bandwidth
from memlm.utils.cli import HelpFormatter
from memlm.utils.malloc import keep_freed_memory_in_heap

ROOT = Path(__file__).resolve().parents[2]


def quick_cpu_threads(args: argparse.Namespace) -> bool:
    """--threads (default 1 with --quick on CPU: tiny ops gain nothing from threads, and a busy machine's thread
    oversubscription otherwise inflates the timings up to 100x)."""
    if args.threads is None and args.quick:
        args.threads = 1
    return args.threads is not None


def main(argv: list[str] | None = None) -> dict:
    keep_freed_memory_in_heap()  # as train.py does: CPU timings of (b)-(f) match training
    p = argparse.ArgumentParser(
        prog="eval/speed.py",
        description="Speed benchmarks of the memory layers: one table per section (a-f), optionally JSON.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--sections",
        default="a,b,c,d,e,f",
        help="comma-separated subset of " + ",".join(SECTIONS) + " (g: CPU targets, opt-in)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument(
        "--rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="table sizes for (a), comma-separated (default 65536,262144,1048576)",
    )
    p.add_argument(
        "--dim", type=int, default=None, help="(a), (d), (e) model / value dim (default 1024; 64 with --quick)"
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="(a), (d), (e) tokens per call (default 16384; 256 with --quick)"
    )
    p.add_argument("--heads", type=int, default=4, help="memory heads per token")
    p.add_argument("--knn", type=int, default=32, help="slots read per head")
    p.add_argument("--model_config", type=Path, default=ROOT / "configs" / "model" / "small_memory_plus.yaml",
                   help="(b), (c), (f): the Memory+ model (its equal-FLOP dense twin is derived)")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="(b) sequences per step (default 32 x 512 tokens)")
    p.add_argument("--scaling_batch", type=int, default=None, help="(c) sequences per step (default 4 x 512 tokens)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --quick, else torch's)")
    p.add_argument("--profile", action="store_true", help="(a), (b), (e): print the top device kernels of each case")
    p.add_argument("--compile", action="store_true", help="(b): torch.compile both models (as train.compile does)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case (default 10; 7 with --quick)")
    p.add_argument("--rounds", type=int, default=3, help="(b) interleaved timing rounds per case (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3; 1 with --quick)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    if device.type == "cpu" and quick_cpu_threads(args):
        torch.set_num_threads(args.threads)
    quick = args.quick
    args.rows = args.rows or ([4096, 16384] if quick else [65536, 262144, 1048576])
    args.dim = args.dim or (64 if quick else 1024)
    args.tokens = args.tokens or (256 if quick else 16384)
    args.iters = args.iters or (7 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.batch = args.batch or (4 if quick else 32)
    args.scaling_batch = args.scaling_batch or (4 if quick else 4)

    bandwidth = copy_bandwidth(device, (64 if quick else 1024) * 2**20)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.3g} TB/s")
    out = dict(
        device=gpu, torch=torch.__version__, copy_bandwidth_Bps=bandwidth, args=vars(args) | {"out": None}, sections={}
    )
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    from memlm.model.memory import cpu_kernels

    # which CPU paths ran: the numba kernels, or the PyTorch paths (numba missing or MEMLM_CPU_KERNELS=0)
    out["cpu_kernels"] = cpu_kernels.available()
    out["numba"] = cpu_kernels.numba.__version__ if cpu_kernels.numba is not None else None
    print(f"CPU kernels (numba): {'on' if out['cpu_kernels'] else 'off'}")
    for s in sections:
        out["sections"][s] = SECTIONS[s](args, device, bandwidth)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"\nwrote {args.out}")
    return out
