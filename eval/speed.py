"""Speed benchmarks for memlm memory layers (issue 8): prints a table per section and writes JSON.

Sections (``--sections a,b,c,d,e``):
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

Usage:
    python eval/speed.py --out runs/speed.json                            # all sections, GPU reference sizes
    python eval/speed.py --sections b,c --out runs/speed.json
    python eval/speed.py --device cpu --quick                             # tiny CPU smoke run (< 1 min)

Each section is a function ``(args, device, bandwidth) -> dict`` registered in ``SECTIONS``; it prints its own table
and returns JSON-able rows.
"""

from __future__ import annotations

import os
import sys

# run as a script, eval/ is sys.path[0]: keep sibling scripts (e.g. eval/inspect.py) from shadowing stdlib modules
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from memlm.config import MemoryConfig, ModelConfig, OptimConfig  # noqa: E402
from memlm.model import MemLM, dense_matched_config, flops_per_token, param_counts  # noqa: E402
from memlm.model.memory import kernels  # noqa: E402
from memlm.model.memory.pkm import ProductKeyMemory  # noqa: E402
from memlm.model.memory.product_keys import ProductKeys  # noqa: E402
from memlm.training.module import build_optimizer, clip_grad_norm_sparse_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------------
# timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def throughput_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Mean time per call of ``iters`` back-to-back calls with one sync at the end: the host queues work ahead of the
    device, as in training, so launch overhead overlaps device work instead of adding to it."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s: (read + write) bytes of ``y.copy_(x)`` / time."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3)


def profile_kernels(fn: Callable[[], object], device: torch.device, label: str, top: int = 14) -> None:
    """Print the ``top`` device kernels of three calls of ``fn`` by total time (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {label} (3 calls)")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70))


def _maybe_oom(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _print_table(title: str, cols: list[str], rows: list[list[object]]) -> None:
    cells = [[c if isinstance(c, str) else ("-" if c is None else f"{c:.3g}") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(cols, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


# ----------------------------------------------------------------------------------------------------------------------
# (a) value lookup


def _lookup_bytes(n: int, d: int, m: int, k: int, u: int, elem: int) -> dict[str, int]:
    """Bytes that must move. fwd: gather L = M*K rows + write M outputs (+ indices int64, weights fp32).
    bwd: read grad_out, read each touched row once (weight grad), write the table gradient (N rows dense, U sparse),
    read indices/weights, write weight grads."""
    big_l = m * k
    fwd = big_l * d * elem + m * d * elem + big_l * 12
    bwd_common = m * d * elem + u * d * elem + big_l * 16
    return dict(fwd=fwd, bwd_dense=bwd_common + n * d * elem, bwd_sparse=bwd_common + u * (d * elem + 8))


def _fwd_bwd(f: Callable, tab: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        tab.grad = None
        weights.grad = None
        f(tab, weights).backward(grad)

    return run


def _lookup_case(args: argparse.Namespace, device: torch.device, bandwidth: float, n: int, use_triton: bool) -> dict:
    """Time every implementation for one table size; returns the JSON entry."""
    d, t, h, k = args.dim, args.tokens, args.heads, args.knn
    m, kk = t, h * k  # heads are summed (PKM / Memory+): one bag of H*K slots per token
    torch.manual_seed(0)
    table = (torch.randn(n, d, device=device) * d**-0.5).to(torch.bfloat16).requires_grad_()  # (N, D)
    idx = torch.randint(0, n, (m, kk), device=device)  # (T, H*K) uniform slots
    w = torch.softmax(torch.randn(m, h, k, device=device), dim=-1).view(m, kk).requires_grad_()  # (T, H*K) fp32
    gout = torch.randn(m, d, device=device, dtype=torch.bfloat16)  # (T, D)
    u = int(torch.unique(idx).numel())
    b16, b32 = _lookup_bytes(n, d, m, kk, u, 2), _lookup_bytes(n, d, m, kk, u, 4)
    f16 = {key: v / bandwidth * 1e3 for key, v in b16.items()}  # ms
    f32 = {key: v / bandwidth * 1e3 for key, v in b32.items()}
    entry: dict = dict(
        rows=n, dim=d, tokens=t, heads=h, knn=k, unique_rows=u, bytes_bf16=b16, bytes_fp32=b32,
        floor_ms=dict(fwd=f16["fwd"], fwd_bwd_dense=f16["fwd"] + f16["bwd_dense"],
                      fwd_bwd_sparse=f16["fwd"] + f16["bwd_sparse"], fp32_fwd=f32["fwd"],
                      fp32_fwd_bwd_dense=f32["fwd"] + f32["bwd_dense"]),
        # PAPERS.md's simpler floor: gather K rows per bag three times (fwd, weight grad, table-grad scatter)
        naive_floor_ms=dict(bf16=3 * m * kk * d * 2 / bandwidth * 1e3, fp32=3 * m * kk * d * 4 / bandwidth * 1e3),
        ms={},
    )  # fmt: skip
    ms = entry["ms"]
    it = dict(warmup=args.warmup, iters=args.iters)
    if use_triton:
        from memlm.model.memory.kernels import lookup

        with torch.no_grad():
            ms["triton_fwd"] = time_ms(lambda: lookup.lookup_forward(table, idx, w), device, **it)
        for name, kw in [("dense", {}), ("sparse", dict(sparse=True)), ("atomic", dict(deterministic=False))]:
            fn = _fwd_bwd(lambda tb, ww, kw=kw: lookup.value_lookup(tb, idx, ww, **kw), table, w, gout)
            ms[f"triton_fwd_bwd_{name}"] = _maybe_oom(lambda fn=fn: time_ms(fn, device, **it))
            if args.profile and name != "atomic" and n == max(args.rows):
                profile_kernels(fn, device, f"(a) Triton lookup fwd+bwd, {name} grad, {n} rows")
    # stock PyTorch, bf16: embedding_bag forward (no bf16 CUDA backward with per-sample weights) + the gather path
    with torch.no_grad():
        ms["torch_bf16_embbag_fwd"] = _maybe_oom(
            lambda: time_ms(
                lambda: F.embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum"), device, **it
            )
        )

    def gather(tb, ww):
        return (tb[idx] * ww.to(tb.dtype)[..., None]).sum(-2)  # (T, H*K, D) intermediate -> (T, D)

    ms["torch_bf16_gather_fwd_bwd"] = _maybe_oom(lambda: time_ms(_fwd_bwd(gather, table, w, gout), device, **it))
    table32 = table.detach().float().requires_grad_()  # (N, D) fp32
    g32 = gout.float()  # (T, D)
    if use_triton:
        fn = _fwd_bwd(lambda tb, ww: lookup.value_lookup(tb, idx, ww), table32, w, g32)
        ms["triton_fp32_fwd_bwd_dense"] = _maybe_oom(lambda: time_ms(fn, device, **it))
    for sparse in (False, True):

        def emb(tb, ww, sparse=sparse):
            return F.embedding_bag(idx, tb, per_sample_weights=ww, mode="sum", sparse=sparse)

        key = f"torch_fp32_embbag_fwd_bwd_{'sparse' if sparse else 'dense'}"
        ms[key] = _maybe_oom(lambda emb=emb: time_ms(_fwd_bwd(emb, table32, w, g32), device, **it))
    return entry


def section_lookup(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(a) value-lookup forward+backward: Triton kernels vs. bandwidth floor vs. stock PyTorch."""
    use_triton = device.type == "cuda" and kernels.available(torch.empty(1, device=device, dtype=torch.bfloat16))
    results = []
    for n in args.rows:
        results.append(_lookup_case(args, device, bandwidth, n, use_triton))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    lines = []  # one line per (rows, implementation)
    for e in results:
        fl, ms = e["floor_ms"], e["ms"]
        for name, val in ms.items():
            fp32 = "fp32" in name
            if "bwd" not in name:
                floor_ms, naive, base = fl["fwd"], None, None
            else:
                floor_ms = (
                    fl["fp32_fwd_bwd_dense"] if fp32 else fl["fwd_bwd_sparse" if "sparse" in name else "fwd_bwd_dense"]
                )
                naive = e["naive_floor_ms"]["fp32" if fp32 else "bf16"]
                base = ms.get("torch_fp32_embbag_fwd_bwd_dense" if fp32 else "torch_bf16_gather_fwd_bwd")
            lines.append([
                str(e["rows"]), name, val, floor_ms, None if val is None else val / floor_ms,
                None if val is None or naive is None else val / naive,
                None if val is None or base is None else base / val,
            ])  # fmt: skip
    _print_table(
        f"(a) value lookup, D={args.dim}, {args.tokens} tokens x {args.heads} heads x {args.knn} slots, bf16 table "
        f"(fp32 rows: fp32 table); copy bandwidth {bandwidth / 1e12:.3g} TB/s",
        ["rows", "implementation", "ms", "floor ms", "x floor", "x naive floor", "speedup vs stock"],
        lines,
    )
    print(
        "floor: bytes that must move / copy bandwidth (fwd: L gathered rows + outputs; bwd: grad_out, each touched "
        "row once, the table gradient); naive floor: 3 x L gathered rows (PAPERS.md); stock: bf16 gather fallback "
        "for bf16 rows, fp32 embedding_bag dense for fp32 rows"
    )
    return dict(results=results)


# ----------------------------------------------------------------------------------------------------------------------
# (b), (c) whole training steps


def _tiny_model_cfg() -> ModelConfig:
    """The --quick stand-in for small_memory_plus.yaml (CPU seconds)."""
    mem = MemoryConfig(kind="memory_plus", layers=[1], n_keys=16, heads=2, knn=4, k_dim=32)
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=2, max_seq_len=64, memory=mem)


def _memory_cfg(args: argparse.Namespace) -> ModelConfig:
    if args.quick:
        return _tiny_model_cfg()
    return ModelConfig.from_yaml(ROOT / "configs" / "model" / "small_memory_plus.yaml")


def _with_memory(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **kw))


class _TrainStep:
    """One full training step as the trainer runs it: forward, backward, separate dense / value clipping, optimizer
    step (``memlm.training.module.build_optimizer``: AdamW or AdamW + row-sparse values)."""

    def __init__(self, cfg: ModelConfig, value_optimizer: str, device: torch.device, batch: int, seq: int) -> None:
        sparse = value_optimizer == "row_sparse_adam" and cfg.memory is not None
        if sparse:
            cfg = _with_memory(cfg, sparse_grad=True)
        torch.manual_seed(0)
        with torch.device(device):  # allocate (1M-slot tables) directly on the device
            self.model = MemLM(cfg)
        self.optim_cfg = OptimConfig(value_lr=1e-3, value_optimizer=value_optimizer)
        self.opt = build_optimizer(self.model, self.optim_cfg, fused=device.type == "cuda")
        self.device = device
        g = torch.Generator(device="cpu").manual_seed(0)
        seqs = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)  # (B, T+1)
        self.x, self.y = seqs[:, :-1], seqs[:, 1:]  # (B, T)
        values = {id(p) for p in self.model.value_parameters()}
        self.dense = [p for p in self.model.parameters() if id(p) not in values]
        self.values = [p for p in self.model.parameters() if id(p) in values]

    def forward_backward(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            _, loss = self.model(self.x, self.y)
        loss.backward()

    def __call__(self) -> None:
        self.forward_backward()
        o = self.optim_cfg
        clip_grad_norm_sparse_([p for p in self.dense if p.grad is not None], o.grad_clip)
        if self.values:
            clip_grad_norm_sparse_([p for p in self.values if p.grad is not None], o.value_grad_clip)
        self.opt.step()

    def unique_rows(self) -> int:
        """Distinct value rows read in the last forward (what a row-sparse step touches)."""
        idx = [m.last_indices.flatten() for m in self.model.memory_layers]
        return int(torch.cat(idx).unique().numel()) if idx else 0

    def close(self) -> None:
        del self.model, self.opt, self.dense, self.values
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def section_tokens_per_s(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(b) training tokens/s of Memory+ vs. its equal-FLOP dense baseline."""
    mem_cfg = _memory_cfg(args)
    dense_cfg = dense_matched_config(mem_cfg)
    batch, seq = args.batch, mem_cfg.max_seq_len
    tokens = batch * seq
    info = {}
    for name, c in (("memory_plus", mem_cfg), ("dense", dense_cfg)):
        pc = param_counts(c)
        info[name] = dict(total_params=pc["total"], active_params=pc["active"], flops_per_token=flops_per_token(c))
    cases = [("dense", dense_cfg, "adamw"), ("memory_plus", mem_cfg, "adamw"),
             ("memory_plus", mem_cfg, "row_sparse_adam")]  # fmt: skip
    lines = []
    it = dict(warmup=args.warmup, iters=args.iters)
    steps = [_TrainStep(c, opt, device, batch, seq) for _, c, opt in cases]
    fb_ms, step_ms = [[] for _ in cases], [[] for _ in cases]
    for _ in range(args.rounds):  # cases interleaved round by round: slow drifts of the machine hit all of them
        for i, step in enumerate(steps):
            fb_ms[i].append(throughput_ms(step.forward_backward, device, **it))
            step_ms[i].append(throughput_ms(step, device, **it))
    rows = []
    for (name, _, opt), step, fb, ms in zip(cases, steps, fb_ms, step_ms):
        if args.profile:
            profile_kernels(step, device, f"(b) training step, {name}, {opt}")
        ms_med = statistics.median(ms)
        rows.append(dict(model=name, value_optimizer=opt, step_ms=ms_med, fwd_bwd_ms=statistics.median(fb),
                         tokens_per_s=tokens / ms_med * 1e3, step_ms_rounds=ms))  # fmt: skip
    for step in steps:
        step.close()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_dense"] = r["tokens_per_s"] / base
        fl = info[r["model"]]["flops_per_token"]
        lines.append([r["model"], r["value_optimizer"], r["fwd_bwd_ms"], r["step_ms"], r["tokens_per_s"], r["vs_dense"],
                      fl / 1e6, info[r["model"]]["total_params"] / 1e6])  # fmt: skip
    _print_table(
        f"(b) training tokens/s, {batch} x {seq} tokens per step, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; dense baseline = dense_matched_config "
        f"(ffn_hidden {dense_cfg.hidden_dim}, equal forward FLOPs/token)",
        ["model", "optimizer", "fwd+bwd ms", "step ms", "tokens/s", "x dense", "MFLOP/token", "params M"],
        lines,
    )
    return dict(batch=batch, seq_len=seq, configs=info, dense_ffn_hidden=dense_cfg.hidden_dim, results=rows)


def section_slot_scaling(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(c) full training-step time as slots grow 16x at fixed width: dense AdamW vs. row-sparse values."""
    base = _memory_cfg(args)
    n_keys = [64, 128, 256] if args.quick else [256, 512, 1024]  # 16x slots: 4096 -> 65k (quick), 65k -> 1M
    batch, seq = args.scaling_batch, base.max_seq_len
    rows = []
    it = dict(warmup=args.warmup, iters=args.iters)
    for n in n_keys:
        cfg = _with_memory(base, n_keys=n)
        for opt in ("adamw", "row_sparse_adam"):
            step = _TrainStep(cfg, opt, device, batch, seq)
            ms = throughput_ms(step, device, **it)
            rows.append(dict(slots=n * n, value_optimizer=opt, step_ms=ms, unique_rows=step.unique_rows()))
            step.close()
    first = {r["value_optimizer"]: r["step_ms"] for r in rows if r["slots"] == n_keys[0] ** 2}
    for r in rows:
        r["vs_smallest"] = r["step_ms"] / first[r["value_optimizer"]]
    _print_table(
        f"(c) training-step time vs. slots, dim {base.dim}, {base.n_layers} layers, memory in {base.memory.layers}, "
        f"{batch} x {seq} tokens ({batch * seq * len(base.memory.layers) * base.memory.heads * base.memory.knn} "
        "value reads) per step",
        ["slots", "value optimizer", "step ms", "x smallest", "rows read"],
        [[str(r["slots"]), r["value_optimizer"], r["step_ms"], r["vs_smallest"], str(r["unique_rows"])] for r in rows],
    )
    print("row-sparse work scales with the distinct rows read per step (<= min(slots, reads)); dense AdamW with slots")
    return dict(batch=batch, seq_len=seq, dim=base.dim, results=rows)


# ----------------------------------------------------------------------------------------------------------------------
# (d) retrieval


def section_retrieval(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(d) product-key top-k time vs. slot count (forward, and forward+backward into queries and keys), stock
    PyTorch top-k vs. the fused Triton top-k (CUDA)."""
    heads, knn = args.heads, args.knn
    k_dim = 32 if args.quick else 256
    n_keys = [256, 512, 1024]  # 65k -> 1M slots (also in --quick: only the token count is smaller)
    knn = min(knn, n_keys[0])
    t = args.tokens
    fused = kernels.topk_available(torch.empty(0, device=device), n_keys[-1], knn)
    impls = ["torch"] + (["triton"] if fused else [])
    rows = []
    it = dict(warmup=args.warmup, iters=args.iters)
    for impl in impls:
        for n in n_keys:
            torch.manual_seed(0)
            keys = ProductKeys(heads, n, k_dim, qk_norm=True).to(device)
            q = torch.randn(t, heads, k_dim, device=device, requires_grad=True)  # (T, heads, k_dim)

            def fwd(keys=keys, q=q):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    keys.retrieve(q, knn, impl=impl)

            def fwd_bwd(keys=keys, q=q):
                keys.zero_grad(set_to_none=True)
                q.grad = None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    scores, _ = keys.retrieve(q, knn, impl=impl)  # (T, heads, knn)
                scores.float().sum().backward()

            rows.append(dict(impl=impl, slots=n * n, n_keys=n, fwd_ms=time_ms(fwd, device, **it),
                             fwd_bwd_ms=time_ms(fwd_bwd, device, **it)))  # fmt: skip
    first = {r["impl"]: r for r in rows if r["n_keys"] == n_keys[0]}
    for r in rows:
        r["fwd_vs_smallest"] = r["fwd_ms"] / first[r["impl"]]["fwd_ms"]
        r["fwd_bwd_vs_smallest"] = r["fwd_bwd_ms"] / first[r["impl"]]["fwd_bwd_ms"]
        r["sqrt_n_ratio"] = (r["slots"] / n_keys[0] ** 2) ** 0.5
    _print_table(
        f"(d) product-key retrieval (query scores + top-k), {t} tokens x {heads} heads, top-{knn}, k_dim {k_dim}, "
        "qk-norm",
        ["top-k", "slots", "fwd ms", "x smallest", "fwd+bwd ms", "x smallest", "sqrt(N) ratio"],
        [[r["impl"], str(r["slots"]), r["fwd_ms"], r["fwd_vs_smallest"], r["fwd_bwd_ms"], r["fwd_bwd_vs_smallest"],
          r["sqrt_n_ratio"]] for r in rows],
    )  # fmt: skip
    return dict(tokens=t, heads=heads, knn=knn, k_dim=k_dim, results=rows)


# ----------------------------------------------------------------------------------------------------------------------
# (e) one Memory+ layer vs. a dense FFN


class _FFN(torch.nn.Module):
    """The dense reference of PAPERS.md: Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(dim, 4 * dim, bias=False), torch.nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _layer_case(layer: torch.nn.Module, x: torch.Tensor, device: torch.device, it: dict) -> tuple[float, float | None]:
    """(median fwd+bwd ms, peak memory in GiB over a step incl. the layer's parameters) under bf16 autocast."""

    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = layer(x)
        y.float().square().mean().backward()

    ms = time_ms(run, device, **it)
    peak = None
    if device.type == "cuda":
        layer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) - sum(p.numel() * p.element_size() for p in layer.parameters())
        run()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return ms, peak


def section_layer(args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """(e) a whole Memory+ layer (query net, retrieval, lookup, swilu gate, output) vs. a dense 4x FFN."""
    dim, t = (64, 256) if args.quick else (1024, 16384)
    n_keys = 32 if args.quick else 1024
    it = dict(warmup=args.warmup, iters=args.iters)
    torch.manual_seed(0)
    x = torch.randn(t, dim, device=device, requires_grad=True)  # (T, dim): one flat batch of tokens
    ffn = _FFN(dim).to(device)
    rows = [dict(layer="dense FFN 4x", table="-")]
    rows[0]["ms"], rows[0]["peak_gib"] = _layer_case(ffn, x, device, it)
    del ffn
    for table_dtype in (torch.float32, torch.bfloat16):
        for sparse in (False, True):
            mem = MemoryConfig(kind="memory_plus", n_keys=n_keys, heads=args.heads, knn=min(args.knn, n_keys),
                               k_dim=min(256, dim), sparse_grad=sparse)  # fmt: skip
            with torch.device(device):
                layer = ProductKeyMemory(dim, mem)
            layer.value_table.to(table_dtype)
            layer.record = False
            r = dict(layer=f"Memory+ {n_keys**2} slots", table=str(table_dtype).split(".")[-1],
                     grad="sparse" if sparse else "dense")  # fmt: skip
            r["ms"], r["peak_gib"] = _maybe_oom(lambda layer=layer: _layer_case(layer, x, device, it)) or (None, None)
            if args.profile and r["ms"] is not None and table_dtype == torch.bfloat16:
                profile_kernels(lambda layer=layer: _layer_case(layer, x, device, dict(warmup=0, iters=1)), device,
                                f"(e) {r['layer']}, {r['table']} table, {r['grad']} grad")  # fmt: skip
            rows.append(r)
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        r["x_ffn_time"] = None if r["ms"] is None else r["ms"] / rows[0]["ms"]
        r["x_ffn_mem"] = (
            None if r["peak_gib"] is None or rows[0]["peak_gib"] is None else r["peak_gib"] / rows[0]["peak_gib"]
        )
    _print_table(
        f"(e) one layer forward+backward, d={dim}, {t} tokens, {args.heads} heads x {args.knn} slots, bf16 autocast "
        "(PAPERS.md target for 1M slots: <= 8 ms, <= 8 GiB, <= 4x the FFN)",
        ["layer", "table", "table grad", "ms", "x FFN", "peak GiB", "x FFN mem"],
        [[r["layer"], r["table"], r.get("grad", "-"), r["ms"], r["x_ffn_time"], r["peak_gib"], r["x_ffn_mem"]]
         for r in rows],
    )  # fmt: skip
    print("peak: max allocated during one step minus what was allocated before it, plus the layer's own parameters")
    return dict(dim=dim, tokens=t, slots=n_keys**2, results=rows)


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device, float], dict]] = {
    "a": section_lookup,
    "b": section_tokens_per_s,
    "c": section_slot_scaling,
    "d": section_retrieval,
    "e": section_layer,
}


def quick_cpu_threads(args: argparse.Namespace) -> bool:
    """--threads (default 1 with --quick on CPU: tiny ops gain nothing from threads, and a busy machine's thread
    oversubscription otherwise inflates the timings up to 100x)."""
    if args.threads is None and args.quick:
        args.threads = 1
    return args.threads is not None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="a,b,c,d,e", help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument(
        "--rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="table sizes for (a), comma-separated (default 65536,262144,1048576)",
    )
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="(b) sequences per step (default 32 x 512 tokens)")
    p.add_argument("--scaling_batch", type=int, default=None, help="(c) sequences per step (default 4 x 512 tokens)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --quick, else torch's)")
    p.add_argument("--profile", action="store_true", help="(a), (b), (e): print the top device kernels of each case")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="(b) interleaved timing rounds per case (median reported)")
    p.add_argument("--warmup", type=int, default=None)
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
    for s in sections:
        out["sections"][s] = SECTIONS[s](args, device, bandwidth)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
