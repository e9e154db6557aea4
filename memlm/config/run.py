"""Optimizer, training and whole-run configs (``optim:``, ``train:``, ``trainer:``) and their loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memlm.config.base import _require, _YamlMixin, deep_merge, from_dict, parse_overrides, read_yaml
from memlm.config.data import DataConfig
from memlm.config.model import ModelConfig


@dataclass
class OptimConfig(_YamlMixin):
    """AdamW with warmup + cosine; memory values in their own group (own lr and schedule, no weight decay)."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm of the non-value parameters
    value_grad_clip: float | None = 1.0  # values clipped separately (Memory+)
    value_lr: float | None = None  # fixed value lr (Memory+ / PKM use 1e-3); None -> lr * value_lr_mult
    value_lr_mult: float = 1.0
    value_lr_decay_to: float | None = None  # UltraMem: value lr multiplier decays linearly value_lr_mult -> this
    value_schedule: Literal["follow", "constant"] = "follow"  # follow the base warmup+cosine, or constant after warmup
    # "row_sparse_adam": the value tables get sparse gradients and a lazy Adam step that touches only the rows read in
    # the step (no weight decay), so step time does not grow with the table; "adamw": one dense AdamW for everything
    value_optimizer: Literal["adamw", "row_sparse_adam"] = "adamw"

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two numbers in [0, 1)"
        )
        _require(self.value_lr is None or self.value_lr > 0, f"optim.value_lr must be > 0, got {self.value_lr}")
        _require(self.value_lr_mult > 0, f"optim.value_lr_mult must be > 0, got {self.value_lr_mult}")
        # a fixed value lr ignores the multiplier, so the UltraMem lambda schedule would silently start at value_lr
        _require(
            self.value_lr is None or (self.value_lr_mult == 1.0 and self.value_lr_decay_to is None),
            f"optim.value_lr={self.value_lr} (a fixed value lr) excludes optim.value_lr_mult / value_lr_decay_to "
            "(value lr = lr x multiplier); to use the multiplier, also pass --optim.value_lr=null",
        )


@dataclass
class TrainConfig(_YamlMixin):
    """What the launcher does around the Lightning Trainer."""

    seed: int = 0
    batch_size: int = 16
    seq_len: int | None = None  # None -> model.max_seq_len
    run_dir: str = "runs"
    name: str = "tiny"
    compile: bool = False  # torch.compile the model
    stats_every: int = 50  # memory usage statistics + histogram every N steps
    checkpoint_every: int = 200  # Lightning checkpoint (last.ckpt) every N steps
    export: bool = True  # write an export dir (safetensors + config + tokenizer) at the end
    probe_facts: int = 200  # pretraining facts probed for recall at the end (0 = skip)
    # off a terminal (and always in <run_dir>/progress.log): one progress line every N steps or S seconds
    progress_every: int = 100
    progress_seconds: float = 30.0
    # a NaN/inf loss or gradient: stop the run naming the step (exit code 2), or skip that optimizer step
    on_nonfinite: Literal["stop", "skip"] = "stop"

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _require(self.seq_len is None or self.seq_len > 1, f"train.seq_len must be > 1, got {self.seq_len}")
        _require(self.stats_every > 0 and self.checkpoint_every > 0, "train.stats_every/checkpoint_every must be > 0")
        _require(self.progress_every > 0 and self.progress_seconds > 0, "train.progress_every/seconds must be > 0")


def _default_trainer() -> dict[str, Any]:
    return {"max_steps": 600, "val_check_interval": 200, "log_every_n_steps": 10, "limit_val_batches": 20}


@dataclass
class RunConfig(_YamlMixin):
    """A whole training run: each component receives only its own section. ``trainer`` holds Lightning Trainer
    arguments (validated against ``lightning.Trainer``'s signature)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: dict[str, Any] = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        import inspect

        from lightning import Trainer

        valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
        for k in self.trainer:
            _require(k in valid, f"unknown config key 'trainer.{k}' (not a lightning.Trainer argument)")
        seq = self.train.seq_len or self.model.max_seq_len
        _require(
            seq <= self.model.max_seq_len,
            f"train.seq_len ({seq}) must be <= model.max_seq_len ({self.model.max_seq_len})",
        )
        strategy = self.trainer.get("strategy")
        _require(
            not (isinstance(strategy, str) and strategy.startswith("fsdp") and self.optim.value_optimizer != "adamw"),
            "optim.value_optimizer=row_sparse_adam does not work with trainer.strategy=fsdp (FSDP flattens the value "
            "table's rows); use --optim.value_optimizer=adamw or another strategy",
        )

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len


def _merge_layers(paths: list[str | Path] | None, overrides: list[str] | dict | None) -> dict[str, Any]:
    """YAML files (merged in order), then overrides. A ``model:`` given as a string (in a YAML, or ``--model=FILE``)
    names a model YAML (relative to the including file or the working directory) that replaces the model section."""
    layers: list[tuple[dict[str, Any], Path]] = [(read_yaml(p), Path(p).parent) for p in paths or []]
    if isinstance(overrides, dict):
        layers.append((overrides, Path.cwd()))
    elif overrides:
        named = [a for a in overrides if a.startswith("--model=")]  # a model file first, field overrides on top
        layers += [({"model": a.split("=", 1)[1]}, Path.cwd()) for a in named]
        layers.append((parse_overrides([a for a in overrides if a not in named]), Path.cwd()))
    data: dict[str, Any] = {}
    for layer, base in layers:
        ref = layer.get("model")
        if isinstance(ref, str):
            path = Path(ref) if Path(ref).is_file() or Path(ref).is_absolute() else base / ref
            layer = {**layer, "model": read_yaml(path)}
            data.pop("model", None)  # a named model file replaces the model section instead of merging into it
        data = deep_merge(data, layer)
    return data


def load_run_config(paths: list[str | Path] | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """defaults < YAML files (merged in order) < overrides (``--a.b=c`` strings or a nested dict)."""
    data = _merge_layers(paths, overrides)
    if "trainer" in data:  # trainer args merge over the defaults instead of replacing them
        data["trainer"] = deep_merge(_default_trainer(), data["trainer"] or {})
    return from_dict(RunConfig, data)
