"""The continual-finetune script (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning").

``python -m memlm.continual --ckpt PATH --config configs/finetune/<method>.yaml [--section.key=value ...]``

Loads a checkpoint with :func:`memlm.load_pretrained`, streams new facts in K sequential stages, updates the model with
the configured method (sparse_memory / full / lora / memory_only: one loop, the method decides what moves) and
evaluates after every stage: learning (new facts so far), forgetting (held-in facts, held-out perplexity, relative to
the base model), retention of earlier stages. Writes into ``out_dir/<name>/``::

    config.yaml          the resolved finetune config (+ the checkpoint path)
    facts/stage*.jsonl   the new facts of each stage (QA files the evaluation reads)
    base.json            the base model's evaluation
    stage_<k>.json       per stage: the summary (learning / forgetting / retention), train stats, raw results
    summary.json         every stage summary + method facts; learning_forgetting.png; tensorboard/
    export/              the finetuned model (memlm.load_pretrained; ``save_model: false`` skips it)

Every check a user can fail (config, checkpoint, method vs model, top_t, empty stream, background statistics of
another checkpoint) runs before anything is written. Such errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from memlm.config import ConfigError, FinetuneConfig, load_finetune_config, to_dict
from memlm.continual import diagnostics, stage_eval, stream
from memlm.continual.background import BackgroundError, load_or_compute
from memlm.continual.factory import build_method
from memlm.continual.methods import MethodError, check_method_applies
from memlm.continual.report import plot_stages
from memlm.data.cache import atomic_write_json
from memlm.data.errors import DataError
from memlm.export import CheckpointError
from memlm.utils.malloc import keep_freed_memory_in_heap
from memlm.utils.rundir import check_name, claim_or_reuse, describe_os_error, release_all

USER_ERRORS = (ConfigError, CheckpointError, MethodError, BackgroundError, stream.StreamError, DataError)


def checkpoint_run_config(ckpt: str | Path) -> dict[str, Any]:
    """The run config saved with a checkpoint (export dir: config.yaml; Lightning .ckpt: its hyper-parameters)."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        from memlm.export import read_export_config

        return read_export_config(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    return dict((raw.get("hyper_parameters") or {}).get("config") or {})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Prepared:
    """Everything validated before the first write: model, tokenizer, stages, examples, method."""

    def __init__(self, ckpt: str | Path, cfg: FinetuneConfig, progress: bool = True) -> None:
        import memlm

        self.ckpt, self.cfg = Path(ckpt), cfg
        torch.manual_seed(cfg.train.seed)
        self.device = _device(cfg.train.device)
        self.model, self.tok = memlm.load_pretrained(ckpt, device=self.device)
        if self.tok is None:
            raise CheckpointError(f"{ckpt} has no tokenizer: the new facts cannot be tokenized")
        self.run_config = checkpoint_run_config(ckpt)
        check_method_applies(self.model, cfg)
        self.stages = stream.split_stages(stream.load_facts(cfg.stream), cfg.stream)
        max_len = self.model.cfg.max_seq_len
        self.examples = [stream.stage_examples(self.tok, facts, cfg.stream, max_len) for facts in self.stages]
        if not all(self.examples):
            raise stream.StreamError("a stage of the fact stream has no training examples")
        self.background, self.background_path, self.background_new = None, None, False
        if cfg.method == "sparse_memory":
            self.background, self.background_path, self.background_new = load_or_compute(
                self.model, self.tok, ckpt, self.run_config, cfg.smf, progress
            )
        self.method = build_method(self.model, cfg, self.background)
        self.pad_id = self.tok.pad_id if self.tok.pad_id >= 0 else 0


def run(
    ckpt: str | Path, cfg: FinetuneConfig, base_results: dict | None = None, progress: bool = True
) -> dict[str, Any]:
    """Finetune ``ckpt`` as configured; returns the run summary (also written to ``summary.json``).

    ``base_results``: the base model's evaluation on the same tasks (the comparison passes it to avoid recomputing).
    """
    t0 = time.perf_counter()
    check_name(cfg.run_name, "name")
    out = Path(cfg.out_dir) / cfg.run_name
    # never delete: an existing out dir is refused, unless it is a finished run of this very config (then reused);
    # the new dir is locked while this run writes it (memlm.utils.rundir)
    owned, done = claim_or_reuse(out, {**to_dict(cfg), "ckpt": str(Path(ckpt))}, "summary.json",
                                 "continual output directory", "choose another --name or --out_dir")  # fmt: skip
    if done is not None:
        print(f"{out}: a finished run of this config; its results are reused (delete the directory to rerun it)")
        return {**done, "base_results": None}
    prep = Prepared(ckpt, cfg, progress)  # raises before anything is written
    method, tok = prep.method, prep.tok
    resolved = {**to_dict(cfg), "ckpt": str(prep.ckpt)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    fact_files = [stream.write_facts(out / "facts" / f"stage{k + 1}.jsonl", f) for k, f in enumerate(prep.stages)]
    ppl_file = None
    if not cfg.eval.ppl_task and cfg.eval.ppl_docs != 0:
        ppl_file = stage_eval.write_heldout_text(prep.run_config, out / "heldout_text.jsonl", cfg.eval.ppl_docs)
    groups = stage_eval.task_groups(cfg, fact_files, ppl_file)

    def evaluate() -> dict:
        return stage_eval.run_eval(method.model, tok, groups, prep.run_config, cfg.eval.batch_size)

    if base_results is None:
        base_results = evaluate()
    atomic_write_json(out / "base.json", stage_eval.strip_predictions(base_results))
    # forgetting measured on the held-in facts the base model answers correctly (and, for SMF, which slots they read)
    known = diagnostics.known_predictions(base_results, stage_eval.HELDIN)
    known_ids = {p["id"] for p in known}
    if hasattr(method, "set_protected") and known:
        method.set_protected(diagnostics.answer_slots(method.model, tok, known))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    stages: list[dict] = []
    step = 0
    try:
        for k, examples in enumerate(prep.examples):
            ts = time.perf_counter()
            logs_sum: dict[str, float] = {}
            n = 0
            it = stream.stage_batches(examples, cfg.stream, cfg.train.batch_size, cfg.train.steps_per_stage,
                                      cfg.train.seed + k, prep.pad_id, cfg.train.loss_on)  # fmt: skip
            total = stream.stage_steps(examples, cfg.stream, cfg.train.batch_size, cfg.train.steps_per_stage)
            bar = tqdm(it, total=total, desc=f"{cfg.run_name} stage {k + 1}", disable=not progress, leave=False)
            for batch in bar:
                logs = method.step(batch)
                step += 1
                n += 1
                for name, v in logs.items():
                    logs_sum[name] = logs_sum.get(name, 0.0) + v
                    writer.add_scalar(f"train/{name}", v, step)
                if step % cfg.train.log_every == 0:
                    bar.set_postfix(loss=f"{logs['loss']:.3f}")
            train_s = time.perf_counter() - ts
            results = evaluate()
            summary = stage_eval.summarize(base_results, results, k, len(prep.stages))
            if known_ids:
                summary["forgetting"][diagnostics.HELDIN_KNOWN] = diagnostics.known_forgetting(
                    base_results, results, stage_eval.HELDIN, known_ids
                )
            means = {f"mean_{a}": b / n for a, b in logs_sum.items()}
            summary["train"] = {"steps": n, "seconds": round(train_s, 2), **means}
            summary["eval_seconds"] = round(time.perf_counter() - ts - train_s, 2)
            stages.append(summary)
            _log_stage(writer, summary)
            full = {**summary, "results": stage_eval.strip_predictions(results)}
            atomic_write_json(out / f"stage_{k + 1}.json", full)
            _print_stage(cfg.run_name, summary)
    finally:
        writer.close()
    result = {
        "method": {"name": cfg.method, **method.summary()},
        "config": to_dict(cfg),
        "ckpt": str(prep.ckpt),
        "background": None if prep.background_path is None else {
            "path": str(prep.background_path), "computed_now": prep.background_new,
            "n_batches": prep.background.n_batches},
        "steps": step,
        "wall_s": round(time.perf_counter() - t0, 2),
        "stages": stages,
        "out_dir": str(out),
    }  # fmt: skip
    if cfg.save_model:  # the finetuned model, loadable with memlm.load_pretrained (LoRA: adapters merged)
        from memlm.export import save_pretrained

        finetune = {"method": cfg.method, "base_ckpt": str(prep.ckpt), "steps": step}
        save_pretrained(method.final_model(), out / "export", tok, {**prep.run_config, "finetune": finetune})
        result["export"] = str(out / "export")
    atomic_write_json(out / "summary.json", result)
    plot_stages({cfg.run_name: result}, out / "learning_forgetting.png")
    result["base_results"] = base_results
    owned.release()
    return result


def _log_stage(writer, s: dict) -> None:
    k = s["stage"]
    writer.add_scalar("stage/new_facts_em", s["learning"]["exact_match"], k)
    writer.add_scalar("stage/new_facts_f1", s["learning"]["f1"], k)
    for task, metrics in s["forgetting"].items():
        for m, r in metrics.items():
            if isinstance(r, dict) and r.get("relative_drop") is not None:
                writer.add_scalar(f"forgetting/{task}/{m}_relative_drop", r["relative_drop"], k)
                writer.add_scalar(f"forgetting/{task}/{m}", r["after"], k)


def _print_stage(name: str, s: dict) -> None:
    learn = s["learning"]
    line = f"[{name}] stage {s['stage']}: new facts EM {learn['exact_match']:.1%} F1 {learn['f1']:.1%}"
    for task, metrics in s["forgetting"].items():
        m = metrics["primary_metric"]
        d = metrics[m]["relative_drop"]
        line += f" | {task} {m} {metrics[m]['after']:.4g} ({'n/a' if d is None else f'{d:+.1%}'})"
    print(line, flush=True)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m memlm.continual",
        description="Continual finetuning of a memlm checkpoint on a stream of new facts (sparse memory finetuning, "
        "full finetuning, LoRA, memory-only). Any config field can be overridden with --section.key=value.",
    )
    p.add_argument("--ckpt", required=True, help="export directory (runs/<name>/export) or Lightning .ckpt")
    p.add_argument("--config", action="append", default=[], help="finetune YAML; repeat to merge several in order")
    p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory_in_heap()  # CPU step time: no page faults on the large per-step buffers
    try:
        args, overrides = parse_args(argv)
        cfg = load_finetune_config(args.config, overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        result = run(args.ckpt, cfg, progress=not args.quiet)
        print(f"wrote {result['out_dir']} (summary.json, stage_*.json, learning_forgetting.png, tensorboard/)")
        return 0
    except USER_ERRORS as e:
        release_all(failed=True)  # an out dir created by this run, still empty, is removed again
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only or full disk, a file where a directory belongs: one line, not a traceback
        release_all(failed=True)
        msg = describe_os_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
