"""Memory layers. ``build_memory_layer`` maps ``memory.kind`` to its class; all share product-key retrieval
(``product_keys.py``) and the weighted value lookup (``values.py``)."""

from __future__ import annotations

from memlm.config import ConfigError, ModelConfig
from memlm.model.memory.base import MemoryLayer
from memlm.model.memory.pkm import ProductKeyMemory
from memlm.model.memory.product_keys import ProductKeys, product_topk
from memlm.model.memory.stats import usage_stats
from memlm.model.memory.values import ValueTable, value_lookup

__all__ = [
    "MemoryLayer",
    "ProductKeyMemory",
    "ProductKeys",
    "ValueTable",
    "build_memory_layer",
    "build_shared_values",
    "product_topk",
    "usage_stats",
    "value_lookup",
]


def build_shared_values(cfg: ModelConfig) -> ValueTable | None:
    """The model-level value pool when the memory config asks for one (Memory+), else None."""
    mem = cfg.memory
    if mem is None or not mem.use_shared_values:
        return None
    return ValueTable(mem.n_slots, cfg.value_dim)


def build_memory_layer(cfg: ModelConfig, layer_idx: int, shared: ValueTable | None) -> MemoryLayer:
    mem = cfg.memory
    assert mem is not None
    if mem.kind in ("pkm", "memory_plus"):
        return ProductKeyMemory(cfg.dim, mem, values=shared)
    raise ConfigError(f"memory.kind '{mem.kind}' is not implemented yet (available: pkm, memory_plus)")
