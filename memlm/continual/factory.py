"""``FinetuneConfig.method`` -> the finetuning method: the one place that knows every method class.

The classes import the contract (:mod:`memlm.continual.methods`), and only this module imports the classes, so there
is no import cycle between the contract and its implementations.
"""

from __future__ import annotations

import torch.nn as nn

from memlm.config import FinetuneConfig
from memlm.continual.baselines import FullFinetuning, LoRAFinetuning, MemoryOnly
from memlm.continual.methods import FinetuneMethod, MethodError
from memlm.continual.smf import SparseMemoryFinetuning

BASELINES: dict[str, type[FinetuneMethod]] = {"full": FullFinetuning, "lora": LoRAFinetuning, "memory_only": MemoryOnly}


def build_method(model: nn.Module, cfg: FinetuneConfig, background=None) -> FinetuneMethod:
    """The method of ``cfg.method`` over ``model`` (``background``: SMF's :class:`BackgroundStats`)."""
    if cfg.method == "sparse_memory":
        if background is None:
            raise MethodError("sparse_memory needs background statistics (memlm.continual.background)")
        return SparseMemoryFinetuning(model, cfg, background)
    return BASELINES[cfg.method](model, cfg)
