"""The LightningModule: a training system around the plain :class:`memlm.MemLM` (which knows nothing of Lightning)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from memlm.config import OptimConfig, RunConfig, from_dict
from memlm.model import MemLM
from memlm.training.schedule import group_lambdas


class LMModule(L.LightningModule):
    """Next-token training of a MemLM. ``config`` is the resolved run config as a dict (saved in checkpoints, so a
    ``.ckpt`` alone rebuilds the model); ``tokenizer_path`` points at the tokenizer saved beside the run."""

    def __init__(self, config: dict[str, Any], tokenizer_path: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.run_cfg: RunConfig = from_dict(RunConfig, config)
        self.model = MemLM(self.run_cfg.model)
        self._compiled = None
        self.last_train_loss = float("nan")

    @property
    def optim_cfg(self) -> OptimConfig:
        return self.run_cfg.optim

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        fn = self._compiled if self._compiled is not None else self.model
        return fn(idx, targets)

    def configure_model(self) -> None:
        if self.run_cfg.train.compile and self._compiled is None:
            self._compiled = torch.compile(self.model)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.last_train_loss = float(loss.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.size(0))
        aux = [m.aux_loss for m in self.model.memory_layers if m.aux_loss is not None]
        if aux:
            self.log("train/aux_loss", sum(aux).detach(), on_step=True, on_epoch=False, batch_size=x.size(0))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=x.size(0), sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for m in self.model.memory_layers:  # e.g. UltraMem refreshes its rank-1 core approximation once per step
            refresh = getattr(m, "refresh", None)
            if callable(refresh):
                refresh()

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = self.model.param_groups(
            weight_decay=o.weight_decay, lr=o.lr, value_lr=o.value_lr, value_lr_mult=o.value_lr_mult
        )
        fused = {"fused": True} if torch.cuda.is_available() and self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **fused)
        total = int(self.trainer.max_steps) if self.trainer and self.trainer.max_steps > 0 else 10_000
        sched = torch.optim.lr_scheduler.LambdaLR(opt, group_lambdas(groups, o, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the dense network and the memory values separately (Memory+); log both pre-clip norms."""
        o = self.optim_cfg
        dense, values = [], []
        for g in optimizer.param_groups:
            params = [p for p in g["params"] if p.grad is not None and not p.grad.is_sparse]
            (values if g.get("name") == "memory_values" else dense).extend(params)
        for name, params, clip in (("dense", dense, o.grad_clip), ("memory_values", values, o.value_grad_clip)):
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
                self.log(f"grad_norm/{name}", norm, on_step=True, on_epoch=False)
