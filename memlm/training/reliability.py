"""Crash safety, exact resume and the non-finite guard of a training run.

- :class:`AtomicCheckpointIO`: every Lightning checkpoint is written to a temp file beside its destination, fsynced and
  renamed into place, so a process killed at any instant (SIGKILL, OOM killer, power loss) leaves the previous
  checkpoint intact and loadable. A checkpoint whose weights or optimizer state are not finite is refused (the
  previous one is kept), and a full disk is reported as one :class:`~memlm.export.CheckpointError`.
- :class:`RNGState`: the Python / NumPy / torch (CPU and CUDA) generator states travel in the checkpoint.
- :class:`RunStamp`: the tokenizer's sha256 travels in the checkpoint, so resuming with another tokenizer is refused.
- :class:`NonFiniteGuard`: a NaN/inf loss or gradient is caught before the optimizer step; the run stops with
  :class:`NonFiniteError` naming the step (``train.on_nonfinite: stop``) or the step is skipped (``skip``).

Together with the resumable train loader (:class:`memlm.data.datamodule.ResumableDataLoader`) and Lightning's own
optimizer / LR-scheduler / loop state, a run resumed from a checkpoint continues bitwise like the uninterrupted run.
"""

from __future__ import annotations

import errno
import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from memlm.export import CheckpointError
from memlm.utils.atomic import DiskFullError, atomic_write, remove_stale_temps
from memlm.utils.faults import kill_self, should_fail

MAX_CONSECUTIVE_SKIPS = 10  # train.on_nonfinite=skip: this many non-finite steps in a row stop the run anyway


class NonFiniteError(RuntimeError):
    """The loss or a gradient (or a tensor about to be checkpointed) is NaN/inf; the message names the step."""


def first_nonfinite(named: dict[str, Any]) -> str | None:
    """The name of the first floating tensor in (a nested dict of) ``named`` that holds a NaN/inf, else None."""
    flat: list[tuple[str, torch.Tensor]] = []

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                flat.append((prefix, obj._values() if obj.is_sparse else obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)

    walk("", named)
    if not flat:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in flat])  # one host sync for all tensors
    if bool(ok.all()):
        return None
    return flat[int((~ok).nonzero()[0])][0]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.tmp-*`` in the checkpoint's directory, fsync, rename, fsync the directory.
    Remote paths (``s3://`` etc.) fall back to Lightning's own (transactional) writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        step = checkpoint.get("global_step")
        bad = first_nonfinite({"state_dict": checkpoint.get("state_dict", {})}) or first_nonfinite(
            {"optimizer_states": checkpoint.get("optimizer_states", [])}
        )
        if bad is not None:
            raise NonFiniteError(
                f"refusing to write checkpoint {path} (global step {step}): {bad} is not finite; "
                "the previous checkpoint is kept"
            )

        def write(f) -> None:
            rec = _ErrorRecordingFile(f, fail_after=4096 if should_fail("enospc_in_save", step) else None)
            try:
                torch.save(checkpoint, rec)
            except RuntimeError:  # the zip writer wraps the OSError of a write (disk full) into its own RuntimeError
                if rec.error is not None:
                    raise rec.error from None
                raise
            if should_fail("kill_in_save", step):  # test-only: die with the new checkpoint half-way to its place
                f.flush()
                kill_self()

        try:
            atomic_write(path, write)
        except DiskFullError as e:
            msg = f"disk full while writing checkpoint {path} (global step {step}); {resume_hint(path)}"
            raise CheckpointError(msg) from e


class _ErrorRecordingFile:
    """A file wrapper for ``torch.save`` that keeps the OSError a write raised (``fail_after``: test-only, a disk that
    fills up after that many bytes)."""

    def __init__(self, f, fail_after: int | None = None) -> None:
        self._f, self._left, self.error = f, fail_after, None

    def write(self, data) -> int:
        try:
            if self._left is not None:
                if len(data) > self._left:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self._left -= len(data)
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def resume_hint(ckpt_path: str | Path) -> str:
    """What to do after a failed save: resume from the checkpoint that is there, or (none yet) start over."""
    last = Path(ckpt_path).with_name("last.ckpt")
    if last.is_file():
        return f"the previous checkpoint {last} is intact — free space and resume with --ckpt_path last"
    run_dir = Path(ckpt_path).parent.parent
    return f"no checkpoint has been saved yet — free space, delete {run_dir} and start the run again"


def clean_checkpoint_dir(directory: str | Path) -> None:
    """Remove temp files (and export temp directories) a killed run left half-written in ``directory`` (never a
    complete checkpoint or export)."""
    for p in remove_stale_temps(directory, dirs=True):
        rank_zero_warn(f"removed a half-written file left by an interrupted run: {p}")


class RNGState(L.Callback):
    """Saves and restores the global random generators with every checkpoint (dropout, sampling in callbacks)."""

    def state_dict(self) -> dict[str, Any]:
        # plain tuples / tensors only, so the checkpoint still loads with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class RunStamp(L.Callback):
    """Writes ``checkpoint["memlm"] = {"tokenizer_sha256", "tokenizer_content_sha256", "tokenizer"}`` (file hash,
    hash of what encodes text, training settings) so a resume can check it uses the same tokenizer and, when not,
    say which setting differs."""

    def __init__(self, tokenizer: Any) -> None:
        self.stamp = {"tokenizer_sha256": getattr(tokenizer, "hash", None),
                      "tokenizer_content_sha256": getattr(tokenizer, "content_hash", None),
                      "tokenizer": dict(getattr(tokenizer, "meta", None) or {})}  # fmt: skip

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["memlm"] = dict(self.stamp)


class RunTerminated(Exception):
    """SIGTERM stopped the run (a resumable checkpoint was saved); the message is the one line to print."""


class NonFiniteGuard(L.Callback):
    """Checks the step's loss and every gradient after backward, before clipping and the optimizer step.

    ``mode="stop"``: raise :class:`NonFiniteError` naming the step and the first bad tensor — nothing of the step is
    applied and no checkpoint is written. ``mode="skip"``: drop the step's gradients (the optimizer leaves every
    parameter and its state untouched; the batch and its LR-schedule slot are consumed), warn, and go on; more than
    :data:`MAX_CONSECUTIVE_SKIPS` skipped steps in a row stop the run. Under DDP the decision is all-reduced, so every
    rank stops or skips together.
    """

    def __init__(self, mode: str = "stop", max_consecutive: int = MAX_CONSECUTIVE_SKIPS) -> None:
        self.mode, self.max_consecutive = mode, max_consecutive
        self.skipped = 0
        self._consecutive = 0
        self._names: dict[int, str] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1  # the step being taken, numbered as in train_losses.json
        if self._names is None:
            self._names = {id(p): n for n, p in pl_module.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params and should_fail("nan_grad", step):  # test-only
            params[0].grad.view(-1)[0] = float("nan")
        loss = float(getattr(pl_module, "last_train_loss", 0.0))
        bad = None if math.isfinite(loss) else f"loss ({loss})"
        if bad is None:
            name = first_nonfinite({self._names.get(id(p), "?"): p.grad for p in params})
            bad = f"gradient of {name}" if name else None
        is_bad = trainer.strategy.reduce_boolean_decision(bad is not None, all=False)
        if not is_bad:
            self._consecutive = 0
            return
        bad = bad or "loss or gradient on another rank"
        if self.mode == "skip" and self._consecutive < self.max_consecutive:
            for p in params:
                p.grad = None
            self.skipped += 1
            self._consecutive += 1
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
            rank_zero_warn(f"step {step}: non-finite {bad}; step skipped (train.on_nonfinite=skip)")
            return
        why = f"{self._consecutive} steps in a row skipped, then " if self.mode == "skip" else ""
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir and (Path(ckpt_dir) / "last.ckpt").is_file():
            then = "the weights and the last checkpoint are from before it). Lower optim.lr or set optim.grad_clip, "
            then += "resume with --ckpt_path last,"
        else:
            then = "no checkpoint has been saved yet). Lower optim.lr or set optim.grad_clip and start the run again "
            then += "(in a new --train.name, or after deleting this run's directory),"
        raise NonFiniteError(
            f"non-finite {bad} at step {step} ({why}stopped before the optimizer step; {then} "
            "or set train.on_nonfinite=skip to skip such steps"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
