import pytest
import torch

from memlm.config import MemoryConfig, ModelConfig
from memlm.utils.malloc import keep_freed_memory_in_heap

keep_freed_memory_in_heap()  # as the entry points do (faster CPU tests; see memlm/utils/malloc.py)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def tiny_config(kind: str = "memory_plus", **mem_overrides) -> ModelConfig:
    mem = dict(kind=kind, layers=[1], n_keys=8, heads=2, knn=4, k_dim=16)
    mem.update(mem_overrides)
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32, memory=MemoryConfig(**mem))
