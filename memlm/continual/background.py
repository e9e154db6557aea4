"""Background slot statistics for sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory
Finetuning").

The pretrained model is run over ``B`` batches of its pretraining data; for every memory slot we record its
*document frequency* ``df(i)`` — in how many of those batches it was accessed (any token, head or top-k position;
the paper's unit) and in how many of the batches' sequences (``seq_df``, the finer unit for small models whose batch
reads much of the table) — and its total access count (the background distribution of the KL ranking). Statistics
are kept per value table (what SMF ranks and updates; Memory+ layers share one table) and per memory layer (for
inspection).

The statistics are saved beside the checkpoint with a sha256 of its weights and the settings they were counted with,
reused by later runs, and recomputed only when asked: statistics of another checkpoint are refused.
"""

from __future__ import annotations

import errno
import hashlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

FILE_NAME = "smf_background.pt"
FORMAT_VERSION = 2  # 2: + per-sequence document frequencies


class BackgroundError(ValueError):
    """Background statistics that cannot be used (another checkpoint, other settings, unreadable); says what to do."""


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and persistent buffer (names, shapes, dtypes and bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\x00".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def table_of_layers(model) -> list[list[int]]:
    """For each memory layer, the indices in ``model.value_tables()`` of every table its slot ids index: the value
    table, plus PEER's input experts / UltraMemV2's pre-values (one row per slot, the same rows)."""
    ids = {id(t): k for k, t in enumerate(model.value_tables())}
    return [[ids[id(t)] for t in layer.sparse_tables()] for layer in model.memory_layers]


def layer_counts(model, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per memory layer: (rows,) float64 access counts of its last forward (``last_indices`` (B, T, heads, knn)),
    over the positions where ``mask`` (B, T) is True (all positions when None)."""
    out = []
    for layer in model.memory_layers:
        idx = layer.last_indices
        if idx is None:
            raise RuntimeError("a memory layer kept no indices: run a forward with layer.record = True first")
        n_rows = layer.value_table.weight.shape[0]
        if mask is not None:
            idx = idx[mask.to(idx.device)]  # (M, heads, knn)
        out.append(torch.bincount(idx.reshape(-1), minlength=n_rows).double())  # (rows,)
    return out


def table_seq_df(model) -> list[torch.Tensor]:
    """Per value table: (rows,) int64 — in how many sequences of the last forward each row was read (by any layer
    that indexes the table, any position, head or top-k)."""
    tables = model.value_tables()
    ids: list[list[torch.Tensor]] = [[] for _ in tables]
    for ks, layer in zip(table_of_layers(model), model.memory_layers):
        idx = layer.last_indices  # (B, T, heads, knn)
        B = idx.shape[0]
        for k in ks:
            n_rows = tables[k].weight.shape[0]
            offset = torch.arange(B, device=idx.device).view(B, 1) * n_rows  # (B, 1): one id range per sequence
            ids[k].append(idx.reshape(B, -1) + offset)  # (B, T*heads*knn)
    out = []
    for k, t in enumerate(tables):
        n_rows = t.weight.shape[0]
        u = torch.unique(torch.cat(ids[k], dim=1))  # (U,) distinct (sequence, row) pairs
        out.append(torch.bincount(u % n_rows, minlength=n_rows).long().cpu())  # (rows,)
    return out


def table_counts(model, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per value table: (rows,) float64 access counts of the last forward, summed over the layers that read it."""
    tables = model.value_tables()
    out = [torch.zeros(t.weight.shape[0], dtype=torch.float64, device=t.weight.device) for t in tables]
    for ks, c in zip(table_of_layers(model), layer_counts(model, mask)):
        for k in ks:
            out[k] += c.to(out[k].device)
    return out


@dataclass
class BackgroundStats:
    """df and counts per value table and per memory layer, over ``n_batches`` background batches."""

    n_batches: int
    df: list[torch.Tensor]  # per table (rows,) int64: batches in which the row was accessed
    counts: list[torch.Tensor]  # per table (rows,) float64: total accesses
    layer_df: list[torch.Tensor]  # per memory layer (rows,) int64
    weights_hash: str
    settings: dict[str, Any] = field(default_factory=dict)
    seq_df: list[torch.Tensor] | None = None  # per table (rows,) int64: sequences in which the row was accessed
    n_seqs: int = 0

    def doc_freq(self, table: int, unit: str = "batch") -> tuple[torch.Tensor, int]:
        """(df, number of documents) of ``table`` for the IDF, with batches or sequences as the documents."""
        if unit == "sequence":
            if self.seq_df is None:
                raise BackgroundError(
                    "these background statistics have no per-sequence counts (smf.df_unit=sequence): pass "
                    "--smf.recompute_background=true to count them again"
                )
            return self.seq_df[table], self.n_seqs
        return self.df[table], self.n_batches

    def save(self, path: str | Path) -> Path:
        """Atomic write (temp file + rename): a crash never leaves a half-written statistics file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "n_batches": self.n_batches,
            "df": [d.cpu() for d in self.df],
            "counts": [c.cpu() for c in self.counts],
            "layer_df": [d.cpu() for d in self.layer_df],
            "weights_hash": self.weights_hash,
            "settings": self.settings,
            "seq_df": None if self.seq_df is None else [d.cpu() for d in self.seq_df],
            "n_seqs": self.n_seqs,
        }
        from memlm.utils.atomic import atomic_write

        return atomic_write(path, lambda f: torch.save(payload, f))  # temp ".<name>.tmp-*": the cleanup's naming

    @classmethod
    def load(cls, path: str | Path) -> BackgroundStats:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BackgroundError(f"{path} is not a readable background statistics file ({type(e).__name__}: {e})")
        if not isinstance(raw, dict) or raw.get("format") not in (1, FORMAT_VERSION):
            raise BackgroundError(f"{path} is not a memlm SMF background statistics file (format {FORMAT_VERSION})")
        return cls(raw["n_batches"], raw["df"], raw["counts"], raw["layer_df"], raw["weights_hash"], raw["settings"],
                   raw.get("seq_df"), raw.get("n_seqs", 0))  # fmt: skip

    def check(self, model, wh: str, settings: dict[str, Any], where: str) -> None:
        """Refuse statistics of another checkpoint or counted with other settings."""
        hint = "pass --smf.recompute_background=true to count them again for this checkpoint"
        if self.weights_hash != wh:
            raise BackgroundError(
                f"background statistics {where} belong to another checkpoint (weights sha256 {self.weights_hash[:12]}"
                f" != {wh[:12]}): {hint}"
            )
        diff = sorted(k for k in settings if self.settings.get(k) != settings[k])
        if diff:
            raise BackgroundError(f"background statistics {where} were counted with other settings ({diff}): {hint}")
        rows = [t.weight.shape[0] for t in model.value_tables()]
        if [d.numel() for d in self.df] != rows:
            raise BackgroundError(f"background statistics {where} do not match the model's value tables {rows}")
        for ks in table_of_layers(model):  # a layer's tables share its slot ids, so they share their counts
            if any(not torch.equal(self.df[ks[0]], self.df[k]) for k in ks[1:]):
                raise BackgroundError(
                    f"background statistics {where} predate counting every table a slot indexes (PEER input experts, "
                    f"UltraMemV2 pre-values): {hint}"
                )


@torch.no_grad()
def compute_background(
    model, batches, n_batches: int, wh: str, settings: dict[str, Any] | None = None, progress: bool = True
) -> BackgroundStats:
    """Run ``model`` over the first ``n_batches`` of ``batches`` (``(x, y)`` or ``x`` tensors) and count slot use."""
    if not model.memory_layers:
        raise BackgroundError("the model has no memory layers: there are no slots to count")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tables = model.value_tables()
    df = [torch.zeros(t.weight.shape[0], dtype=torch.int64) for t in tables]
    counts = [torch.zeros(t.weight.shape[0], dtype=torch.float64) for t in tables]
    layer_df = [torch.zeros(layer.value_table.weight.shape[0], dtype=torch.int64) for layer in model.memory_layers]
    seq_df = [torch.zeros(t.weight.shape[0], dtype=torch.int64) for t in tables]
    seen = n_seqs = 0
    bar = tqdm(total=n_batches, desc="SMF background counts", unit="batch", disable=not progress, leave=False)
    for batch in batches:
        if seen >= n_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(x.to(device))
        for k, c in enumerate(table_counts(model)):
            c = c.cpu()
            df[k] += (c > 0).long()
            counts[k] += c
        for j, c in enumerate(layer_counts(model)):
            layer_df[j] += (c.cpu() > 0).long()
        for k, d in enumerate(table_seq_df(model)):
            seq_df[k] += d
        n_seqs += x.shape[0]
        seen += 1
        bar.update(1)
    bar.close()
    model.train(was_training)
    if seen == 0:
        raise BackgroundError("no background batches: the pretraining data gave no batch")
    if seen < n_batches:
        warnings.warn(f"SMF background: the pretraining data gave only {seen} of smf.background_batches="
                      f"{n_batches} batches; the statistics use {seen}", stacklevel=2)  # fmt: skip
    return BackgroundStats(seen, df, counts, layer_df, wh, dict(settings or {}), seq_df, n_seqs)


def default_path(ckpt: str | Path) -> Path:
    """Beside the checkpoint: inside an export directory, or ``<name>.smf_background.pt`` next to a ``.ckpt``."""
    ckpt = Path(ckpt)
    return ckpt / FILE_NAME if ckpt.is_dir() else ckpt.with_name(f"{ckpt.stem}.{FILE_NAME}")


def pretraining_batches(data_cfg, tokenizer, seq_len: int, batch_size: int):
    """Shuffled ``(x, y)`` batches of the checkpoint's pretraining data (its packed-token cache when present)."""
    from memlm.data.datamodule import LMDataModule

    dm = LMDataModule(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm.train_dataloader()


def load_or_compute(
    model, tokenizer, ckpt: str | Path, run_config: dict[str, Any], smf, progress: bool = True
) -> tuple[BackgroundStats, Path, bool]:
    """The background statistics for ``model`` from ``ckpt``: reused when saved, else counted and saved.

    Args:
        run_config: the checkpoint's run config (its ``data`` section is the pretraining data).
        smf: :class:`memlm.config.SMFConfig`.
    Returns:
        (stats, path, computed_now).
    """
    from memlm.config import ConfigError, DataConfig, from_dict, to_dict
    from memlm.data.cache import sha256_json

    if smf.background_data is not None:
        data_cfg = smf.background_data
    else:
        try:
            data_cfg = from_dict(DataConfig, run_config.get("data") or {}, prefix="data")
        except ConfigError as e:
            msg = f"the checkpoint's data config does not load ({e}); set smf.background_data"
            raise BackgroundError(msg) from None
    seq_len = smf.background_seq_len or model.cfg.max_seq_len
    settings = {
        "batch_size": smf.background_batch_size,
        "seq_len": seq_len,
        "data": sha256_json(to_dict(data_cfg))[:16],
        "n_batches": smf.background_batches,
    }
    path = Path(smf.background_path) if smf.background_path else default_path(ckpt)
    wh = weights_hash(model)
    if not smf.background_path and not path.is_file() and fallback_path(wh, settings).is_file():
        path = fallback_path(wh, settings)  # saved there by an earlier run: the checkpoint's directory is read-only
    if path.is_file() and not smf.recompute_background:
        stats = BackgroundStats.load(path)
        stats.check(model, wh, settings, str(path))
        return stats, path, False
    batches = pretraining_batches(data_cfg, tokenizer, seq_len, smf.background_batch_size)
    stats = compute_background(model, batches, smf.background_batches, wh, settings, progress)
    try:
        stats.save(path)
    except OSError as e:  # a read-only export dir: keep the counts in the cache instead of failing after the work
        if smf.background_path or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        alt = fallback_path(wh, settings)
        stats.save(alt)
        print(f"note: cannot write SMF background statistics beside the checkpoint ({path}: {e.strerror}); saved "
              f"them to {alt} (set smf.background_path to choose)", file=sys.stderr)  # fmt: skip
        path = alt
    return stats, path, True


def fallback_path(wh: str, settings: dict[str, Any]) -> Path:
    """Where statistics go when the checkpoint's directory is read-only: the memlm cache, keyed by weights and
    settings (so a later run of the same checkpoint finds them)."""
    from memlm.data.cache import cache_root, sha256_json

    return cache_root() / "smf_background" / f"{wh[:20]}-{sha256_json(settings)[:12]}.pt"
