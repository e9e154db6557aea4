"""LightningDataModule for pretraining: tokenize once, pack into a flat token memmap, serve ``(x, y)`` windows.

``prepare_data`` (one process per node) builds the corpus, gets the tokenizer (trained and cached by corpus hash unless
one is given), splits documents into train / val by a seeded hash of their text (so repeated documents of a weighted
source never straddle the split), encodes each document as ``bos + tokens + eos`` and writes ``train.bin`` /
``val.bin`` (uint16, or uint32 for vocabularies over 65,536) plus ``meta.json`` into a cache directory keyed by
corpus hash + tokenizer hash + split settings. Fixed-length packing is a view: sequence ``i`` of length ``T`` is
``tokens[i*T : i*T + T + 1]``, so one prepared stream serves every ``seq_len``. ``setup`` (every process) only maps
the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from memlm.config import DataConfig
from memlm.data.cache import atomic_write_json, cache_root, sha256_json
from memlm.data.corpus import Corpus, build_corpus
from memlm.data.errors import DataError, log
from memlm.data.tokenizer import Tokenizer
from memlm.utils.atomic import atomic_write
from memlm.utils.progress import LoopProgress

FORMAT_VERSION = 1


def get_tokenizer(cfg: DataConfig, corpus: Corpus | None = None) -> Tokenizer:
    """The tokenizer of ``cfg``: loaded from ``tokenizer.path``, else trained on the corpus (cached by its hash)."""
    t = cfg.tokenizer
    if t.path:
        return Tokenizer.load(t.path)
    corpus = corpus if corpus is not None else build_corpus(cfg)
    tok = Tokenizer.train(corpus.documents, t.vocab_size, t.model_type, cache_dir=cfg.cache_dir,
                          corpus_hash=corpus.hash, input_sentence_size=t.input_sentence_size,
                          character_coverage=t.character_coverage)  # fmt: skip
    log.info("tokenizer ready: vocab %d, sha256 %s", tok.vocab_size, tok.hash[:12])
    return tok


def in_val(doc: str, val_fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}\x00{doc}".encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


class PackedTokens(Dataset):
    """Windows of a flat token file: item ``i`` -> ``(x, y)``, each int64 ``(T,)``, ``y`` = ``x`` shifted by one."""

    def __init__(self, path: str | Path, dtype: str, n_tokens: int, seq_len: int):
        self.path, self.dtype, self.n_tokens, self.seq_len = str(path), dtype, n_tokens, seq_len
        self._mm: np.memmap | None = None  # opened lazily, so the dataset pickles cheaply into workers

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        T = self.seq_len
        chunk = torch.from_numpy(self._mm[i * T : i * T + T + 1].astype(np.int64))  # (T+1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None}


def _write_stream(path: Path, docs: list[str], tok: Tokenizer, dtype: np.dtype, desc: str) -> int:
    """Encode ``docs`` in batches into ``path`` (via a temp file of its own, so runs that share a cache and build the
    same files at once do not collide); returns the number of tokens."""
    n = 0

    def write(f) -> None:
        nonlocal n
        with LoopProgress(len(docs), desc, unit="doc") as bar:
            for start in range(0, len(docs), 2048):
                batch = docs[start : start + 2048]
                ids = tok.encode_batch(batch, bos=True, eos=True)
                flat = np.fromiter((i for seq in ids for i in seq), dtype=dtype)
                f.write(flat.tobytes())
                n += flat.size
                bar.update(len(batch))

    atomic_write(path, write)
    return n


def prepare_tokens(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Path:
    """Build (or find) the packed token files of ``cfg``; returns their directory. A cache hit does no encoding."""
    corpus = build_corpus(cfg)
    log.info("corpus: %d documents, %.2f MB, hash %s", len(corpus), corpus.n_bytes / 1e6, corpus.hash[:12])
    tok = tokenizer or get_tokenizer(cfg, corpus)
    settings = {"corpus": corpus.hash, "tokenizer": tok.hash, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                "format": FORMAT_VERSION}  # fmt: skip
    out = cache_root(cfg.cache_dir) / "packed" / sha256_json(settings)[:20]
    meta_file = out / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        ok = {k: meta.get(k) for k in settings} == settings and all(
            (out / f"{s}.bin").is_file()
            and (out / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * np.dtype(meta["dtype"]).itemsize
            for s in ("train", "val")
        )
        if ok:
            return out
        log.warning("packed data in %s is incomplete or from another corpus/tokenizer; rebuilding", out)
    out.mkdir(parents=True, exist_ok=True)
    val = [d for d in corpus.documents if in_val(d, cfg.val_fraction, cfg.seed)]
    train = [d for d in corpus.documents if not in_val(d, cfg.val_fraction, cfg.seed)]
    if not train:
        raise DataError(f"every document fell into the validation split; lower data.val_fraction ({cfg.val_fraction})")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    n_train = _write_stream(out / "train.bin", train, tok, dtype, "tokenizing train")
    n_val = _write_stream(out / "val.bin", val, tok, dtype, "tokenizing val")
    tok.save(out / "tokenizer")
    meta = {**settings, "dtype": dtype.name, "train_tokens": n_train, "val_tokens": n_val,
            "train_documents": len(train), "val_documents": len(val), "corpus_bytes": corpus.n_bytes,
            "vocab_size": tok.vocab_size, "sources": corpus.stats}  # fmt: skip
    atomic_write_json(meta_file, meta)  # written last: its presence marks a complete build
    log.info("packed %d train + %d val tokens into %s", n_train, n_val, out)
    return out


class EpochSampler(Sampler[int]):
    """A deterministic, resumable sample order, the same with or without DDP.

    Epoch ``e`` visits ``randperm(n, seed + e)`` (or ``0..n-1`` without shuffling), cut to a multiple of
    ``world_size``; rank ``r`` takes every ``world_size``-th index from ``r`` (as ``DistributedSampler`` does, so a
    global batch under DDP holds the same samples as one process with the whole batch). ``set_epoch`` picks the epoch
    (Lightning calls it at every epoch start); ``start`` skips that many of this rank's samples at the next iteration,
    which is how a resumed run continues mid-epoch exactly where its checkpoint was taken.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.total = n - n % world_size  # drop the tail so every rank gets the same number of samples
        self.epoch, self.start = 0, 0
        self.iter_epoch, self.iter_start = 0, 0  # epoch / start of the iteration in progress

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))  # (n,)
        else:
            idx = torch.arange(self.n)
        return idx[: self.total][self.rank :: self.world_size].tolist()  # (total / world_size,)

    def __iter__(self):
        self.iter_epoch, self.iter_start = self.epoch, self.start
        self.start = 0  # skip only once
        return iter(self.order(self.epoch)[self.iter_start :])

    def __len__(self) -> int:
        return self.total // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def identity(self) -> dict:
        return {"n": self.n, "shuffle": self.shuffle, "seed": self.seed, "world_size": self.world_size}


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` that reports its position (``state_dict``) and restores it
    (``load_state_dict``). Lightning 2.x saves the state of such "stateful" train loaders in every checkpoint and
    restores it before iterating, so a run resumed mid-epoch sees exactly the batches the uninterrupted run would.
    The position counts batches handed to the training loop (not batches prefetched by workers)."""

    _consumed = 0

    def __iter__(self):
        return self._counting(super().__iter__())

    def _counting(self, it):
        self._consumed = 0
        for batch in it:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        s: EpochSampler = self.sampler
        done = min(s.iter_start + self._consumed * (self.batch_size or 1), len(s))
        return {"epoch": s.iter_epoch, "start": done, **s.identity()}

    def load_state_dict(self, state: dict) -> None:
        s: EpochSampler = self.sampler
        if {k: state.get(k) for k in s.identity()} != s.identity():
            log.warning(
                "the training data changed since the checkpoint (%s -> %s): the epoch restarts from its beginning",
                {k: state.get(k) for k in s.identity()}, s.identity(),
            )  # fmt: skip
            s.epoch, s.start = int(state.get("epoch", 0)), 0
        else:
            s.epoch, s.start = int(state["epoch"]), int(state["start"])
        s.iter_epoch, s.iter_start, self._consumed = s.epoch, s.start, 0


class LMDataModule(L.LightningDataModule):
    """Packed next-token batches ``(x, y)``, both int64 ``(B, T)``, from a :class:`DataConfig`."""

    def __init__(
        self,
        data_cfg: DataConfig,
        tokenizer: Tokenizer | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.cfg, self.seq_len, self.batch_size = data_cfg, seq_len, batch_size
        self.num_workers = data_cfg.num_workers if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self._tokenizer = tokenizer
        self.data_dir: Path | None = None
        self.meta: dict = {}
        self.train_set: PackedTokens | None = None
        self.val_set: PackedTokens | None = None

    def _pointer(self) -> Path:
        key = sha256_json({"cfg": self.cfg.to_dict(), "tokenizer": self._tokenizer.hash if self._tokenizer else None})
        return cache_root(self.cfg.cache_dir) / "packed" / "by_config" / f"{key[:20]}.json"

    def prepare_data(self) -> None:
        self.data_dir = prepare_tokens(self.cfg, self._tokenizer)
        atomic_write_json(self._pointer(), {"dir": str(self.data_dir)})

    def setup(self, stage: str | None = None) -> None:
        if self.data_dir is None:  # another process than the one that ran prepare_data
            ptr = self._pointer()
            if not ptr.is_file():
                raise DataError("LMDataModule.setup: no prepared data for this config; call prepare_data() first")
            self.data_dir = Path(json.loads(ptr.read_text())["dir"])
        self.meta = json.loads((self.data_dir / "meta.json").read_text())
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.data_dir / "tokenizer")
        d, T = self.meta["dtype"], self.seq_len
        self.train_set = PackedTokens(self.data_dir / "train.bin", d, self.meta["train_tokens"], T)
        self.val_set = PackedTokens(self.data_dir / "val.bin", d, self.meta["val_tokens"], T)
        if len(self.train_set) == 0:
            raise DataError(f"the corpus has {self.meta['train_tokens']} train tokens, too few for seq_len={T}")
        if self.cfg.val_fraction > 0 and len(self.val_set) == 0:
            raise DataError(
                f"the validation split has {self.meta['val_tokens']} tokens, fewer than seq_len+1={T + 1}: "
                "raise data.val_fraction or lower seq_len"
            )

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the data was encoded with (save it beside checkpoints)."""
        if self._tokenizer is None:
            raise DataError("the tokenizer is known after prepare_data()/setup()")
        return self._tokenizer

    def _loader(self, ds: PackedTokens | None, shuffle: bool, resumable: bool = False) -> DataLoader:
        if ds is None:
            raise DataError("call setup() before asking for a dataloader")
        # We shard ourselves under DDP (the launcher sets use_distributed_sampler=False), so data.shuffle is honoured
        # (Lightning's automatic sampler would always shuffle) and the order can be restored mid-epoch on resume.
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
        sampler = EpochSampler(len(ds), shuffle=shuffle, seed=self.cfg.seed, rank=rank, world_size=world)
        cls = ResumableDataLoader if resumable else DataLoader
        # its own generator: creating an iterator draws a worker base seed, which must not consume the global RNG
        return cls(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                   pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                   generator=torch.Generator().manual_seed(self.cfg.seed))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=self.cfg.shuffle, resumable=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
