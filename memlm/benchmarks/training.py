"""(b) Training tokens/s of Memory+ vs. its equal-FLOP dense baseline; (c) step time as the slot count grows."""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from memlm.benchmarks.timing import print_table, profile_kernels, throughput_ms
from memlm.config import MemoryConfig, ModelConfig, OptimConfig
from memlm.model import MemLM, dense_matched_config, flops_per_token, param_counts
from memlm.training.module import build_optimizer, clip_grad_norm_sparse_


def _tiny_model_cfg() -> ModelConfig:
    """The --quick stand-in for small_memory_plus.yaml (CPU seconds)."""
    mem = MemoryConfig(kind="memory_plus", layers=[1], n_keys=16, heads=2, knn=4, k_dim=32)
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=2, max_seq_len=64, memory=mem)


def _memory_cfg(args: argparse.Namespace) -> ModelConfig:
    if args.quick:
        return _tiny_model_cfg()
    return ModelConfig.from_yaml(args.model_config)


def _with_memory(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **kw))


class _TrainStep:
    """One full training step as the trainer runs it: forward, backward, separate dense / value clipping, optimizer
    step (``memlm.training.module.build_optimizer``: AdamW or AdamW + row-sparse values)."""

    def __init__(
        self, cfg: ModelConfig, value_optimizer: str, device: torch.device, batch: int, seq: int, compile: bool = False
    ) -> None:
        sparse = value_optimizer == "row_sparse_adam" and cfg.memory is not None
        if sparse:
            cfg = _with_memory(cfg, sparse_grad=True)
        torch.manual_seed(0)
        with torch.device(device):  # allocate (1M-slot tables) directly on the device
            self.model = MemLM(cfg)
        self.optim_cfg = OptimConfig(value_lr=1e-3, value_optimizer=value_optimizer)
        self.opt = build_optimizer(self.model, self.optim_cfg, fused=device.type == "cuda")
        self.device = device
        self.net = torch.compile(self.model) if compile else self.model  # as train.compile does
        g = torch.Generator(device="cpu").manual_seed(0)
        seqs = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)  # (B, T+1)
        self.x, self.y = seqs[:, :-1], seqs[:, 1:]  # (B, T)
        values = {id(p) for p in self.model.value_parameters()}
        self.dense = [p for p in self.model.parameters() if id(p) not in values]
        self.values = [p for p in self.model.parameters() if id(p) in values]

    def forward_backward(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            _, loss = self.net(self.x, self.y)
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
        del self.model, self.net, self.opt, self.dense, self.values
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
    steps = [_TrainStep(c, opt, device, batch, seq, compile=args.compile) for _, c, opt in cases]
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
    print_table(
        f"(b) training tokens/s, {batch} x {seq} tokens per step, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}{', torch.compile' if args.compile else ''}; "
        "dense baseline = dense_matched_config "
        f"(ffn_hidden {dense_cfg.hidden_dim}, equal forward FLOPs/token)",
        ["model", "optimizer", "fwd+bwd ms", "step ms", "tokens/s", "x dense", "MFLOP/token", "params M"],
        lines,
    )
    return dict(batch=batch, seq_len=seq, compile=args.compile, configs=info, dense_ffn_hidden=dense_cfg.hidden_dim,
                results=rows)  # fmt: skip


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
    print_table(
        f"(c) training-step time vs. slots, dim {base.dim}, {base.n_layers} layers, memory in {base.memory.layers}, "
        f"{batch} x {seq} tokens ({batch * seq * len(base.memory.layers) * base.memory.heads * base.memory.knn} "
        "value reads) per step",
        ["slots", "value optimizer", "step ms", "x smallest", "rows read"],
        [[str(r["slots"]), r["value_optimizer"], r["step_ms"], r["vs_smallest"], str(r["unique_rows"])] for r in rows],
    )
    print("row-sparse work scales with the distinct rows read per step (<= min(slots, reads)); dense AdamW with slots")
    return dict(batch=batch, seq_len=seq, dim=base.dim, results=rows)
