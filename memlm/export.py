"""Export directories: everything needed to rebuild a model without Lightning.

Layout of an export directory::

    config.yaml          the resolved run config (``model:`` section rebuilds the model; other sections are kept)
    model.safetensors    weights (shared / tied tensors stored once)
    tokenizer/           the SentencePiece tokenizer (optional)
    memlm_export.json    format marker + metadata (step, parameter count)

Writes are atomic: the directory is assembled under a temporary name and renamed into place, so a crash never leaves
a half-written export behind the final name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from memlm.config import ConfigError, ModelConfig, from_dict
from memlm.model import MemLM
from memlm.utils.atomic import chmod_tree, fsync_dir

MARKER = "memlm_export.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint / export that cannot be loaded; the message says which path and why."""


def save_pretrained(
    model: MemLM,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    run_config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (+ tokenizer and the run config) to ``out_dir`` atomically; returns the path."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config = dict(run_config or {})
        config["model"] = model.cfg.to_dict()
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        info = {"format": "memlm", "version": FORMAT_VERSION, "num_params": model.num_params(), **(meta or {})}
        (tmp / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
        chmod_tree(tmp)  # mkdtemp and safetensors write private (0700 / 0600) files: the umask's modes, as any file
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if out_dir.exists():  # replace: move the old one aside first, then swap, then delete
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise CheckpointError(
                f"disk full while writing the export {out_dir} (nothing was replaced; free space and retry)"
            ) from None
        raise
    return out_dir


def check_tokenizer(model: MemLM, tokenizer: Any, where: str | Path) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's (its ids would index past the embedding, or mean other
    tokens): one clear error instead of an index error deep inside torch."""
    if tokenizer is not None and tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.cfg.vocab_size}: use the tokenizer the model was trained with"
        )


def read_export_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / MARKER).is_file() or not (path / "config.yaml").is_file():
        raise CheckpointError(
            f"{path} is not a memlm export directory (expected {MARKER}, config.yaml and model.safetensors in it)"
        )
    try:
        return yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.yaml'} is corrupted: {e}") from None


def _model_config(raw: dict[str, Any], where: str) -> ModelConfig:
    try:
        return from_dict(ModelConfig, raw.get("model") or {}, prefix="model")
    except ConfigError as e:
        raise CheckpointError(f"{where}: its model config does not load: {e}") from None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from an export directory or a Lightning ``.ckpt`` written by ``train.py``.

    The tokenizer is None when the export has none (or ``with_tokenizer=False``). The model is returned in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        return _load_lightning_ckpt(path, device, with_tokenizer)
    raw = read_export_config(path)
    cfg = _model_config(raw, str(path))
    model = MemLM(cfg)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: model.safetensors is missing")
    _check_weight_shapes(model, weights, raw)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as e:  # safetensors raises several types for truncated / foreign files
        raise CheckpointError(f"{weights} is corrupted or not a safetensors file ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config.yaml "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer and (path / "tokenizer").exists():
        from memlm.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path / "tokenizer")
        check_tokenizer(model, tokenizer, path)
    return model, tokenizer


def _flat_config(d: dict[str, Any], prefix: str = "model") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _check_weight_shapes(model: MemLM, weights: Path, raw: dict[str, Any]) -> None:
    """Refuse a config.yaml that does not describe these weights, naming the first tensor whose shape disagrees and
    the config keys that set the disagreeing size (instead of "corrupted" and a long state-dict error)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return  # unreadable header: load_model's own error below says "corrupted"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    flat = _flat_config(raw.get("model") or {})
    for name, want in expected.items():
        got = shapes.get(name)
        if got is None or got == want:
            continue
        why = ""
        if len(got) == len(want):
            axis = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            keys = [k for k, v in flat.items() if isinstance(v, int) and not isinstance(v, bool) and v == want[axis]]
            if keys:
                why = f"; size {want[axis]} comes from {', '.join(keys[:4])} = {want[axis]} in config.yaml"
        raise CheckpointError(
            f"{weights.parent}: config.yaml does not match model.safetensors: tensor {name} has shape {list(got)} but "
            f"config.yaml gives {list(want)}{why} — use the config.yaml these weights were saved with"
        )


def verify_checkpoint_file(path: str | Path) -> None:
    """Check a ``torch.save`` file (a zip archive) end to end against the CRC-32 of every record, so a truncated or
    corrupted checkpoint is one clear :class:`CheckpointError` (``torch.load`` does not check the tensor bytes)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupted (record {bad} fails its checksum); use another checkpoint")


def _load_lightning_ckpt(path: Path, device, with_tokenizer: bool):
    verify_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    raw = hp.get("config") if isinstance(hp, dict) else None
    if not isinstance(raw, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a memlm training checkpoint (no memlm config in its hyper-parameters)")
    cfg = _model_config(raw, str(path))
    model = MemLM(cfg)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    tokenizer = None
    tok_path = hp.get("tokenizer_path")
    if with_tokenizer and tok_path and Path(tok_path).exists():
        from memlm.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tok_path)
        check_tokenizer(model, tokenizer, path)
    return model, tokenizer
