"""memlm: language models with memory layers, sparse memory finetuning, and factual-recall evaluation."""

from memlm.config import ConfigError, MemoryConfig, ModelConfig
from memlm.export import CheckpointError, load_pretrained, save_pretrained
from memlm.model import MemLM

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MemLM",
    "MemoryConfig",
    "ModelConfig",
    "load_pretrained",
    "save_pretrained",
]
__version__ = "0.1.0"
