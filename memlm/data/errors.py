"""The one error type of the data layer: a user-fixable data problem, naming the file (and line) to fix."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("memlm.data")


class DataError(ValueError):
    """Bad or missing data: the message names the file (and line) or the setting to change."""


def where(path: str | Path, line: int | None = None) -> str:
    """``file:line`` for messages."""
    return f"{path}:{line}" if line is not None else str(path)


class BadRows:
    """Raise on the first bad row, or (``skip=True``) count skipped rows and warn once with the total."""

    def __init__(self, source: str | Path, skip: bool = False):
        self.source = str(source)
        self.skip = skip
        self.count = 0
        self.first: str | None = None

    def bad(self, line: int | None, reason: str) -> None:
        msg = f"{where(self.source, line)}: {reason}"
        if not self.skip:
            raise DataError(msg + " (set on_error='skip' to skip such rows with a warning)")
        self.count += 1
        if self.first is None:
            self.first = msg

    def report(self) -> int:
        if self.count:
            log.warning("skipped %d bad row(s) in %s; first: %s", self.count, self.source, self.first)
        return self.count


def utf8_error(path: str | Path, raw: bytes, e: UnicodeDecodeError) -> DataError:
    """A DataError naming the line of the first byte that is not UTF-8."""
    line = raw.count(b"\n", 0, e.start) + 1
    return DataError(f"{where(path, line)}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8")


def jsonl_records(path: str | Path, bad: BadRows) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line of a JSONL file; lines that are not UTF-8 or not JSON are
    reported to ``bad`` (an error naming file:line, or a counted skip)."""
    for i, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.bad(i, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})")
            continue
        except json.JSONDecodeError as e:
            bad.bad(i, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        yield i, rec
