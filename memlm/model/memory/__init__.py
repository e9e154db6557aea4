"""Memory layers. ``build_memory_layer`` maps ``memory.kind`` to its class (pkm, memory_plus -> pkm.py; ultramem;
ultramem_v2; peer); all share product-key retrieval (``product_keys.py``) and the weighted value lookup
(``values.py``)."""

from __future__ import annotations

from memlm.config import ConfigError, ModelConfig
from memlm.model.memory.base import MemoryLayer
from memlm.model.memory.peer import PEER
from memlm.model.memory.pkm import ProductKeyMemory
from memlm.model.memory.product_keys import ProductKeys, product_topk
from memlm.model.memory.stats import usage_stats
from memlm.model.memory.ultramem import UltraMem
from memlm.model.memory.ultramem_v2 import GlobalValues, UltraMemV2
from memlm.model.memory.values import ValueTable, row_dot, value_lookup

__all__ = [
    "PEER",
    "GlobalValues",
    "MemoryLayer",
    "ProductKeyMemory",
    "ProductKeys",
    "UltraMem",
    "UltraMemV2",
    "ValueTable",
    "build_memory_layer",
    "build_shared_values",
    "product_topk",
    "row_dot",
    "usage_stats",
    "value_lookup",
]


def build_shared_values(cfg: ModelConfig) -> ValueTable | GlobalValues | None:
    """The model-level tables when the memory config asks for them (Memory+ pool, UltraMemV2 global tables)."""
    mem = cfg.memory
    if mem is None or not mem.use_shared_values:
        return None
    if mem.kind == "ultramem_v2":
        return GlobalValues(mem.global_rows(), cfg.value_dim, mem.pre_dim)
    return ValueTable(mem.n_slots, cfg.value_dim)


def build_memory_layer(cfg: ModelConfig, layer_idx: int, shared: ValueTable | GlobalValues | None) -> MemoryLayer:
    mem = cfg.memory
    assert mem is not None
    if mem.kind in ("pkm", "memory_plus"):
        return ProductKeyMemory(cfg.dim, mem, values=shared)
    if mem.kind == "ultramem":
        return UltraMem(cfg.dim, mem, cfg.value_dim, seed=layer_idx)
    if mem.kind == "ultramem_v2":
        assert isinstance(shared, GlobalValues)
        window = sorted(mem.layers).index(layer_idx)
        return UltraMemV2(cfg.dim, mem, shared, window, len(mem.layers), init_std=cfg.init_std)
    if mem.kind == "peer":
        return PEER(cfg.dim, mem)
    raise ConfigError(
        f"memory.kind '{mem.kind}' is not implemented (available: pkm, memory_plus, ultramem, ultramem_v2, peer)"
    )
