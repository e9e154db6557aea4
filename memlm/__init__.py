"""memlm: language models with memory layers, sparse memory finetuning, and factual-recall evaluation."""

from memlm.config import ConfigError, MemoryConfig, ModelConfig
from memlm.model import MemLM

__all__ = ["ConfigError", "MemLM", "MemoryConfig", "ModelConfig"]
__version__ = "0.1.0"
