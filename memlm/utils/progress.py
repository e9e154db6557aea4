"""Progress of long loops outside the Lightning loop (data preparation, evaluation): a bar on a terminal, else one
plain line every so often through the ``memlm`` logger. Training's own progress is ``memlm.training.progress``."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def bar_width_kwargs(stream: TextIO | None = None) -> dict:
    """tqdm size settings: follow the terminal's size, or a fixed 100 x 20 when the terminal reports a size of 0
    (some pseudo-terminals do; tqdm would then print nothing)."""
    stream = stream or sys.stdout
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 20}


def fmt_duration(seconds: float) -> str:
    """``75 -> '1m15s'``, ``4000 -> '1h06m'``."""
    if seconds != seconds or seconds == float("inf"):  # NaN / inf: no estimate yet
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M tok/s"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k tok/s"
    return f"{tokens_per_s:.0f} tok/s"


class LoopProgress:
    """Progress of a loop with a known total (documents tokenized, questions answered): a tqdm bar on a terminal,
    else one line through ``log`` every ``every_s`` seconds and one at the end.

    Usage: ``with LoopProgress(len(docs), "tokenizing train", unit="doc") as p: ... p.update(n)``.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 30.0,
                 log: logging.Logger | None = None) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.log = log or logging.getLogger("memlm")
        self.n = 0
        self._bar = None
        self._t0 = self._last = time.perf_counter()

    def __enter__(self) -> LoopProgress:
        if is_terminal(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False, file=sys.stderr,
                             **bar_width_kwargs(sys.stderr))  # fmt: skip
        return self

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        el = (now or time.perf_counter()) - self._t0
        rate = self.n / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:3.0f}%) | {rate:.0f} {self.unit}/s | "
                f"elapsed {fmt_duration(el)} | ETA {fmt_duration(eta)}")  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        if exc[0] is None:
            self.log.info("%s", self.line().split(" | ETA")[0])
