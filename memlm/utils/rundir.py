"""Output directories a run owns: refused when they hold something else, locked while a run writes them.

Shared by ``train.py`` (``<run_dir>/<name>``), the continual script (``<out_dir>/<name>``) and the evaluation CLIs.
The rules (see docs/reliability.md):

- a run never deletes or overwrites what it did not write: an existing, non-empty directory is refused unless the run
  resumes it (``train.py --ckpt_path``; a continual run with the same config);
- the directory is created atomically (``mkdir``), so of two runs started with one name only one gets it;
- while a run owns the directory it holds an exclusive ``flock`` on ``<dir>/.lock`` (released by the kernel when the
  process dies, even by SIGKILL), so a second run — fresh or resuming — is refused instead of mixing its files in;
- a directory this run created is removed again when the run fails before writing anything into it.

Errors are :class:`RunDirError` (a :class:`~memlm.config.ConfigError`): one line naming the path and what to do.
:func:`describe_os_error` turns the OSErrors users cause (read-only or full disks, a file where a directory belongs)
into such a line.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from memlm.config import ConfigError

LOCK_FILE = ".lock"
try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic mkdir still separates fresh runs
    fcntl = None


_HELD: dict[str, RunDir] = {}  # directories this process owns (so an entry point can release them on an error)


class RunDirError(ConfigError):
    """An output directory that cannot be used (exists, locked by another run, a file, not writable)."""


def check_name(name: str, key: str) -> None:
    """A run name is one plain directory name (``..`` or ``a/../b`` would point the run at another directory)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise RunDirError(f"{key} must be a plain directory name (no '/', not '.' or '..'), got {name!r}")


def _is_lock_only(path: Path) -> bool:
    return all(p.name == LOCK_FILE for p in path.iterdir())


def _probe_writable(directory: Path, what: str) -> None:
    """Create and remove a file in ``directory``: a read-only directory is one clear error before any work."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{what} {directory} is not writable ({e.strerror}): choose a writable location") from None


def ensure_writable_dir(directory: str | Path, what: str) -> tuple[Path, list[Path]]:
    """Make sure ``directory`` is (or can be created as) a writable directory; returns it and the directories created
    (so a caller that fails later can remove exactly those)."""
    d = Path(directory)
    created: list[Path] = []
    for p in [*reversed(d.parents), d]:
        if p.exists() and not p.is_dir():
            raise RunDirError(f"{what} {d}: {p} is a file, not a directory: choose another path")
    missing = [p for p in [*reversed(d.parents), d] if not p.exists()]
    try:
        for p in missing:
            p.mkdir()
            created.append(p)
    except FileExistsError:
        pass  # created meanwhile by another process
    except OSError as e:
        raise RunDirError(f"cannot create {what} {d} ({e.strerror}): choose a writable location") from None
    _probe_writable(d, what)
    return d, created


class RunDir:
    """An output directory owned by this process (see the module docstring). Use :meth:`claim`, then
    :meth:`release` (or ``with``)."""

    def __init__(self, path: Path, created: list[Path], fd: int | None) -> None:
        self.path, self.created, self._fd = path, created, fd

    @classmethod
    def claim(cls, path: str | Path, *, resume: bool, what: str, hint: str, lock: bool = True) -> RunDir:
        """Create ``path`` (refused if it exists with content, unless ``resume``) and lock it.

        Args:
            resume: the run continues what is in ``path`` (it must then exist, or is created).
            what: how the error names the directory (e.g. ``"run directory"``).
            hint: what the user can do when the directory exists (e.g. ``"resume it with --ckpt_path last"``).
            lock: take the lock (False on non-zero DDP ranks: rank 0 owns the directory).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{what} {path} is a file, not a directory: choose another name or location")
        held = _HELD.pop(str(path.resolve()), None)
        if held is not None:  # left locked by an earlier call in this process that failed: ours to take again
            held.release(failed=True)
        created: list[Path] = []
        if not path.is_dir():
            _, created = ensure_writable_dir(path.parent, f"parent directory of the {what}")
        if not lock:
            return cls(path, created, None)
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            if not path.is_dir():
                raise RunDirError(f"{what} {path} is a file, not a directory: choose another name") from None
            if not resume and not _is_lock_only(path):
                raise RunDirError(
                    f"{what} {path} already exists and holds another run's files; {hint}, pick another name, or "
                    "delete it yourself (nothing is ever overwritten)"
                ) from None
        except OSError as e:
            raise RunDirError(f"cannot create {what} {path} ({e.strerror}): choose a writable location") from None
        fd = cls._lock(path, what)
        try:
            _probe_writable(path, what)  # a read-only run dir fails now, not at its first checkpoint
        except RunDirError:
            os.close(fd)
            raise
        owned = cls(path, created, fd)
        _HELD[str(path.resolve())] = owned
        return owned

    @staticmethod
    def _lock(path: Path, what: str) -> int | None:
        lock = path / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"{what} {path} is not writable ({e.strerror}): choose a writable location") from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"
            except (OSError, ValueError):
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(
                    f"{what} {path} is in use by another running job{holder}: wait for it to finish or use another name"
                ) from None
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return fd

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failure, remove the directories this run created if nothing but the lock was written."""
        if _HELD.get(str(self.path.resolve())) is self:
            del _HELD[str(self.path.resolve())]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if failed:
            for d in reversed(self.created):
                try:
                    if d.is_dir() and _is_lock_only(d):
                        (d / LOCK_FILE).unlink(missing_ok=True)
                        d.rmdir()
                except OSError:
                    break
        self.created = []

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def check_new_file(path: str | Path, what: str, resumable: Path | None = None) -> Path:
    """Before any work: ``path`` can be written as a new file (not a directory, not an existing file — it is never
    overwritten — in a writable directory, created if missing). ``resumable``: the partial-results file whose
    presence makes this a resumed run (then ``path`` may not exist yet either way)."""
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{what} {path} is a directory: give the path of the file to write")
    if path.exists():
        raise RunDirError(f"{what} {path} already exists (written by an earlier run): choose another path or delete it")
    ensure_writable_dir(path.parent, f"the directory of {what}")
    return path


def release_all(failed: bool = True) -> None:
    """Release every directory this process still owns (an entry point's error handler: a run that failed before
    writing anything leaves no empty directory behind)."""
    for owned in list(_HELD.values()):
        owned.release(failed=failed)


def finished_run(path: str | Path, config: dict, done_file: str, config_file: str = "config.yaml") -> dict | None:
    """The JSON of ``path/done_file`` when ``path`` holds a finished run of exactly ``config`` (its
    ``config_file``), else None — so a re-launched finished run is reused instead of refused or redone."""
    import yaml

    path = Path(path)
    if not (path / done_file).is_file() or not (path / config_file).is_file():
        return None
    try:
        saved = yaml.safe_load((path / config_file).read_text(encoding="utf-8"))
        want = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))
        if saved != want:
            return None
        return json.loads((path / done_file).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def claim_or_reuse(
    path: str | Path, config: dict, done_file: str, what: str, hint: str
) -> tuple[RunDir | None, dict | None]:
    """For a job whose outputs are one directory: ``(None, done)`` when ``path`` holds a finished run of exactly
    ``config`` (reuse it: nothing is recomputed or rewritten), else ``(owned, None)`` with ``path`` created and locked;
    an existing directory with anything else in it is refused (never deleted)."""
    path = Path(path)
    done = finished_run(path, config, done_file)
    if done is not None:
        return None, done
    return RunDir.claim(path, resume=False, what=what, hint=hint), None


# ----------------------------------------------------------------------------------------------------------------------
# OSErrors users cause, as one line

_USER_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system",
                errno.ENOTDIR: "a file is where a directory belongs", errno.EISDIR: "it is a directory",
                errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded",
                errno.ENAMETOOLONG: "file name too long"}  # fmt: skip


def describe_os_error(e: BaseException) -> str | None:
    """One line for an OSError a user can fix (permissions, read-only or full disk, file vs directory), else None."""
    if not isinstance(e, OSError) or e.errno not in _USER_ERRNOS:
        return None
    where = e.filename or ""
    msg = f"cannot write {where}: {_USER_ERRNOS[e.errno]}" if where else f"{_USER_ERRNOS[e.errno]} ({e})"
    cache = os.environ.get("MEMLM_CACHE")
    if where and cache and str(where).startswith(str(Path(cache).expanduser())):
        msg += " (under $MEMLM_CACHE: set MEMLM_CACHE to a writable directory)"
    elif e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        msg += " (free space and retry)"
    else:
        msg += " (choose a writable location)"
    return msg
