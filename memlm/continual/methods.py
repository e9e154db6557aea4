"""The finetuning-method contract: one loop, the method decides what moves (Lin et al. 2025 compare sparse memory
finetuning with full finetuning and LoRA under the same data and evaluation).

A method wraps a loaded :class:`~memlm.model.MemLM`, freezes what it does not train, and performs one update per
:meth:`FinetuneMethod.step`. ``model`` is always a MemLM (LoRA injects its adapters in place), so evaluation and
generation see the model being trained. :func:`memlm.continual.factory.build_method` maps ``FinetuneConfig.method``
to its class (this module imports none of the methods, so they can import it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memlm.config import FinetuneConfig, FTOptimConfig


class MethodError(ValueError):
    """A method that cannot run on this model / config (e.g. SMF on a model without memory); says what to fix."""


class FinetuneMethod:
    """Base class. Subclasses set up trainable parameters in ``__init__`` and implement :meth:`update`."""

    name = "base"
    freezes_base = True  # frozen dense weights -> norm layers with running statistics stay in eval mode

    def __init__(self, model: nn.Module, cfg: FinetuneConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------------------ the step
    def step(self, batch) -> dict[str, float]:
        """One forward/backward/update on a :class:`memlm.continual.stream.Batch`; returns scalars to log."""
        self.train_mode()
        x, y = batch.x.to(self.device), batch.y.to(self.device)
        self.model.zero_grad(set_to_none=True)
        _, loss = self.model(x, y)
        loss.backward()
        logs = self.update(batch)
        self.model.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), **logs}

    def update(self, batch) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ helpers
    def train_mode(self) -> None:
        self.model.train()
        if self.freezes_base:  # BatchNorm running statistics are state too: frozen means frozen
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def final_model(self) -> nn.Module:
        """The model to save after finetuning (LoRA merges its adapters)."""
        return self.model

    def summary(self) -> dict[str, float]:
        """Run-level facts about the method (e.g. SMF: distinct rows ever updated)."""
        return {"trainable_params": self.num_trainable()}


def freeze_all_but(model: nn.Module, keep: list[nn.Parameter]) -> None:
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def dense_optimizer(params, cfg: FTOptimConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over ``params`` (a list of tensors or of param groups)."""
    betas = tuple(cfg.betas)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def check_method_applies(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Cheap checks before anything is computed or written (bad input -> one clear error)."""
    if cfg.method in ("sparse_memory", "memory_only"):
        if not getattr(model, "memory_layers", None):
            raise MethodError(
                f"method {cfg.method} needs a model with memory layers, but this checkpoint has none "
                "(model.memory is unset): use method full or lora, or a memory-layer checkpoint"
            )
    if cfg.method == "sparse_memory":
        for k, t in enumerate(model.value_tables()):
            rows = t.weight.shape[0]
            if cfg.smf.top_t > rows:
                raise MethodError(
                    f"smf.top_t ({cfg.smf.top_t}) is larger than value table {k} ({rows} rows): choose top_t <= {rows}"
                )
