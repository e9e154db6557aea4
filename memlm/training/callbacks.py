"""Training callbacks: throughput, memory-usage statistics (+ TensorBoard histograms), checkpoint on Ctrl-C."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import torch

from memlm.model.memory.stats import counts_stats
from memlm.utils.atomic import atomic_write_json
from memlm.utils.faults import should_fail


class Throughput(L.Callback):
    """Logs training tokens/s (per process) and keeps the run's totals for the final summary."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None
        self._window = (0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        n = batch[0].numel()
        self.tokens += n
        self.seconds += dt
        tok, sec = self._window
        tok, sec = tok + n, sec + dt
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("perf/tokens_per_s", tok / max(sec, 1e-9), on_step=True, on_epoch=False)
            tok, sec = 0, 0.0
        self._window = (tok, sec)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class MemoryStats(L.Callback):
    """Accumulates each memory layer's slot counts every step; every ``every`` steps logs the usage statistics
    (fraction used, KL to uniform, Gini, slots for 50/90/99 % of mass, mean top-1 weight) and a usage histogram."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.counts: dict[int, torch.Tensor] = {}
        self.weighted: dict[int, torch.Tensor] = {}
        self.top1: dict[int, list[torch.Tensor]] = {}  # device scalars: read back only at flush (no per-step sync)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = pl_module.model.memory_layers
        for i, layer in enumerate(layers):
            if layer.last_indices is None:
                continue
            idx, n = layer.local_slots(layer.last_indices)  # over the slots this layer addresses
            idx = idx.reshape(-1)  # (B*T*heads*knn,)
            w = layer.last_weights.reshape(-1).abs().float()
            c = torch.bincount(idx, minlength=n).float()
            cw = torch.bincount(idx, weights=w, minlength=n).float()
            self.counts[i] = self.counts[i] + c if i in self.counts else c
            self.weighted[i] = self.weighted[i] + cw if i in self.weighted else cw
            self.top1.setdefault(i, []).append(layer.last_weights.max(-1).values.float().mean())
        if layers and trainer.global_step % self.every == 0 and self.counts:
            self.flush(trainer, pl_module)

    def flush(self, trainer, pl_module) -> dict[int, dict[str, float]]:
        out = {}
        for i, counts in self.counts.items():
            stats = counts_stats(counts.double().cpu(), self.weighted[i].double().cpu())
            stats["top1_weight"] = float(torch.stack(self.top1[i]).mean())
            out[i] = stats
            for k, v in stats.items():
                pl_module.log(f"memory/layer{i}/{k}", float(v), on_step=True, on_epoch=False, rank_zero_only=True)
            exp = getattr(trainer.logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_histogram") and trainer.is_global_zero:
                # distribution of per-slot access counts over the window (log1p: a few hot slots dominate)
                exp.add_histogram(f"memory/layer{i}/slot_usage_log1p", counts.log1p().cpu(), trainer.global_step)
        self.last = out
        self.counts, self.weighted, self.top1 = {}, {}, {}
        return out


class SaveOnInterrupt(L.Callback):
    """Ctrl-C (KeyboardInterrupt) writes a checkpoint to ``path`` before the process exits. SIGTERM (schedulers,
    ``timeout``), which Lightning turns into a ``SIGTERMException`` at a step boundary, writes ``term_path`` (the run's
    ``last.ckpt``, so ``--ckpt_path last`` continues from it); the launcher then exits non-zero with one line.
    ``saved`` is the path written."""

    def __init__(self, path: str | Path, term_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.term_path = Path(term_path) if term_path else self.path
        self.saved: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if should_fail("sigterm", trainer.global_step):  # test-only: a scheduler's SIGTERM after this step
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            if trainer.state.fn == "fit":
                trainer.save_checkpoint(self.term_path)
                self.saved = self.term_path
        elif isinstance(exception, KeyboardInterrupt):
            trainer.save_checkpoint(self.path)
            self.saved = self.path
            print(f"\ninterrupted: checkpoint saved to {self.path}")


class LossRecorder(L.Callback):
    """Keeps the global (all-rank mean) training loss of every step and writes them to ``path`` as JSON (atomically)
    with every checkpoint and at the end — for determinism / resume checks and DDP-vs-single-process comparisons.
    The curve is part of the checkpoint, so a resumed run's file holds the whole curve, each step once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        self.losses[trainer.global_step] = float(loss)

    def write(self) -> None:
        atomic_write_json(self.path, {str(k): self.losses[k] for k in sorted(self.losses)})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            self.write()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write()

    def state_dict(self) -> dict:
        return {"losses": dict(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = {int(k): float(v) for k, v in (state.get("losses") or {}).items()}
