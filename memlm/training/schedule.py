"""Learning-rate schedules: linear warmup + cosine decay; value-group variants (fixed, UltraMem lambda decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

from memlm.config import OptimConfig


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier in [min_ratio, 1]: linear warmup over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def group_lambdas(groups: list[dict], cfg: OptimConfig, total_steps: int) -> list[Callable[[int], float]]:
    """One multiplier function per parameter group (LambdaLR multiplies each group's initial lr).

    The value group: with a fixed ``value_lr`` or ``value_schedule: constant`` only the warmup applies; otherwise it
    follows the base schedule. With ``value_lr_decay_to`` its multiplier moves linearly from ``value_lr_mult`` to that
    value over training (UltraMem: lambda x -> 1x), on top of the base schedule.
    """

    def base(step: int) -> float:
        return warmup_cosine(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)

    def value(step: int) -> float:
        if cfg.value_lr is not None or cfg.value_schedule == "constant":
            f = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        else:
            f = base(step)
        if cfg.value_lr_decay_to is not None:
            progress = min(1.0, step / max(1, total_steps))
            mult = cfg.value_lr_mult + (cfg.value_lr_decay_to - cfg.value_lr_mult) * progress
            f *= mult / cfg.value_lr_mult  # the group's initial lr already includes value_lr_mult
        return f

    return [value if g.get("name") == "memory_values" else base for g in groups]
