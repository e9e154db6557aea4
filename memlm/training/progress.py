"""Progress people can follow: a bar on a terminal, one plain line every so often everywhere else.

Training (``TrainProgress``, a Lightning ``ProgressBar``): on a terminal one bar over the whole run (global step of
``max_steps``, loss, tokens/s, ETA); when stdout is not a terminal (a cluster job, ``nohup``, CI) one line every
``train.progress_every`` steps or ``train.progress_seconds`` seconds, whichever comes first::

    step   300/2000 ( 15%) | loss 4.512 | 10.4k tok/s | elapsed 1m02s | ETA 5m51s

The same lines always go to ``<run_dir>/progress.log`` (appended, so a resumed run continues the file). Long loops
outside training (tokenizing the corpus) use ``memlm.utils.progress.LoopProgress``; ``setup_console`` makes the data
layer's messages visible (corpus fetch, tokenizer training) and drops Lightning's noise (the litlogger tip, a
``_pytree`` deprecation warning it raises under recent torch). ``MemLMSummary`` replaces Lightning's model summary,
whose FLOPs column reads 0 without an example input, with the model's own parameter and FLOP accounting.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar

from memlm.utils.progress import LoopProgress, bar_width_kwargs, fmt_duration, fmt_rate, is_terminal

__all__ = ["LoopProgress", "MemLMSummary", "TrainProgress", "progress_callbacks", "setup_console"]


class _NoiseFilter(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... litlogger / litmodels") and its note that our model summary
    replaced its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Tip:" in msg and ("litlogger" in msg or "litmodels" in msg):
            return False
        return "Skipping setting a default `ModelSummary`" not in msg


class _OncePerProcess(logging.Filter):
    """Shows each identical memlm message once (Lightning calls prepare_data again for fit and validate; the cached
    corpus would report its sources each time)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the stream of the moment it was made:
    test capture, redirection and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_console(level: int = logging.INFO) -> None:
    """Show memlm's own progress messages (data fetch, corpus, tokenizer, packing) on stderr, and silence Lightning
    lines that carry no information for a memlm run. Idempotent."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _NoiseFilter) for f in handler.filters):
                handler.addFilter(_NoiseFilter())
    log = logging.getLogger("memlm")
    if not any(getattr(h, "_memlm_console", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[memlm %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_OncePerProcess())
        handler._memlm_console = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)


class TrainProgress(ProgressBar):
    """The training progress of a whole run (see the module docstring). ``log_file``: where the plain lines also go
    (rank 0 only); ``terminal``: force bar (True) or plain lines (False) instead of detecting a terminal on stdout."""

    def __init__(self, log_file: str | Path | None = None, every_steps: int = 100, every_s: float = 30.0,
                 terminal: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        self.log_file = Path(log_file) if log_file else None
        self.every_steps, self.every_s = max(1, every_steps), every_s
        self.terminal = terminal
        self._enabled = True
        self._bar = None
        self._loss_sum = None  # device tensor: summed without a host sync, read only when a line is printed
        self._loss_n = 0
        self._last_loss = float("nan")
        self._tokens = 0  # this process's tokens since fit start, times world size when reported
        self._t0 = self._last_line = 0.0
        self._step0 = self._last_step = 0

    # ProgressBar API
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)))
        else:
            print(*args, **kwargs)

    # output
    def _emit(self, line: str, console: bool = True) -> None:
        if not self.trainer.is_global_zero:
            return
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        if console and self._enabled:
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def _fields(self) -> dict[str, Any]:
        trainer = self.trainer
        step, total = trainer.global_step, self._max_steps()
        el = time.perf_counter() - self._t0
        done = step - self._step0
        eta = (total - step) * el / done if done > 0 and total else float("nan")
        if self._loss_n:
            self._last_loss = float(self._loss_sum) / self._loss_n
        loss = self._last_loss
        tps = self._tokens * trainer.world_size / el if el > 0 else 0.0
        return {"step": step, "total": total, "loss": loss, "tokens_per_s": tps, "elapsed": el, "eta": eta}

    def _line(self, f: dict[str, Any]) -> str:
        w = len(str(f["total"]))
        pct = 100.0 * f["step"] / f["total"] if f["total"] else 0.0
        return (f"step {f['step']:>{w}}/{f['total']} ({pct:3.0f}%) | loss {f['loss']:.3f} | "
                f"{fmt_rate(f['tokens_per_s'])} | elapsed {fmt_duration(f['elapsed'])} | "
                f"ETA {fmt_duration(f['eta'])}")  # fmt: skip

    def _max_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            est = trainer.estimated_stepping_batches
            return int(est) if est != float("inf") else 0
        except Exception:  # no dataloader length known
            return 0

    # hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last_line = time.perf_counter()
        self._step0, self._tokens = trainer.global_step, 0
        self._last_step = trainer.global_step
        use_bar = self.terminal if self.terminal is not None else is_terminal()
        total = self._max_steps()
        start = "resumed at" if self._step0 else "training:"
        self._emit(f"{start} step {self._step0}/{total}, {trainer.world_size} process(es)", console=not use_bar)
        if use_bar and self._enabled and trainer.is_global_zero:
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, initial=self._step0, unit="step", file=sys.stdout, desc="train",
                             **bar_width_kwargs(sys.stdout))  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._tokens += int(x.numel())
        step, now = trainer.global_step, time.perf_counter()
        new_step = step != self._last_step  # with gradient accumulation several batches share one global step
        self._last_step = step
        due_line = new_step and (step % self.every_steps == 0 or now - self._last_line >= self.every_s)
        if self._bar is not None:
            self._bar.n = step
            if due_line or now - self._last_line >= 1.0:  # refresh the postfix (a host read of the loss) ~1/s
                f = self._fields()
                self._bar.set_postfix_str(f"loss {f['loss']:.3f} | {fmt_rate(f['tokens_per_s'])}", refresh=False)
                self._bar.refresh()
        if due_line:
            self._last_line = now
            self._emit(self._line(self._fields()), console=self._bar is None)
            self._loss_sum, self._loss_n = None, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            where = f"step {trainer.global_step}" + ("" if trainer.state.fn == "fit" else " (final)")
            self._emit(f"validation at {where}: val/loss {float(val):.4f}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._loss_n or trainer.global_step != self._step0:
            f = self._fields()
            self._emit(f"done: {self._line(f).split(' | ETA')[0]}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MemLMSummary(ModelSummary):
    """One block with what a memlm run needs to know about its model: total and active (per-token) parameters, forward
    FLOPs per token from ``memlm.model.flops_per_token``, and the memory layers (instead of a FLOPs column of 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = getattr(pl_module, "model", None)
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            return super().on_fit_start(trainer, pl_module)
        from memlm.model import flops_per_token, param_counts

        pc = param_counts(cfg)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        from lightning.pytorch.strategies import FSDPStrategy

        sharded = isinstance(trainer.strategy, FSDPStrategy) or getattr(pl_module, "_sharded", 0)
        held = "trainable held by rank 0 (sharded)" if sharded and trainer.world_size > 1 else "trainable"
        mem = cfg.memory
        where = (f"{mem.kind} at blocks {list(cfg.memory_layers())}, {mem.n_keys ** 2:,} slots, {mem.heads} heads x "
                 f"top-{mem.knn}") if mem is not None else "none (dense)"  # fmt: skip
        lines = [
            f"model     {cfg.n_layers} layers x dim {cfg.dim}, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
            f"context {cfg.max_seq_len}",
            f"memory    {where}",
            f"params    {pc['total']:,} total, {pc['active']:,} active per token, {trainable:,} {held}",
            f"FLOPs     {flops_per_token(cfg):,} per token (forward)",
        ]
        print("\n".join(lines), flush=True)


def progress_callbacks(run_dir: str | Path, trainer_kwargs: dict, every_steps: int = 100,
                       every_s: float = 30.0) -> list[L.Callback]:  # fmt: skip
    """The launcher's console callbacks: the model summary and the training progress (``progress.log`` in
    ``run_dir``). With ``trainer.enable_progress_bar=false`` the progress lines go to the log file only. Also calls
    ``setup_console`` (before the Trainer is built, so Lightning's tip is filtered)."""
    setup_console()
    out: list[L.Callback] = []
    if trainer_kwargs.get("enable_model_summary", True):
        out.append(MemLMSummary())
    prog = TrainProgress(Path(run_dir) / "progress.log", every_steps=every_steps, every_s=every_s)
    if trainer_kwargs.get("enable_progress_bar", True):
        out.append(prog)
    else:  # Lightning refuses a ProgressBar callback when the bar is disabled: keep only the log file
        out.append(_LogOnly(prog))
    return out


class _LogOnly(L.Callback):
    """``TrainProgress`` writing to its log file only (the run asked for no progress bar)."""

    def __init__(self, inner: TrainProgress) -> None:
        self.inner = inner
        inner.disable()
        inner.terminal = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.inner._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self.inner.on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.inner.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.inner.on_train_end(trainer, pl_module)
