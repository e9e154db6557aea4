"""Shared helpers of the evaluation tests: a tiny SentencePiece tokenizer, a tiny random MemLM and its export."""

from __future__ import annotations

from pathlib import Path

import torch

from memlm import MemLM, save_pretrained
from memlm.config import MemoryConfig, ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Peru is Lima.",
    "Question: What is the capital of Kenya?\nAnswer: Nairobi",
    "Gold has the chemical symbol Au. Iron has the chemical symbol Fe, and its atomic number is 26.",
    "Kenya is a country in Africa. Japan is a country in Asia. The currency of Japan is the yen.",
    "William Shakespeare wrote Hamlet, Macbeth and many other plays, poems and sonnets.",
    "A spider has eight legs; an insect has six legs. Numbers: 1, 2, 3, 8, 26, 1000.",
]


def tiny_tokenizer(cache_dir: Path):
    from memlm.data.tokenizer import Tokenizer

    return Tokenizer.train(CORPUS * 20, vocab_size=320, cache_dir=cache_dir)


def tiny_model(vocab_size: int, max_seq_len: int = 64, seed: int = 0) -> MemLM:
    torch.manual_seed(seed)
    mem = MemoryConfig(kind="pkm", layers=[1], n_keys=8, heads=2, knn=4, k_dim=16)
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len, memory=mem)
    return MemLM(cfg).eval()


def tiny_export(out: Path, cache_dir: Path, seed: int = 0) -> Path:
    tok = tiny_tokenizer(cache_dir)
    model = tiny_model(tok.vocab_size, seed=seed)
    return save_pretrained(model, out, tokenizer=tok)
