"""Baselines of sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"):
full finetuning, LoRA (Hu et al. 2021, through ``peft``), and memory-only finetuning (every value row trainable).

LoRA: ``peft.get_peft_model`` wraps MemLM cleanly — MemLM's projections are plain ``nn.Linear`` modules named
``wq/wk/wv/wo`` (attention) and ``w1/w2/w3`` (SwiGLU), which ``target_modules`` matches by name suffix; peft swaps
them in place for LoRA layers and freezes every base weight. We keep training and evaluating
``peft_model.get_base_model()`` — the same MemLM object, now with adapters — so generation and the evaluation
harness work unchanged; :meth:`LoRAFinetuning.final_model` merges the adapters into the base weights.
"""

from __future__ import annotations

import dataclasses

import torch

from memlm.config import FinetuneConfig
from memlm.continual.methods import FinetuneMethod, MethodError, check_method_applies, dense_optimizer, freeze_all_but


class _DenseMethod(FinetuneMethod):
    """A torch optimizer over the trainable parameters, with optional global-norm clipping."""

    def _setup_optimizer(self, params) -> None:
        for layer in getattr(self.model, "memory_layers", []):  # torch's dense optimizers take no sparse gradients
            if layer.cfg.sparse_grad:
                layer.cfg = dataclasses.replace(layer.cfg, sparse_grad=False)  # a copy: shared configs stay untouched
        self.opt = dense_optimizer(params, self.cfg.optim)

    def update(self, batch) -> dict[str, float]:
        logs = {}
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), clip))
        self.opt.step()
        return logs


class FullFinetuning(_DenseMethod):
    """Every parameter trainable (AdamW by default; decay on matrices only, as in pretraining)."""

    name = "full"
    freezes_base = False

    def __init__(self, model, cfg: FinetuneConfig) -> None:
        super().__init__(model, cfg)
        for p in model.parameters():
            p.requires_grad_(True)
        o = cfg.optim
        groups = model.param_groups(weight_decay=o.weight_decay, lr=o.lr) if hasattr(model, "param_groups") else None
        self._setup_optimizer(groups or list(model.parameters()))


class MemoryOnly(_DenseMethod):
    """All value rows trainable (a dense optimizer over the value tables), everything else frozen."""

    name = "memory_only"

    def __init__(self, model, cfg: FinetuneConfig) -> None:
        super().__init__(model, cfg)
        check_method_applies(model, cfg)
        values = model.value_parameters()
        freeze_all_but(model, values)
        self._setup_optimizer(values)


class LoRAFinetuning(_DenseMethod):
    """Low-rank adapters on the attention / FFN projections; base weights frozen (``peft``)."""

    name = "lora"

    def __init__(self, model, cfg: FinetuneConfig) -> None:
        super().__init__(model, cfg)
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in lc.targets if t not in names]
        if missing:
            raise MethodError(
                f"lora.targets: no Linear module named {missing} in this model (Linear names: {sorted(names)})"
            )
        peft_cfg = LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.targets),
                              bias="none")  # fmt: skip
        self.peft_model = get_peft_model(model, peft_cfg)
        self.model = self.peft_model.get_base_model()  # the same MemLM, adapters injected in place
        self._setup_optimizer(self.trainable_parameters())

    def final_model(self):
        """Adapters merged into the base weights (W + alpha/r * B A); the LoRA layers are removed."""
        return self.peft_model.merge_and_unload()
