"""Fair comparison of the memory-layer variants (behind ``eval/compare.py``): train each one with the same data,
token budget and seed through the real launcher, then write one table (markdown + JSON).

Every variant is ``configs/model/{scale}_{variant}.yaml`` (an equal-forward-FLOP ladder) dropped into the same
pretraining recipe (``configs/pretrain/tiny.yaml`` by default): same data, tokenizer, optimizer, batch size, sequence
length, step count and seed. Per variant the table has:

- val loss at the end (and at step 0), fact recall (exact match / F1) on a seeded sample of pretraining facts,
- training tokens/s (the launcher's own meter: wall time of the training steps, run by run, so on a shared machine
  it mostly measures the load of the moment) and forward+backward tokens/s of the trained models timed round-robin
  across variants at the end (``--bench_rounds``; fair under load),
- total / active parameters and forward FLOPs per token (``memlm.model.param_counts`` / ``flops_per_token``),
- memory usage of the exported model over ``--usage_batches`` validation batches: coverage (fraction of slots read
  at least once) and KL(usage || uniform), per memory layer over the rows it can address, averaged over layers.

Usage:
    python eval/compare.py                                    # all six tiny variants, the recipe's step count, CPU
    python eval/compare.py --steps 400 --variants dense,pkm   # a subset at a smaller budget
    python eval/compare.py --scale small --out runs/compare/small   # the small ladder (GPU)
    python eval/compare.py --skip_existing                    # resume: reuse finished runs, resume interrupted ones
    python eval/compare.py --seeds 3                          # every variant with seeds 0, 1, 2: mean ± SE per metric

Any other ``--section.key=value`` is a config override applied to every variant (e.g. ``--train.batch_size=8``,
``--trainer.enable_progress_bar=false``). Outputs under ``--out`` (default ``runs/compare/{scale}``):
``compare.md``, ``compare.json``, ``rows/{variant}.json`` and one launcher run directory per variant in ``runs/``.
With ``--seeds N`` (N > 1) every variant is trained N times (``train.seed`` 0 ... N-1, run ``{variant}_s{seed}``) and
the table shows mean ± standard error over the seeds of every metric (``compare.json``: the per-seed rows and
``aggregate``).
Once a variant's row is written its Lightning checkpoints are deleted (weights + optimizer state, GBs per variant at
small scale; the export, summary and TensorBoard logs stay) unless ``--keep_checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

from memlm.experiments.runs import finished_summary, same_recipe
from memlm.utils.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("dense", "pkm", "memory_plus", "ultramem", "ultramem_v2", "peer")
DEFAULT_PRETRAIN = "configs/pretrain/tiny.yaml"  # paths relative to the checkout (or the working directory)

# (json key, markdown header, format) of the table's columns, in order
COLUMNS = [
    ("variant", "variant", "{}"),
    ("val_loss", "val loss", "{:.3f}"),
    ("initial_val_loss", "val loss @0", "{:.3f}"),
    ("fact_em", "fact EM", "{:.1%}"),
    ("fact_f1", "fact F1", "{:.1%}"),
    ("tokens_per_s", "train tok/s", "{:,.0f}"),
    ("bench_tokens_per_s", "fwd+bwd tok/s", "{:,.0f}"),
    ("total_params", "total params", "{:,}"),
    ("active_params", "active params", "{:,}"),
    ("flops_per_token", "fwd FLOPs/token", "{:,}"),
    ("mem_coverage", "mem coverage", "{:.1%}"),
    ("mem_kl", "mem KL (nats)", "{:.3f}"),
    ("mem_kl_norm", "mem KL / log N", "{:.3f}"),
]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="eval/compare.py",
        formatter_class=HelpFormatter,
        description="Train every memory variant with the same data, token budget and seed; write one table.",
        epilog="Other --section.key=value arguments are config overrides applied to every variant.",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the recipe's)")
    p.add_argument("--scale", choices=("tiny", "small"), default="tiny", help="model ladder: tiny (CPU) or small (GPU)")
    p.add_argument("--out", default=None, help="output directory (default runs/compare/{scale})")
    p.add_argument(
        "--config", action="append", default=[], help=f"pretraining recipe YAML (default {DEFAULT_PRETRAIN})"
    )
    p.add_argument("--model_dir", default="configs/model", help="where {scale}_{variant}.yaml model configs live")
    p.add_argument("--usage_batches", type=int, default=10, help="validation batches for the memory usage stats")
    p.add_argument("--skip_existing", action="store_true", help="reuse finished runs, resume interrupted ones")
    p.add_argument("--seeds", type=int, default=1, help="runs per variant (train.seed 0..N-1); >1: mean ± SE tables")
    p.add_argument(
        "--bench_rounds",
        type=int,
        default=20,
        help="timed forward+backward rounds per variant, interleaved across variants (0 = skip)",
    )
    p.add_argument(
        "--keep_checkpoints",
        action="store_true",
        help="keep finished variants' Lightning checkpoints (default: delete)",
    )
    args, overrides = p.parse_known_args(argv)
    bad = [a for a in overrides if not (a.startswith("--") and "=" in a)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are --section.key=value)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if args.steps is not None and args.steps <= 0:
        p.error("--steps must be > 0")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    args.out = Path(args.out or f"runs/compare/{args.scale}")
    args.config = [_in_checkout(c) for c in args.config or [DEFAULT_PRETRAIN]]
    args.model_dir = _in_checkout(args.model_dir)
    return args, overrides


def _in_checkout(path: str) -> str:
    """``path`` as given if it exists from the working directory, else relative to the checkout (run from anywhere)."""
    return path if Path(path).exists() or not (ROOT / path).exists() else str(ROOT / path)


def model_file(args: argparse.Namespace, variant: str) -> Path:
    path = Path(args.model_dir) / f"{args.scale}_{variant}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"model config for variant '{variant}' not found: {path}")
    return path


def run_name(args: argparse.Namespace, variant: str, seed: int | None) -> str:
    """The run of one variant: ``{variant}`` with a single seed, ``{variant}_s{seed}`` with ``--seeds`` > 1."""
    return variant if seed is None or args.seeds == 1 else f"{variant}_s{seed}"


def variant_config(args: argparse.Namespace, variant: str, overrides: list[str], seed: int | None = None):
    """The run config of one variant (and seed): the shared recipe, this variant's model file, the shared overrides."""
    from memlm.config import load_run_config

    name = run_name(args, variant, seed)
    own = [f"--model={model_file(args, variant)}", f"--train.name={name}", f"--train.run_dir={args.out / 'runs'}"]
    if name != variant:
        own.append(f"--train.seed={seed}")
    if args.steps is not None:
        own.append(f"--trainer.max_steps={args.steps}")
    # validate every val_check_interval global steps even when an epoch is shorter (small corpus, long sequences)
    shared = ["--trainer.check_val_every_n_epoch=null", *overrides]
    # the model file goes first; shared overrides (which may touch the model) and the per-variant ones on top
    return load_run_config(args.config, [own[0], *shared, *own[1:]])


# ----------------------------------------------------------------------------------------------------------------------
# memory usage of a trained model


def memory_usage(run_dir: Path, n_batches: int) -> dict | None:
    """Coverage / KL of every memory layer of ``run_dir``'s export over ``n_batches`` validation batches.

    Returns None for a model without memory layers.
    """
    import torch

    import memlm
    from memlm.config import load_run_config
    from memlm.data.datamodule import LMDataModule
    from memlm.model.memory.stats import counts_stats, slot_counts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = memlm.load_pretrained(run_dir / "export", device=device)
    layers = model.memory_layers
    if not layers:
        return None
    cfg = load_run_config([run_dir / "config.yaml"])
    dm = LMDataModule(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.train.batch_size, tokenizer=tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    counts: list[torch.Tensor | None] = [None] * len(layers)
    weighted: list[torch.Tensor | None] = [None] * len(layers)
    top1: list[list[float]] = [[] for _ in layers]
    n_tokens = 0
    with torch.no_grad():
        for i, (x, _) in enumerate(dm.val_dataloader()):
            if i >= n_batches:
                break
            model(x.to(device))
            n_tokens += x.numel()
            for j, layer in enumerate(layers):
                rows, n_rows = layer.local_slots(layer.last_indices)  # (B, T, heads, knn)
                w = layer.last_weights.abs()  # (B, T, heads, knn)
                c, cw = slot_counts(rows, n_rows), slot_counts(rows, n_rows, w)
                counts[j] = c if counts[j] is None else counts[j] + c
                weighted[j] = cw if weighted[j] is None else weighted[j] + cw
                top1[j].append(float(layer.last_weights.float().max(-1).values.mean()))
    if counts[0] is None:
        raise RuntimeError(f"{run_dir}: no validation batches to measure memory usage on")
    per_layer = []
    for j, layer in enumerate(layers):
        s = counts_stats(counts[j].cpu(), weighted[j].cpu())
        s["top1_weight"] = sum(top1[j]) / len(top1[j])
        s["n_rows"] = counts[j].numel()
        per_layer.append(s)
    mean = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in per_layer[0]}
    return {"tokens": n_tokens, "mean": mean, "layers": per_layer}


def bench_fwd_bwd(rows: list[dict], rounds: int) -> dict[str, float]:
    """Training-step speed without the optimizer: tokens/s of forward + backward of every exported model on one
    validation batch. Rounds go round-robin over the variants, so load from other processes on a shared machine hits
    every variant alike (the launcher's own tokens/s is measured run by run, minutes apart). Median of ``rounds``."""
    import statistics

    import torch

    import memlm
    from memlm.config import load_run_config
    from memlm.data.datamodule import LMDataModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for r in rows:
        model, tokenizer = memlm.load_pretrained(Path(r["run_dir"]) / "export", device=device)
        models[r["variant"]] = model.train()
    cfg = load_run_config([Path(rows[0]["run_dir"]) / "config.yaml"])
    dm = LMDataModule(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.train.batch_size, tokenizer=tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    x, y = (t.to(device) for t in next(iter(dm.val_dataloader())))  # (B, T) each

    def step(model) -> float:
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(x, y)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {v: [] for v in models}
    for i in range(rounds + 2):  # two warm-up rounds
        for v, model in models.items():
            dt = step(model)
            if i >= 2:
                times[v].append(dt)
    return {v: x.numel() / statistics.median(t) for v, t in times.items()}


# ----------------------------------------------------------------------------------------------------------------------
# one variant


def run_variant(args: argparse.Namespace, variant: str, overrides: list[str], seed: int | None = None) -> dict:
    """Train (or reuse) one variant (one seed of it) and return its table row."""
    from memlm.config import load_run_config, to_dict
    from memlm.model import flops_per_token, param_counts
    from memlm.training.launcher import train

    cfg = variant_config(args, variant, overrides, seed)
    steps = int(cfg.trainer["max_steps"])
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    name = cfg.train.name
    row_path = args.out / "rows" / f"{name}.json"
    if args.skip_existing and row_path.is_file() and same_recipe(run_dir, cfg):
        row = json.loads(row_path.read_text(encoding="utf-8"))
        if row.get("steps") == steps and row.get("error") is None:
            print(f"[compare] {name}: reusing {row_path}", flush=True)
            return row

    summary = finished_summary(run_dir, cfg) if args.skip_existing else None
    if summary is not None:
        print(f"[compare] {name}: reusing finished run {run_dir}", flush=True)
    else:
        ckpt = None
        if args.skip_existing and (run_dir / "checkpoints" / "last.ckpt").is_file() and same_recipe(run_dir, cfg):
            ckpt = "last"
            print(f"[compare] {name}: resuming {run_dir} from its last checkpoint", flush=True)
        elif run_dir.exists():  # (main refuses existing run dirs without --skip_existing)
            raise FileExistsError(
                f"{run_dir} exists and is not a resumable run of this recipe: choose another --run_dir"
            )
        print(f"[compare] {name}: training {steps} steps -> {run_dir}", flush=True)
        t0 = time.perf_counter()
        summary = train(cfg, ckpt_path=ckpt)
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        summary.setdefault("wall_s", time.perf_counter() - t0)

    # the launcher takes the vocabulary from the tokenizer: count the model actually trained (its saved config)
    model_cfg = load_run_config([run_dir / "config.yaml"]).model
    counts = param_counts(model_cfg)
    usage = memory_usage(run_dir, args.usage_batches)
    fr = summary.get("fact_recall") or {}
    mean = (usage or {}).get("mean", {})
    row = {
        "variant": variant,
        "run": name,
        "kind": model_cfg.memory.kind if model_cfg.memory is not None else "dense",
        "val_loss": summary["val_loss"],
        "initial_val_loss": summary["initial_val_loss"],
        "train_loss": summary.get("train_loss"),
        "fact_em": fr.get("exact_match"),
        "fact_f1": fr.get("f1"),
        "fact_n": fr.get("n"),
        "tokens_per_s": summary["tokens_per_s"],
        "total_params": counts["total"],
        "active_params": counts["active"],
        "non_embedding_params": counts["non_embedding"],
        "memory_table_params": counts["memory_values"],
        "flops_per_token": flops_per_token(model_cfg, cfg.seq_len),
        "mem_coverage": mean.get("used_frac"),
        "mem_kl": mean.get("kl_uniform"),
        "mem_kl_norm": mean.get("kl_uniform_norm"),
        "mem_gini": mean.get("gini"),
        "mem_top1_weight": mean.get("top1_weight"),
        "memory_usage": usage,
        "steps": summary["steps"],
        "tokens": summary["steps"] * cfg.train.batch_size * cfg.seq_len,
        "seed": cfg.train.seed,
        "wall_s": summary.get("wall_s"),
        "run_dir": str(run_dir),
        "model_config": str(model_file(args, variant)),
        "model": to_dict(model_cfg),
        "error": None,
    }
    row_path.parent.mkdir(parents=True, exist_ok=True)
    row_path.write_text(json.dumps(row, indent=2), encoding="utf-8")
    if not args.keep_checkpoints and (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")  # weights + optimizer state: GBs per variant at small scale
    return row


# ----------------------------------------------------------------------------------------------------------------------
# the table


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _cell_pm(agg: dict | None, fmt: str) -> str:
    """``mean ± SE`` of an aggregate in the column's format; the mean alone where the seeds agree exactly (counts)."""
    if not agg or agg.get("mean") is None:
        return "-"
    mean = round(agg["mean"]) if fmt == "{:,}" else agg["mean"]
    return fmt.format(mean) if not agg.get("se") else f"{fmt.format(mean)} ± {fmt.format(agg['se'])}"


def aggregate_rows(rows: list[dict]) -> dict[str, dict]:
    """Per variant (in order of first appearance): mean / SE / n over its seeds of every numeric table column and
    the train loss, plus ``seeds``; failed runs are left out (and counted in ``failed``)."""
    from memlm.experiments.seeds import aggregate

    keys = [k for k, _, f in COLUMNS if k != "variant"] + ["train_loss"]
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        ok = [r for r in runs if not r.get("error")]
        out[variant] = {"seeds": [r.get("seed") for r in ok], "failed": len(runs) - len(ok),
                        **({"metrics": aggregate(ok, keys)} if ok else {})}  # fmt: skip
    return out


def markdown_table(rows: list[dict], agg: dict[str, dict] | None = None) -> str:
    """One line per row; with ``agg`` (several seeds) one line per variant, every cell mean ± SE over its seeds."""
    cols = COLUMNS if agg is None else [COLUMNS[0], ("seeds", "seeds", "{}"), *COLUMNS[1:]]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    if agg is not None:
        for variant, a in agg.items():
            if "metrics" not in a:
                lines.append(f"| {variant} | 0 | all {a['failed']} seeds failed |" + " |" * (len(cols) - 3))
                continue
            seeds = f"{len(a['seeds'])}" + (f" ({a['failed']} failed)" if a["failed"] else "")
            lines.append(f"| {variant} | {seeds} | " + " | ".join(_cell_pm(a["metrics"].get(k), f) for k, _, f in
                                                                  cols[2:]) + " |")  # fmt: skip
        return "\n".join(lines)
    for r in rows:
        if r.get("error"):
            msg = r["error"].strip().splitlines()[-1][:120].replace("|", "/")
            lines.append(f"| {r['variant']} | failed: {msg} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def _seeded_ranking(agg: dict[str, dict]) -> list[str]:
    """Val loss by mean, best first, and each variant against dense as a difference ± SE ("level" inside 2 SE)."""
    from memlm.experiments.seeds import difference

    have = {v: a["metrics"]["val_loss"] for v, a in agg.items() if "metrics" in a and a["metrics"]["val_loss"]["mean"]
            is not None}  # fmt: skip
    lines = []
    if have:
        order = sorted(have, key=lambda v: have[v]["mean"])
        lines.append("Val loss (mean), best first: " + " < ".join(f"{v} ({have[v]['mean']:.3f})" for v in order) + ".")
    if "dense" in have and len(have) > 1:
        parts = []
        for v in have:
            if v == "dense":
                continue
            d = difference(have[v], have["dense"])
            se = "" if d["se"] is None else f" ± {d['se']:.3f}" + (" (level)" if d["level"] else "")
            parts.append(f"{v} {d['mean']:+.3f}{se}")
        lines.append("Val loss vs dense (difference ± SE; level = inside 2 SE): " + ", ".join(parts) + ".")
    return lines


def write_outputs(args: argparse.Namespace, overrides: list[str], rows: list[dict], meta: dict) -> tuple[Path, Path]:
    ok = [r for r in rows if not r.get("error")]
    agg = aggregate_rows(rows) if args.seeds > 1 else None
    budgets = sorted({r["tokens"] for r in ok})
    md = [f"# memlm variant comparison ({args.scale})", ""]
    seeds = f"seed {meta['seed']}" if agg is None else f"seeds 0-{args.seeds - 1}, mean ± standard error over them"
    md.append(
        f"Recipe {', '.join(args.config)}; {meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens "
        f"= {budgets[0] if len(budgets) == 1 else budgets} training tokens per variant; {seeds}; "
        f"device {meta['device']}."
    )
    if overrides:
        md.append(f"Overrides: `{' '.join(overrides)}`.")
    md += ["", markdown_table(rows, agg), ""]
    if agg is None:
        ranking = sorted(ok, key=lambda r: r["val_loss"])
        dense = next((r for r in ok if r["variant"] == "dense"), None)
        if ranking:
            order = " < ".join(f"{r['variant']} ({r['val_loss']:.3f})" for r in ranking)
            md.append(f"Val loss, best first: {order}.")
        if dense is not None:
            deltas = ", ".join(f"{r['variant']} {r['val_loss'] - dense['val_loss']:+.3f}" for r in ok if r is not dense)
            if deltas:
                md.append(f"Val loss vs dense: {deltas}.")
    else:
        md += _seeded_ranking(agg)
    if len(budgets) > 1:
        md.append(f"WARNING: the variants did not see the same number of tokens: {budgets}.")
    md += [
        "",
        "fact EM/F1: greedy answers to a seeded sample of pretraining facts. train tok/s: the launcher's training-step "
        "wall time, run by run (on a shared machine it mostly measures the load of the moment). fwd+bwd tok/s: forward "
        f"+ backward of the trained models on one batch, median of {args.bench_rounds} rounds interleaved across "
        "variants (no optimizer step). Params and FLOPs from memlm.model.accounting (active = params read per token). "
        f"Memory coverage / KL(usage || uniform): exported model over {args.usage_batches} validation batches, "
        "per memory layer over the rows it addresses, averaged over layers (N = rows per layer).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = args.out / "compare.md", args.out / "compare.json"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    data = {"meta": meta, "rows": rows, **({} if agg is None else {"aggregate": agg})}
    json_path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    from memlm.utils.malloc import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # CPU step time: no page faults on the large per-step buffers
    args, overrides = parse_args(argv)
    import torch

    from memlm.config import ConfigError

    try:
        configs = {v: variant_config(args, v, overrides) for v in args.variants}  # fail fast on a bad config
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = next(iter(configs.values()))
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {
        "scale": args.scale,
        "variants": args.variants,
        "steps": int(first.trainer["max_steps"]),
        "batch_size": first.train.batch_size,
        "seq_len": first.seq_len,
        "seed": first.train.seed,
        "recipe": args.config,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    seeds = list(range(args.seeds)) if args.seeds > 1 else [None]  # None: the recipe's own seed, run = variant
    meta["seeds"] = args.seeds
    runs = [(v, sd) for sd in seeds for v in args.variants]  # seed-major: every variant has a row early
    if not args.skip_existing:  # never delete a user's run: an existing run dir is refused before any work
        cfgs = [variant_config(args, v, overrides, sd) for v, sd in runs]
        busy = [str(d) for d in (Path(c.train.run_dir) / c.train.name for c in cfgs) if d.exists()]
        if busy:
            print(f"error: run dir(s) {busy} already exist: pass --skip_existing to reuse or resume them, or choose "
                  "another --run_dir", file=sys.stderr)  # fmt: skip
            return 2
    rows = []
    for variant, sd in runs:
        name = run_name(args, variant, sd)
        try:
            rows.append(run_variant(args, variant, overrides, sd))
        except KeyboardInterrupt:
            print(f"[compare] interrupted during {name}; rerun with --skip_existing to resume", file=sys.stderr)
            write_outputs(args, overrides, rows, meta)
            return 130
        except Exception:
            err = traceback.format_exc()
            print(f"[compare] {name} FAILED:\n{err}", file=sys.stderr, flush=True)
            rows.append({"variant": variant, "run": name, "seed": sd, "error": err})
        write_outputs(args, overrides, rows, meta)  # after every run, so a partial table exists
    ok = [r for r in rows if not r.get("error")]
    if args.bench_rounds > 0 and ok:
        # the model's speed does not depend on its seed: time the first run of each variant
        firsts = [r for i, r in enumerate(ok) if all(q["variant"] != r["variant"] for q in ok[:i])]
        print(f"[compare] timing forward+backward, {args.bench_rounds} interleaved rounds", flush=True)
        tps = bench_fwd_bwd(firsts, args.bench_rounds)
        for r in ok:
            r["bench_tokens_per_s"] = tps[r["variant"]]
    md_path, json_path = write_outputs(args, overrides, rows, meta)
    print("\n" + md_path.read_text(encoding="utf-8"))
    print(f"[compare] wrote {md_path} and {json_path}")
    return 1 if any(r.get("error") for r in rows) else 0
