"""SentencePiece tokenizer (unigram or BPE, byte fallback), trained on a corpus and cached by its hash.

Special ids are fixed: ``unk=0, bos=1, eos=2, pad=3``. A trained tokenizer is a directory with ``tokenizer.model``
(the SentencePiece proto) and ``tokenizer.json`` (metadata: vocab size, model type, corpus hash, sha256 of the model).
Save it beside a checkpoint with :meth:`Tokenizer.save`; :meth:`Tokenizer.load` never retrains.

Training is deterministic byte for byte: the saved proto carries no temp-file paths or thread counts (SentencePiece
records its ``input``, ``model_prefix`` and ``num_threads`` in the model), so the same corpus and settings give the
same sha256 after the cache is rebuilt. :attr:`Tokenizer.content_hash` hashes only what encodes text (the same
canonical form), so tokenizers saved before this still match their retrained twins.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from memlm.data.cache import atomic_write_bytes, atomic_write_json, cache_root, sha256_bytes, sha256_file, sha256_json
from memlm.data.errors import DataError, log

MODEL_FILE, META_FILE = "tokenizer.model", "tokenizer.json"
FORMAT_VERSION = 2  # bumped when training settings change
MAX_SENTENCE_BYTES = 16384  # SentencePiece skips longer input lines
_RUN_FIELDS = ("input", "model_prefix", "num_threads")  # trainer_spec fields that depend on the machine, not the result


def canonical_proto(model_proto: bytes) -> bytes:
    """The model proto without the trainer fields that name temp paths or the machine's thread count."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(model_proto)
    for f in _RUN_FIELDS:
        m.trainer_spec.ClearField(f)
    return m.SerializeToString(deterministic=True)


class Tokenizer:
    """A thin wrapper over ``SentencePieceProcessor`` with bos/eos/pad ids and batch encoding."""

    def __init__(self, model_proto: bytes, meta: dict | None = None):
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.proto = model_proto
        self.meta = dict(meta or {})
        self.hash = sha256_bytes(model_proto)

    @property
    def content_hash(self) -> str:
        """sha256 of :func:`canonical_proto`: equal for tokenizers that differ only in where they were trained."""
        try:
            return sha256_bytes(canonical_proto(self.proto))
        except Exception:  # no protobuf runtime: the file hash (canonical for tokenizers trained by this version)
            return self.hash

    # ids
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    # encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text, out_type=int)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        ids = self.sp.encode(list(texts), out_type=int, num_threads=num_threads)
        pre, post = [self.bos_id] * bos, [self.eos_id] * eos
        return [pre + x + post for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, type={self.meta.get('model_type')}, sha256={self.hash[:12]})"

    # files
    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.model`` + ``tokenizer.json`` into ``directory``; returns the directory."""
        d = Path(directory)
        atomic_write_bytes(d / MODEL_FILE, self.proto)
        atomic_write_json(d / META_FILE, {**self.meta, "vocab_size": self.vocab_size, "sha256": self.hash})
        return d

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a saved directory or a bare ``.model`` file."""
        p = Path(path).expanduser()
        model = p / MODEL_FILE if p.is_dir() else p
        if not model.is_file():
            raise DataError(f"tokenizer not found: {model} (expected a directory with {MODEL_FILE} or a .model file)")
        meta_file = model.parent / META_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        proto = model.read_bytes()
        if meta.get("sha256") and meta["sha256"] != sha256_bytes(proto):
            raise DataError(f"tokenizer {model} does not match the sha256 in {meta_file}: the files were mixed up")
        try:
            return cls(proto, meta)
        except RuntimeError as e:
            raise DataError(f"{model} is not a SentencePiece model ({e})") from None

    @classmethod
    def train(
        cls,
        texts_or_file: Iterable[str] | str | Path,
        vocab_size: int,
        model_type: str = "unigram",
        cache_dir: str | Path | None = None,
        corpus_hash: str | None = None,
        input_sentence_size: int = 300_000,
        character_coverage: float = 0.9995,
    ) -> Tokenizer:
        """Train on documents (or a text file), or return the cached tokenizer for the same corpus and settings.

        The cache key is ``corpus_hash`` (computed from the input if not given) plus every training setting, so a
        different corpus never reuses a tokenizer. SentencePiece samples ``input_sentence_size`` lines, which keeps
        training to seconds on a few MB.
        """
        if model_type not in ("unigram", "bpe"):
            raise DataError(f"tokenizer model_type must be 'unigram' or 'bpe', got {model_type!r}")
        is_file = isinstance(texts_or_file, (str, Path))
        texts = None if is_file else list(texts_or_file)
        if corpus_hash is None:
            if is_file:
                if not Path(texts_or_file).is_file():
                    raise DataError(f"tokenizer training file not found: {texts_or_file}")
                corpus_hash = sha256_file(texts_or_file)
            else:
                corpus_hash = sha256_json(texts)
        settings = {"corpus": corpus_hash, "vocab_size": vocab_size, "model_type": model_type,
                    "input_sentence_size": input_sentence_size, "character_coverage": character_coverage,
                    "format": FORMAT_VERSION}  # fmt: skip
        out = cache_root(cache_dir) / "tokenizers" / sha256_json(settings)[:20]
        if (out / MODEL_FILE).is_file() and (out / META_FILE).is_file():
            tok = cls.load(out)
            if all(tok.meta.get(k) == v for k, v in settings.items()):
                return tok
            log.warning("tokenizer cache %s does not match this corpus/settings; retraining", out)
        with tempfile.TemporaryDirectory(prefix="memlm-spm-") as tmp:
            if is_file:
                inp = str(texts_or_file)
            else:
                inp = os.path.join(tmp, "input.txt")
                with open(inp, "w", encoding="utf-8") as f:
                    for t in texts:  # one line per sentence/paragraph; blank lines carry nothing
                        for line in t.splitlines():
                            if line.strip():
                                f.write(line.strip() + "\n")
                if os.path.getsize(inp) == 0:
                    raise DataError("cannot train a tokenizer on an empty corpus")
                _check_line_lengths(inp)
            log.info("training SentencePiece %s tokenizer, vocab %d", model_type, vocab_size)
            try:
                spm.SentencePieceTrainer.train(
                    input=inp, model_prefix=os.path.join(tmp, "sp"), vocab_size=vocab_size, model_type=model_type,
                    byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, split_digits=True,
                    user_defined_symbols=["\n"],  # keep newlines (QA prompts stop on them); NFKC maps them to spaces
                    input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                    character_coverage=character_coverage, max_sentence_length=MAX_SENTENCE_BYTES,
                    num_threads=os.cpu_count() or 1, minloglevel=2,
                )  # fmt: skip
            except RuntimeError as e:
                msg = str(e)
                if is_file:
                    _check_line_lengths(inp)
                if "Vocabulary size" in msg or "vocab_size" in msg:
                    raise DataError(f"tokenizer: vocab_size {vocab_size} too large for this corpus ({msg})") from None
                raise DataError(f"SentencePiece training failed: {msg}") from None
            proto = Path(tmp, "sp.model").read_bytes()
        try:
            proto = canonical_proto(proto)  # no temp path / thread count: the same settings give the same bytes
        except Exception as e:  # no protobuf runtime: the proto stays as SentencePiece wrote it
            log.warning("tokenizer: could not canonicalize the model proto (%s); its sha256 names a temp path", e)
        tok = cls(proto, settings)
        tok.save(out)
        return tok


def _check_line_lengths(path: str) -> None:
    """SentencePiece silently skips lines over :data:`MAX_SENTENCE_BYTES`; a corpus made only of such lines fails deep
    inside it. Refuse it with the fix named."""
    longest = 0
    with open(path, "rb") as f:
        for line in f:
            n = len(line.rstrip(b"\r\n"))
            if 0 < n <= MAX_SENTENCE_BYTES:
                return
            longest = max(longest, n)
    if longest > MAX_SENTENCE_BYTES:
        raise DataError(
            f"cannot train a tokenizer: every line of the corpus is longer than {MAX_SENTENCE_BYTES} bytes (the "
            f"longest has {longest}) and SentencePiece skips such lines; split the text into lines or paragraphs"
        )
