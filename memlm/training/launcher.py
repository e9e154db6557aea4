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
    from memlm.utils.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="train.py",
        formatter_class=HelpFormatter,
        description="Train a memlm language model. Any config field can be overridden with --section.key=value "
        "(e.g. --model.dim=64, --trainer.max_steps=20, --trainer.devices=2, --trainer.strategy=ddp).",
        epilog="Every config field with its resolved value: python train.py [--config FILE ...] --print_config",
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
        from memlm.training.fsdp import fsdp_strategy

        acc = kw.get("accelerator", "auto")
        kw["strategy"] = fsdp_strategy(cpu=acc == "cpu" or (acc == "auto" and not torch.cuda.is_available()))
    return kw


def _type_ok(value, hint) -> bool:
    """Does ``value`` fit the simple parts of a Trainer annotation? Unknown (class / callable) parts accept anything:
    the dry construction in :func:`validate_trainer` checks those."""
    import typing
    from collections.abc import Iterable

    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Iterable or hint is Iterable:
        return not isinstance(value, (str, bytes))
    return True  # Accelerator, Strategy, Logger, timedelta, Path...: left to the dry construction


def validate_trainer(kw: dict) -> None:
    """Check the ``trainer`` section's values (not only its keys) before anything is written: each value against
    ``lightning.Trainer``'s annotation, then a dry construction (no logger, callbacks or checkpoints) that runs
    Lightning's own checks (accelerator, strategy, precision, devices, val_check_interval ...)."""
    import logging
    import typing

    import lightning as L

    hints = typing.get_type_hints(L.Trainer.__init__)
    for k, v in kw.items():
        if k in hints and not _type_ok(v, hints[k]):
            want = getattr(hints[k], "__name__", None) if isinstance(hints[k], type) else None
            want = want or str(hints[k]).replace("typing.", "").replace("NoneType", "None")
            raise ConfigError(f"trainer.{k}: {v!r} is not a valid value (lightning.Trainer expects {want})")
    dry = {k: v for k, v in kw.items() if k not in ("logger", "callbacks", "enable_checkpointing", "plugins")}
    dry.setdefault("enable_progress_bar", False)
    quiet = [logging.getLogger(f"lightning.{n}.utilities.rank_zero") for n in ("pytorch", "fabric")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        L.Trainer(logger=False, callbacks=[], enable_checkpointing=False, **dry)
    except Exception as e:  # MisconfigurationException, ValueError, TypeError from Lightning's checks
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        names = [k for k in kw if f"`{k}" in msg or f"{k}=" in msg or f" {k} " in f" {msg} "]
        what = f"trainer.{names[0]}" if names else "the trainer section"
        raise ConfigError(f"{what} is not valid for lightning.Trainer: {msg}") from None
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


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


def _check_ckpt_matches(ckpt_path: str, cfg: RunConfig, tokenizer=None) -> None:
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
    if tokenizer is not None:
        _check_tokenizer_matches(ckpt_path, ckpt.get("memlm") or {}, hp.get("tokenizer_path"), tokenizer)
    if _arch(saved["model"]) != _arch(to_dict(cfg.model)):
        now = _arch(to_dict(cfg.model))
        diff = sorted(k for k in set(_arch(saved["model"])) | set(now) if _arch(saved["model"]).get(k) != now.get(k))
        raise CheckpointError(
            f"{ckpt_path} belongs to a different architecture (model fields differ: {', '.join(diff)})"
        )


def _check_tokenizer_matches(ckpt_path: str, stamp: dict, tok_path: str | None, tokenizer) -> None:
    """Refuse a resume whose tokenizer encodes text differently from the checkpoint's, naming the setting that differs
    (corpus, vocab_size, model_type ...). Byte-identical or equal in content (a cache rebuilt by an older version, whose
    proto named a temp path) is accepted."""
    from memlm.data.tokenizer import Tokenizer

    saved_sha = stamp.get("tokenizer_sha256")
    saved_content = stamp.get("tokenizer_content_sha256")
    saved_meta = stamp.get("tokenizer") or {}
    saved_tok = None
    if tok_path and Path(tok_path).is_dir():  # the tokenizer saved beside the run that wrote the checkpoint
        try:
            saved_tok = Tokenizer.load(tok_path)
        except Exception:
            saved_tok = None
    if saved_tok is not None:
        saved_sha = saved_sha or saved_tok.hash
        saved_content = saved_content or saved_tok.content_hash
        saved_meta = saved_meta or saved_tok.meta
    if saved_sha is None or saved_sha == tokenizer.hash or saved_content == tokenizer.content_hash:
        return
    if saved_content is None and saved_tok is None:
        return  # nothing to compare against (a checkpoint of another program): the architecture check still runs
    names = {
        "corpus": "the corpus (data.sources / their files)",
        "vocab_size": "data.tokenizer.vocab_size",
        "model_type": "data.tokenizer.model_type",
        "input_sentence_size": "data.tokenizer.input_sentence_size",
        "character_coverage": "data.tokenizer.character_coverage",
        "format": "the tokenizer format version",
    }
    diff = [f"{names.get(k, k)}: {str(saved_meta.get(k))[:12]} in the checkpoint, {str(tokenizer.meta.get(k))[:12]} now"
            for k in names if k in saved_meta and saved_meta.get(k) != tokenizer.meta.get(k)]  # fmt: skip
    if diff:
        cause = "; ".join(diff)
    else:
        cause = ("the same settings but different vocabularies — the tokenizer was retrained by another SentencePiece "
                 "version or machine; pass the run's own tokenizer with --data.tokenizer.path="
                 f"{tok_path or '<run_dir>/tokenizer'}")  # fmt: skip
    raise CheckpointError(f"{ckpt_path} was trained with another tokenizer ({cause}): resume with the data and "
                          "tokenizer settings of the run that wrote it")  # fmt: skip


def _check_memory_parallel(cfg: RunConfig) -> None:
    """``model.memory.parallel=dim``: the strategy must be DDP and every table width divisible by the world size
    (checked again, with the real world size, when the tables are sharded)."""
    mem = cfg.model.memory
    if mem is None or mem.parallel == "none":
        return
    strategy = cfg.trainer.get("strategy", "auto")
    if isinstance(strategy, str) and strategy.startswith("fsdp"):
        raise ConfigError("model.memory.parallel=dim does not combine with trainer.strategy=fsdp (FSDP would gather "
                          "the sharded tables whole); use --trainer.strategy=ddp")  # fmt: skip
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and devices > 0:
        from memlm.model.memory.parallel import check_shardable

        check_shardable(cfg.model, devices * nodes)


def _arch(model: dict) -> dict:
    """A saved model config without the settings that do not change the weights (memory.parallel)."""
    mem = model.get("memory")
    if isinstance(mem, dict):
        model = {**model, "memory": {k: v for k, v in mem.items() if k != "parallel"}}
    return model


def _global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def train(cfg: RunConfig, ckpt_path: str | None = None) -> dict:
    """Run training as configured; returns the summary dict (also printed).

    The run directory ``<train.run_dir>/<train.name>`` is refused when it exists (unless resuming with ``ckpt_path``)
    and locked while the run writes it; the ``trainer`` section is checked before anything is written. A directory
    this call created is removed again when it fails before writing anything into it.
    """
    from memlm.utils.rundir import RunDir, check_name

    check_name(cfg.train.name, "train.name")
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    _check_memory_parallel(cfg)
    validate_trainer(_trainer_kwargs(cfg, run_dir))
    owned = RunDir.claim(run_dir, resume=ckpt_path is not None, what="run directory",
                         hint="resume it with --ckpt_path last", lock=_global_rank() == 0)  # fmt: skip
    failed = True
    try:
        summary = _train(cfg, ckpt_path, run_dir)
        failed = False
        return summary
    finally:
        owned.release(failed=failed)


def _train(cfg: RunConfig, ckpt_path: str | None, run_dir: Path) -> dict:
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
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from memlm.training.reliability import NonFiniteGuard, RNGState, RunStamp, RunTerminated, clean_checkpoint_dir
    from memlm.utils.atomic import atomic_write_text

    if _global_rank() == 0:  # we hold the run's lock: temp files here are a killed run's (export, losses, checkpoint)
        clean_checkpoint_dir(run_dir)
        clean_checkpoint_dir(run_dir / "checkpoints")
    ckpt_path = _resolve_ckpt(ckpt_path, run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    dm = LMDataModule(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.train.batch_size)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.tokenizer
    if cfg.model.vocab_size != tokenizer.vocab_size:  # the tokenizer is the source of truth for the vocabulary
        cfg.model.vocab_size = tokenizer.vocab_size
    if ckpt_path:
        _check_ckpt_matches(ckpt_path, cfg, tokenizer)
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
            enable_version_counter=False,  # never last-v1.ckpt beside last.ckpt: --ckpt_path last is the last one
        ),
        LearningRateMonitor(logging_interval="step"),
        throughput,
        stats,
        interrupt := SaveOnInterrupt(run_dir / "checkpoints/interrupted.ckpt", run_dir / "checkpoints/last.ckpt"),
        recorder := LossRecorder(run_dir / "train_losses.json"),
        NonFiniteGuard(cfg.train.on_nonfinite),
        RNGState(),
        RunStamp(tokenizer),
        *progress_callbacks(run_dir, cfg.trainer, cfg.train.progress_every, cfg.train.progress_seconds),
    ]
    trainer = L.Trainer(logger=logger, callbacks=callbacks, **_trainer_kwargs(cfg, run_dir))
    first_loss = _initial_val_loss(module, dm)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException:  # a scheduler / `timeout` stopped the run: SaveOnInterrupt wrote a resumable checkpoint
        where = f"checkpoint saved to {interrupt.saved}" if interrupt.saved else "no checkpoint could be saved"
        raise RunTerminated(f"stopped by SIGTERM at step {trainer.global_step}: {where}; resume with --ckpt_path last")
    if trainer.interrupted:
        return {"interrupted": True}
    losses = recorder.losses  # LossRecorder: the whole curve, restored from the checkpoint on resume
    old = _read_summary(run_dir / "summary.yaml")
    exported = not cfg.train.export or (run_dir / "export" / "model.safetensors").is_file()
    if throughput.tokens == 0 and old is not None and old.get("steps") == trainer.global_step and exported:
        print(f"{run_dir}: already finished at step {trainer.global_step}; nothing to do (summary.yaml kept)")
        print_summary(old)
        return old
    val = trainer.validate(module, datamodule=dm, verbose=False)
    tokens_per_s = throughput.tokens_per_s if throughput.tokens else (old or {}).get("tokens_per_s")
    summary = {
        "steps": trainer.global_step,
        "initial_val_loss": first_loss,
        "train_loss": float(losses[max(losses)]) if losses else float(module.last_train_loss),
        "val_loss": float(val[0]["val/loss"]) if val else float("nan"),
        "tokens_per_s": tokens_per_s,
        "train_tokens": int(dm.meta["train_tokens"]),  # one epoch: exposures per appearance = steps x batch x T / this
        "wall_s": None,
        "run_dir": str(run_dir),
        "tensorboard": str(run_dir / "tensorboard"),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }
    model = _full_model(module, trainer)
    if trainer.is_global_zero:
        if cfg.train.probe_facts > 0:
            summary["fact_recall"] = fact_recall(model, tokenizer, cfg.data, n=cfg.train.probe_facts)
        if cfg.train.export:
            summary["export"] = str(save_pretrained(model, run_dir / "export", tokenizer, to_dict(cfg)))
        summary["wall_s"] = time.perf_counter() - t_start
        atomic_write_text(run_dir / "summary.yaml", yaml.safe_dump(summary, sort_keys=False))
        print_summary(summary)
    return summary


def _full_model(module, trainer):
    """The trained model with every parameter whole, for the export and the fact probe (rank 0 uses it). A collective:
    every rank calls it. Memory-parallel: the tables gathered into a copy; FSDP: the full state dict (gathered on rank
    0) loaded into a fresh model (None on other ranks); otherwise the live model."""
    from lightning.pytorch.strategies import FSDPStrategy

    if module._sharded:
        from memlm.model.memory.parallel import unsharded_copy

        return unsharded_copy(module.model)
    if isinstance(trainer.strategy, FSDPStrategy):
        from memlm.model import MemLM

        state = trainer.strategy.lightning_module_state_dict()  # LightningModule keys: "model.<name>"
        if not trainer.is_global_zero:
            return None
        model = MemLM(module.model.cfg)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        return model.to(module.device)  # the fact probe runs where training ran; the export copies to CPU itself
    return module.model


def _read_summary(path: Path) -> dict | None:
    try:
        s = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return s if isinstance(s, dict) and "steps" in s else None


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
    print(f"steps            {s['steps']}   wall {s.get('wall_s') or 0:.0f} s")
    v0, v1, tl = s["initial_val_loss"], s["val_loss"], s["train_loss"]
    print(f"val loss         {v0:.3f} (step 0) -> {v1:.3f}   train loss {tl:.3f}")
    tps = s.get("tokens_per_s")
    print(f"throughput       {'n/a' if tps is None else f'{tps:.0f}'} tokens/s")
    if "fact_recall" in s:
        fr = s["fact_recall"]
        print(f"fact recall      {fr['exact_match']:.1%} exact match on {fr['n']} pretraining facts")
    print(f"checkpoint       {s['checkpoint']}")
    if "export" in s:
        print(f"export           {s['export']}   (memlm.load_pretrained)")
    print(f"tensorboard      tensorboard --logdir {s['tensorboard']}")


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory_in_heap()  # CPU step time: no page faults on the large per-step buffers
    from memlm.training.reliability import NonFiniteError, RunTerminated, resume_hint
    from memlm.utils.atomic import DiskFullError, is_disk_full
    from memlm.utils.rundir import describe_os_error

    cfg = None
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
    except RunTerminated as e:  # SIGTERM: not the user's error, but a scheduler must see that the run did not finish
        print(f"terminated: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process killed by it
    except OSError as e:  # a full disk while writing a checkpoint, export or log: nothing half-written was kept
        hint = "free space and retry"
        if cfg is not None:
            hint = resume_hint(Path(cfg.train.run_dir) / cfg.train.name / "checkpoints" / "last.ckpt")
        if is_disk_full(e):
            print(f"error: {e.strerror if isinstance(e, DiskFullError) else f'disk full writing {e.filename}: {e}'}"
                  f"; {hint}", file=sys.stderr)  # fmt: skip
            return 2
        msg = describe_os_error(e)  # read-only run dir / export dir / cache, a file where a directory belongs
        if msg:
            print(f"error: {msg}", file=sys.stderr)
            return 2
        raise
    except ValueError as e:  # DataError and other user-input errors raised as ValueError subclasses
        from memlm.data.errors import DataError

        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
