"""Data layer: corpora, SentencePiece tokenizer, worldfacts, QA datasets, and the packed-token DataModule.

The DataModule (which imports Lightning) is loaded lazily so QA / tokenizer users stay light.
"""

from memlm.data.corpus import Corpus, build_corpus
from memlm.data.errors import DataError
from memlm.data.facts import Fact, worldfacts, worldfacts_documents, worldfacts_qa
from memlm.data.qa import QADataset, load_qa
from memlm.data.tokenizer import Tokenizer

__all__ = [
    "Corpus", "DataError", "Fact", "LMDataModule", "QADataset", "Tokenizer", "build_corpus", "get_tokenizer",
    "load_qa", "prepare_tokens", "worldfacts", "worldfacts_documents", "worldfacts_qa",
]  # fmt: skip


def __getattr__(name: str):
    if name in ("LMDataModule", "get_tokenizer", "prepare_tokens"):
        from memlm.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'memlm.data' has no attribute {name!r}")
