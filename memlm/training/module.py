"""The LightningModule: a training system around the plain :class:`memlm.MemLM` (which knows nothing of Lightning)."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from memlm.config import ConfigError, OptimConfig, RunConfig, from_dict
from memlm.model import MemLM
from memlm.model.memory.sparse_update import RowSparseAdam
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
        self.last_train_loss: torch.Tensor | float = float("nan")  # float() it where a number is needed

    @property
    def optim_cfg(self) -> OptimConfig:
        return self.run_cfg.optim

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        fn = self._compiled if self._compiled is not None else self.model
        return fn(idx, targets)

    def configure_model(self) -> None:
        mem = self.run_cfg.model.memory
        if mem is not None and mem.parallel == "dim":
            self._shard_tables()
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            o = self.optim_cfg  # FSDP flattens every parameter to 1-D: take the groups from their shapes now
            self._fsdp_groups = self.model.param_groups(weight_decay=o.weight_decay, lr=o.lr, value_lr=o.value_lr,
                                                        value_lr_mult=o.value_lr_mult)  # fmt: skip
        if self.run_cfg.train.compile and self._compiled is None:
            self._compiled = torch.compile(self.model)

    def _shard_tables(self) -> None:
        """``model.memory.parallel=dim``: each rank keeps its columns of every value table (memory parallelism,
        ``memlm.model.memory.parallel``); DDP all-reduces only the dense network (the shards are in its ignore list)."""
        from lightning.pytorch.strategies import DDPStrategy

        from memlm.model.memory import parallel

        if self.trainer.world_size > 1 and not isinstance(self.trainer.strategy, DDPStrategy):
            raise ConfigError(
                f"model.memory.parallel=dim needs trainer.strategy=ddp (got {type(self.trainer.strategy).__name__}); "
                "FSDP would gather the sharded tables whole"
            )
        if parallel.shard_model(self.model):
            self._ddp_params_and_buffers_to_ignore = [n for n, _ in parallel.sharded_parameters(self)]

    @property
    def _sharded(self) -> bool:
        return bool(getattr(self, "_ddp_params_and_buffers_to_ignore", None))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._sharded:  # the file holds the full tables and moments: it loads at any world size
            from memlm.model.memory import parallel

            parallel.unshard_checkpoint(self, checkpoint, self.trainer.optimizers)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._sharded:
            from memlm.model.memory import parallel

            parallel.shard_checkpoint(self, checkpoint)
        _rescale_loader_position(checkpoint, self.trainer.world_size if self._trainer is not None else 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.last_train_loss = loss.detach()  # a tensor: float() would sync the device between forward and backward
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
        """AdamW over the model's groups; with ``optim.value_optimizer: row_sparse_adam`` the value group instead gets
        sparse gradients and a lazy Adam step on the rows read in the step (one :class:`RowSparseAdam`)."""
        o = self.optim_cfg
        if o.value_optimizer == "row_sparse_adam":
            self._sparse_value_grads()
        opt = build_optimizer(self.model, o, fused=torch.cuda.is_available() and self.device.type == "cuda",
                              groups=getattr(self, "_fsdp_groups", None))  # fmt: skip
        groups = opt.param_groups
        total = int(self.trainer.max_steps) if self.trainer and self.trainer.max_steps > 0 else 10_000
        sched = torch.optim.lr_scheduler.LambdaLR(opt, group_lambdas(groups, o, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _sparse_value_grads(self) -> None:
        """Switch the memory layers to sparse value-table gradients (a training-time setting: the saved model config
        is unchanged). Kept dense, with the same lazy semantics (rows with a non-zero gradient), where a sparse
        gradient cannot flow: multi-process DDP (its reducer all-reduces dense buckets) and UltraMem with cores > 1."""
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ConfigError(
                "optim.value_optimizer=row_sparse_adam does not work with FSDP (it flattens the value table's rows); "
                "use optim.value_optimizer=adamw or another strategy"
            )
        if self.trainer.world_size > 1 and not self._sharded:  # shards are not all-reduced: sparse grads are fine
            rank_zero_warn("row_sparse_adam under multi-process training: value gradients stay dense (all-reduced)")
            return
        for layer in self.model.memory_layers:
            try:
                layer.cfg = dataclasses.replace(layer.cfg, sparse_grad=True)  # a copy: shared configs stay untouched
            except ConfigError as e:
                rank_zero_warn(f"row_sparse_adam: dense value gradients for {type(layer).__name__} ({e})")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the dense network and the memory values separately (Memory+); log both pre-clip norms."""
        o = self.optim_cfg
        dense, values = [], []
        for g in optimizer.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            (values if g.get("name") == "memory_values" else dense).extend(params)
        for name, params, clip in (("dense", dense, o.grad_clip), ("memory_values", values, o.value_grad_clip)):
            fsdp = hasattr(self, "_fsdp_groups")  # a collective: every rank, even one holding no slice of the group
            if params or fsdp:
                norm = clip_grad_norm_sparse_(params, clip, fsdp=fsdp, device=self.device)
                self.log(f"grad_norm/{name}", norm, on_step=True, on_epoch=False)


def build_optimizer(model: MemLM, o: OptimConfig, fused: bool = False, groups: list[dict] | None = None
                    ) -> torch.optim.Optimizer:  # fmt: skip
    """The training optimizer over ``model.param_groups``: AdamW (``fused`` on CUDA), or with
    ``o.value_optimizer == "row_sparse_adam"`` one :class:`RowSparseAdam` (AdamW on the dense groups, lazy Adam on the
    memory_values group). Sparse value gradients are switched on separately (the memory layers' ``sparse_grad``).
    ``groups``: ``model.param_groups`` computed earlier (FSDP: before it flattened the parameters)."""
    if groups is None:
        groups = model.param_groups(
            weight_decay=o.weight_decay, lr=o.lr, value_lr=o.value_lr, value_lr_mult=o.value_lr_mult
        )
    if o.value_optimizer == "row_sparse_adam":
        for g in groups:
            g["row_sparse"] = g["name"] == "memory_values"
        return RowSparseAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **({"fused": True} if fused else {}))


def clip_grad_norm_sparse_(params: list[torch.nn.Parameter], max_norm: float | None, fsdp: bool = False,
                           device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """``clip_grad_norm_`` that also takes sparse COO gradients: they are coalesced in place (duplicate rows summed,
    so the norm is that of the dense gradient) and their values scaled. Returns the total pre-clip norm. Gradients of
    memory-parallel shards (and, with ``fsdp``, every gradient: FSDP shards them all) count over all ranks."""
    from memlm.model.memory import cpu_kernels
    from memlm.model.memory.sparse_update import coalesced
    from memlm.model.memory.values import shard_of

    if fsdp:  # every rank holds a disjoint slice of each gradient: the squared norms add up over the world
        sq = torch.zeros((), device=device)
        for p in params:
            sq = sq + torch.linalg.vector_norm(p.grad, dtype=torch.float32) ** 2
        torch.distributed.all_reduce(sq)
        total = sq.sqrt()
        if max_norm is not None:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total
    sharded = [p for p in params if shard_of(p) is not None]
    if not any(p.grad.is_sparse for p in params) and not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    norms = []
    for p in [p for p in params if shard_of(p) is None]:
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
            vals = p.grad.values()  # (U, D) rows only
            # CPU: on every thread (PyTorch's CPU norm runs on one; the 262k-slot tiny model's rows are 19-30 MB)
            norms.append(cpu_kernels.l2_norm(vals) if cpu_kernels.available(vals)
                         else torch.linalg.vector_norm(vals, dtype=torch.float32))  # fmt: skip
        else:
            norms.append(torch.linalg.vector_norm(p.grad, dtype=torch.float32))
    if sharded:  # memory-parallel shards: the norm of the whole table is over every rank's columns
        from memlm.model.memory.parallel import group_sum_of_squares

        sq = torch.zeros((), dtype=torch.float32, device=sharded[0].device)
        for p in sharded:
            if p.grad.is_sparse:
                p.grad = coalesced(p.grad)
            g = p.grad.values() if p.grad.is_sparse else p.grad
            sq = sq + torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
        norms.append(group_sum_of_squares(sq, sharded).sqrt())
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm is not None:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        # a CPU scalar is read for free (a GPU one would sync): skip the pass over every gradient when it is x 1
        # (a NaN norm still multiplies, as torch's clip does)
        if coef.device.type != "cpu" or float(coef) != 1.0:
            for p in params:
                (p.grad.values() if p.grad.is_sparse else p.grad).mul_(coef.to(p.grad.dtype))
    return total


def _rescale_loader_position(checkpoint: dict, world_size: int) -> None:
    """A checkpoint written at another world size: restate the train loader's per-rank position (samples done on each
    rank) for this world size, so the run continues at the same global sample (the global batch is the same samples
    at any world size, see ``EpochSampler``). Left alone when it does not map exactly (the loader then restarts the
    epoch, with its warning)."""
    loops = checkpoint.get("loops") or {}
    states = ((loops.get("fit_loop") or {}).get("state_dict") or {}).get("combined_loader")
    for st in states if isinstance(states, list) else []:
        old = st.get("world_size") if isinstance(st, dict) else None
        if old and old != world_size and (st["start"] * old) % world_size == 0:
            st["start"], st["world_size"] = st["start"] * old // world_size, world_size
