"""Crash-safe file writes: whole files (temp file + fsync + rename) and append-only JSONL logs.

Used by training (checkpoints, loss curves), evaluation (per-example results) and continual runs (stage markers):

- :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: a reader (or a process killed at
  any instant) sees either the old file or the complete new one, never a prefix of it.
- :class:`JsonlLog`: one JSON record per line, flushed and fsynced per append; :func:`read_jsonl_log` ignores a final
  line cut short by a crash, so a re-run continues after the last complete record.
- :func:`mark_done` / :func:`is_done`: "stage X finished" marker files, written atomically after the stage's outputs.

Disk-full errors (``ENOSPC`` / ``EDQUOT``) leave the destination untouched and are re-raised as :class:`DiskFullError`
naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"  # every temp file written here is named ".<final name>.tmp-<random>" in the destination directory
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """No space left while writing ``path``; the previous content of ``path`` (if any) is intact."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _DISK_FULL


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give under the process umask (temp files are created private)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def chmod_tree(root: str | Path) -> None:
    """Give ``root`` and everything under it the umask's default modes (for trees assembled from private temp
    files, e.g. an export: readable by the other users of a shared machine as any file the user writes)."""
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, default_mode(directory=p.is_dir()))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], mode: int | None = None) -> Path:
    """Write ``path`` by calling ``write(fileobj)`` on a temp file in the same directory, then fsync and rename.

    On any error (or KeyboardInterrupt) the temp file is removed and ``path`` keeps its old content. ``mode``: the
    final file's mode (default: what the umask gives a new file).
    """
    mode = default_mode() if mode is None else mode
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    except OSError as e:  # read-only directory, a file in the way: name the file being written, not a temp name
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(e.errno, f"disk full while writing {path} (nothing was replaced; free space and retry)",
                                str(path)) from None  # fmt: skip
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object, indent: int | None = 1) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8"))


def remove_stale_temps(directory: str | Path, dirs: bool = False) -> list[Path]:
    """Delete temp files left in ``directory`` by a writer that was killed mid-write; returns what was removed.
    ``dirs``: also temp directories (``.<name>.tmp-*``, ``.<name>.old-*`` of :func:`memlm.export.save_pretrained`).
    Call it only while owning ``directory`` (its run's lock), so no live writer's temp file is taken."""
    import shutil

    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in [*d.glob(f".*{TMP_MARK}*"), *(d.glob(".*.old-*") if dirs else [])]:
            if p.is_file() and TMP_MARK in p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
            elif dirs and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# append-only JSONL logs (per-example results, per-step records)


def read_jsonl_log(path: str | Path) -> list[dict]:
    """The complete records of a :class:`JsonlLog` file ([] when absent). A last line without its newline — a write
    cut short by a crash — is ignored; a corrupt line elsewhere raises ``ValueError`` naming the line."""
    p = Path(path)
    if not p.is_file():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" when the file ends with a newline
    out = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{p}:{i}: corrupted record ({e}); delete the file to start over") from None
    del tail
    return out


class JsonlLog:
    """Append JSON records to ``path`` durably: each :meth:`append` writes whole lines, flushes and fsyncs.

    Opening truncates a torn last line left by a crash, so new records never glue onto a partial one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            raw = self.path.read_bytes()
            keep = raw.rfind(b"\n") + 1  # bytes up to the last complete line
            if keep != len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self._f = open(self.path, "ab")

    def append(self, *records: dict) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        try:
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(e.errno, f"disk full while appending to {self.path}", str(self.path)) from None
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict]:
        return iter(read_jsonl_log(self.path))


# ----------------------------------------------------------------------------------------------------------------------
# "done" markers for multi-stage jobs


def mark_done(directory: str | Path, stage: str, info: dict | None = None) -> Path:
    """Record that ``stage`` finished (call after its outputs are written); ``info`` is stored in the marker."""
    return atomic_write_json(Path(directory) / f".done.{stage}.json", {"stage": stage, **(info or {})})


def is_done(directory: str | Path, stage: str) -> dict | None:
    """The info stored by :func:`mark_done` for ``stage``, or None when the stage has not finished."""
    p = Path(directory) / f".done.{stage}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return None
