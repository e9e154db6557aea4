"""The training launcher behind ``train.py``: config resolution, data, Lightning Trainer, export and summary.

``python train.py [--config FILE ...] [--section.key=value ...] [--print_config] [--ckpt_path PATH|last]``.
With no ``--config`` the built-in default ``configs/pretrain/tiny.yaml`` is used. Errors a user can cause (config,
data, checkpoint) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from memlm.config import ConfigError, RunConfig, load_run_config, to_dict
from memlm.export import CheckpointError
from memlm.utils.malloc import keep_freed_memory_in_heap

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "pretrain" / "tiny.yaml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a memlm language model. Any config field can be overridden with --section.key=value "
        "(e.g. --model.dim=64, --trainer.max_steps=20, --trainer.devices=2, --trainer.strategy=ddp).",
    )
    p.add_argument("--config", action="append", default=[], help="YAML config; repeat to merge several in order")
    p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--ckpt_path", default=None, help="resume from a Lightning checkpoint, or 'last' for the run's last")
    return p.parse_known_args(argv)


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    configs = args.config or [str(DEFAULT_CONFIG)]
    return load_run_config(configs, overrides)


def _trainer_kwargs(cfg: RunConfig, run_dir: Path) -> dict:
    kw = dict(cfg.trainer)
    cuda = torch.cuda.is_available() and kw.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    kw.setdefault("precision", "bf16-mixed" if cuda else "32-true")
    kw.setdefault("default_root_dir", str(run_dir))
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("check_val_every_n_epoch", None)  # val_check_interval counts steps across epochs
    kw.setdefault("use_distributed_sampler", False)  # LMDataModule shards itself (and honours data.shuffle)
    from lightning.fabric.plugins import CheckpointIO

    from memlm.training.reliability import AtomicCheckpointIO

    plugins = kw.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())  # temp file + fsync + rename: a crash never corrupts a checkpoint
    kw["plugins"] = plugins
    if kw.get("strategy") == "fsdp":
        kw["strategy"] = fsdp_strategy()
    return kw


def fsdp_strategy():
    """FSDP with one unit per transformer block. The memory value table (Memory+: one pool shared by every memory
    layer) stays in the root unit, so its rows, gradients and optimizer state are sharded across all ranks at rest and
    gathered only for the forward/backward — the table is the model's bulk, this is where sharding pays."""
    from lightning.pytorch.strategies import FSDPStrategy

    from memlm.model.transformer import Block

    return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="full")


def _resolve_ckpt(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise CheckpointError(f"--ckpt_path last: no checkpoint at {last} (has this run saved one yet?)")
        return str(last)
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"--ckpt_path: checkpoint not found: {ckpt_path}")
    return ckpt_path


def _check_ckpt_matches(ckpt_path: str, cfg: RunConfig, tokenizer_sha256: str | None = None) -> None:
    """Refuse to resume from an unreadable checkpoint, one trained with another tokenizer, or one of another
    architecture (with one clear line, not a shape traceback)."""
    from memlm.export import verify_checkpoint_file

    verify_checkpoint_file(ckpt_path)
    try:  # mmap: the check reads only the metadata, not all the tensors, of a large checkpoint
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"{ckpt_path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            "; resume from another one (e.g. checkpoints/epoch=*-step=*.ckpt)"
        ) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    saved = (hp or {}).get("config", {}) if isinstance(hp, dict) else {}
    if not saved or "model" not in saved:
        raise CheckpointError(f"{ckpt_path} is not a memlm training checkpoint")
    saved_tok = (ckpt.get("memlm") or {}).get("tokenizer_sha256")
    if saved_tok is None and hp.get("tokenizer_path"):  # checkpoints written before the stamp: the run's tokenizer dir
        from memlm.data.tokenizer import META_FILE

        meta = Path(hp["tokenizer_path"]) / META_FILE
        try:
            saved_tok = yaml.safe_load(meta.read_text(encoding="utf-8")).get("sha256") if meta.is_file() else None
        except (OSError, yaml.YAMLError, AttributeError):
            saved_tok = None
    if tokenizer_sha256 and saved_tok and saved_tok != tokenizer_sha256:
        raise CheckpointError(
            f"{ckpt_path} was trained with another tokenizer (sha256 {saved_tok[:12]}; this run's data.tokenizer gives "
            f"{tokenizer_sha256[:12]}): resume with the data and tokenizer settings of the run that wrote it"
        )
    if saved["model"] != to_dict(cfg.model):
        diff = sorted(
            k
            for k in set(saved["model"]) | set(to_dict(cfg.model))
            if saved["model"].get(k) != to_dict(cfg.model).get(k)
        )
        raise CheckpointError(
            f"{ckpt_path} belongs to a different architecture (model fields differ: {', '.join(diff)})"
        )


def train(cfg: RunConfig, ckpt_path: str | None = None) -> dict:
    """Run training as configured; returns the summary dict (also printed)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from memlm.data.datamodule import LMDataModule
    from memlm.export import save_pretrained
    from memlm.training.callbacks import LossRecorder, MemoryStats, SaveOnInterrupt, Throughput
    from memlm.training.module import LMModule
    from memlm.training.probes import fact_recall
    from memlm.training.progress import progress_callbacks, setup_console

    t_start = time.perf_counter()
    setup_console()  # data preparation messages (fetch, corpus, tokenizer) are shown; Lightning's noise is not
    from memlm.training.reliability import NonFiniteGuard, RNGState, RunStamp, clean_checkpoint_dir
    from memlm.utils.atomic import atomic_write_text

    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    clean_checkpoint_dir(run_dir / "checkpoints")  # temp files of a run killed while saving
    ckpt_path = _resolve_ckpt(ckpt_path, run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    dm = LMDataModule(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.train.batch_size)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.tokenizer
    if cfg.model.vocab_size != tokenizer.vocab_size:  # the tokenizer is the source of truth for the vocabulary
        cfg.model.vocab_size = tokenizer.vocab_size
    if ckpt_path:
        _check_ckpt_matches(ckpt_path, cfg, tokenizer.hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer.save(run_dir / "tokenizer")
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    module = LMModule(to_dict(cfg), tokenizer_path=str(tok_dir))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    throughput, stats = Throughput(), MemoryStats(cfg.train.stats_every)
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            save_last=True,  # only last.ckpt: a step-numbered copy beside it doubles disk use (GBs at 1M slots)
            save_top_k=0,
            every_n_train_steps=cfg.train.checkpoint_every,
        ),
        LearningRateMonitor(logging_interval="step"),
        throughput,
        stats,
        SaveOnInterrupt(run_dir / "checkpoints" / "interrupted.ckpt"),
        LossRecorder(run_dir / "train_losses.json"),
        NonFiniteGuard(cfg.train.on_nonfinite),
        RNGState(),
        RunStamp(tokenizer.hash),
        *progress_callbacks(run_dir, cfg.trainer, cfg.train.progress_every, cfg.train.progress_seconds),
    ]
    trainer = L.Trainer(logger=logger, callbacks=callbacks, **_trainer_kwargs(cfg, run_dir))
    first_loss = _initial_val_loss(module, dm)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.interrupted:
        return {"interrupted": True}
    val = trainer.validate(module, datamodule=dm, verbose=False)
    summary = {
        "steps": trainer.global_step,
        "initial_val_loss": first_loss,
        "train_loss": float(module.last_train_loss),
        "val_loss": float(val[0]["val/loss"]) if val else float("nan"),
        "tokens_per_s": throughput.tokens_per_s,
        "wall_s": None,
        "run_dir": str(run_dir),
        "tensorboard": str(run_dir / "tensorboard"),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }
    if trainer.is_global_zero:
        model = module.model
        if cfg.train.probe_facts > 0:
            summary["fact_recall"] = fact_recall(model, tokenizer, cfg.data, n=cfg.train.probe_facts)
        if cfg.train.export:
            summary["export"] = str(save_pretrained(model, run_dir / "export", tokenizer, to_dict(cfg)))
        summary["wall_s"] = time.perf_counter() - t_start
        atomic_write_text(run_dir / "summary.yaml", yaml.safe_dump(summary, sort_keys=False))
        print_summary(summary)
    return summary


@torch.no_grad()
def _initial_val_loss(module, dm) -> float:
    """Validation loss of the freshly initialized model on a few batches (the "step 0" reference)."""
    dm.setup("fit")
    losses = []
    module.model.eval()
    for i, (x, y) in enumerate(dm.val_dataloader()):
        if i >= 5:
            break
        losses.append(float(module.model(x, y)[1]))
    module.model.train()
    return sum(losses) / len(losses) if losses else math.nan


def print_summary(s: dict) -> None:
    print("\n=== memlm training summary ===")
    print(f"steps            {s['steps']}   wall {s['wall_s']:.0f} s")
    v0, v1, tl = s["initial_val_loss"], s["val_loss"], s["train_loss"]
    print(f"val loss         {v0:.3f} (step 0) -> {v1:.3f}   train loss {tl:.3f}")
    print(f"throughput       {s['tokens_per_s']:.0f} tokens/s")
    if "fact_recall" in s:
        fr = s["fact_recall"]
        print(f"fact recall      {fr['exact_match']:.1%} exact match on {fr['n']} pretraining facts")
    print(f"checkpoint       {s['checkpoint']}")
    if "export" in s:
        print(f"export           {s['export']}   (memlm.load_pretrained)")
    print(f"tensorboard      tensorboard --logdir {s['tensorboard']}")


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory_in_heap()  # CPU step time: no page faults on the large per-step buffers
    from memlm.training.reliability import NonFiniteError
    from memlm.utils.atomic import DiskFullError, is_disk_full

    try:
        args, overrides = parse_args(argv)
        cfg = resolve_config(args, overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        train(cfg, args.ckpt_path)
        return 0
    except (ConfigError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk while writing a checkpoint, export or log: nothing half-written was kept
        if is_disk_full(e):
            print(f"error: {e.strerror if isinstance(e, DiskFullError) else f'disk full writing {e.filename}: {e}'}"
                  "; free space and resume with --ckpt_path last", file=sys.stderr)  # fmt: skip
            return 2
        raise
    except ValueError as e:  # DataError and other user-input errors raised as ValueError subclasses
        from memlm.data.errors import DataError

        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
