"""Row-sparse value updates in training (``optim.value_optimizer: row_sparse_adam``): the dense network steps exactly
like AdamW, value rows like lazy Adam (only the rows read in a step move), untouched rows stay bitwise; clipping with
sparse gradients; optimizer state_dict resume; the launcher end to end."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from memlm.config import load_run_config, to_dict
from memlm.model.memory.sparse_update import RowSparseAdam
from memlm.training.module import LMModule, clip_grad_norm_sparse_
from memlm.training.schedule import group_lambdas

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/fixtures/train/tiny.yaml"
BETAS, EPS = (0.9, 0.95), 1e-8


def lazy_adam_reference(p, g, m, v, rows, t, lr):
    """Lazy Adam written out with a row mask (reference): rows in ``rows`` take Adam step ``t``; others unchanged."""
    mask = torch.zeros(p.shape[0], 1, dtype=torch.bool)
    mask[rows] = True
    m.copy_(torch.where(mask, BETAS[0] * m + (1 - BETAS[0]) * g, m))
    v.copy_(torch.where(mask, BETAS[1] * v + (1 - BETAS[1]) * g * g, v))
    step = lr / (1 - BETAS[0] ** t) * m / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
    p.copy_(torch.where(mask, p - step, p))


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (6,), (40, 5)]  # decay matrix, no-decay vector, value table
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _groups(params, row_sparse: bool) -> list[dict]:
    w, b, tab = params
    groups = [
        {"name": "decay", "params": [w], "weight_decay": 0.1},
        {"name": "no_decay", "params": [b], "weight_decay": 0.0},
    ]
    if row_sparse:
        for gr in groups:
            gr["row_sparse"] = False
        groups.append({"name": "memory_values", "params": [tab], "weight_decay": 0.0, "lr": 0.05, "row_sparse": True})
    return groups


def _sparse_grads(step: int, n: int = 40, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    gw, gb = torch.randn(8, 6, generator=g), torch.randn(6, generator=g)
    idx = torch.randint(0, n // 2, (12,), generator=g)  # repeated rows; rows >= n/2 never touched
    vals = torch.randn(12, d, generator=g)
    return gw, gb, torch.sparse_coo_tensor(idx.unsqueeze(0), vals, (n, d)), idx


def test_mixed_optimizer_matches_adamw_and_lazy_adam():
    """Dense groups == torch.optim.AdamW bitwise; the value table == lazy Adam; untouched rows bitwise unchanged."""
    ours, ref = _params(), _params()
    opt = RowSparseAdam(_groups(ours, True), lr=0.01, betas=BETAS, eps=EPS)
    ref_opt = torch.optim.AdamW(_groups(ref, False), lr=0.01, betas=BETAS, eps=EPS)
    m, v = torch.zeros(40, 5), torch.zeros(40, 5)
    init = ours[2].detach().clone()
    for t in range(1, 6):
        gw, gb, gv, idx = _sparse_grads(t)
        ours[0].grad, ours[1].grad, ours[2].grad = gw.clone(), gb.clone(), gv
        ref[0].grad, ref[1].grad = gw.clone(), gb.clone()
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            lazy_adam_reference(ref[2], gv.to_dense(), m, v, idx.unique(), t, lr=0.05)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        torch.testing.assert_close(ours[2].detach(), ref[2].detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[2][20:], init[20:])  # rows never in a gradient: bitwise unchanged


def test_state_dict_resume_is_exact():
    def run(split: int | None) -> list[torch.Tensor]:
        params = _params()
        opt = RowSparseAdam(_groups(params, True), lr=0.01, betas=BETAS, eps=EPS)
        for t in range(1, 7):
            if t == split:  # rebuild from the state dict, as Lightning does on resume
                sd = copy.deepcopy(opt.state_dict())
                opt = RowSparseAdam(_groups(params, True), lr=0.01, betas=BETAS, eps=EPS)
                opt.load_state_dict(sd)
            gw, gb, gv, _ = _sparse_grads(t)
            params[0].grad, params[1].grad, params[2].grad = gw, gb, gv
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(None), run(4)):
        assert torch.equal(a, b)


def test_weight_decay_refused_on_row_sparse_group():
    with pytest.raises(ValueError, match="weight decay"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(4, 2))], weight_decay=0.1)


def test_fsdp_with_row_sparse_refused_at_config_time():
    """Before a run starts (was: inside fit, after data preparation): one line naming both settings."""
    from memlm.config import ConfigError

    with pytest.raises(ConfigError, match="row_sparse_adam does not work with trainer.strategy=fsdp"):
        load_run_config([ROOT / TINY], ["--optim.value_optimizer=row_sparse_adam", "--trainer.strategy=fsdp"])
    load_run_config([ROOT / TINY], ["--trainer.strategy=fsdp"])  # dense AdamW under FSDP stays allowed


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])  # 1e6: no clipping (the x 1 pass is skipped on CPU)
def test_clip_with_sparse_grads_matches_dense(max_norm):
    _, _, gv, _ = _sparse_grads(0)  # uncoalesced, repeated rows
    sp, dn = torch.nn.Parameter(torch.zeros(40, 5)), torch.nn.Parameter(torch.zeros(40, 5))
    other_sp, other_dn = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    sp.grad, dn.grad = gv, gv.to_dense()
    other_sp.grad, other_dn.grad = torch.ones(3), torch.ones(3)
    norm = clip_grad_norm_sparse_([sp, other_sp], max_norm)
    ref = torch.nn.utils.clip_grad_norm_([dn, other_dn], max_norm if max_norm is not None else float("inf"))
    torch.testing.assert_close(norm, ref)
    assert sp.grad.is_sparse and sp.grad.is_coalesced()
    torch.testing.assert_close(sp.grad.to_dense(), dn.grad)
    torch.testing.assert_close(other_sp.grad, other_dn.grad)


def test_clip_with_a_nan_norm_poisons_every_gradient_as_torch_does():
    """Nothing to clip is skipped on CPU, but a NaN norm is not 'nothing to clip': every gradient turns NaN."""
    p, q = torch.nn.Parameter(torch.zeros(5, 2)), torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([[1.0, float("nan")], [2.0, 0.0]]), (5, 2))
    q.grad = torch.ones(3)
    assert clip_grad_norm_sparse_([p, q], 1e6).isnan()
    assert q.grad.isnan().all() and p.grad.values().isnan().all()


class _Watch(L.Callback):
    """Records the slots read in every step and whether the value gradient arrived sparse."""

    def __init__(self) -> None:
        self.touched: list[torch.Tensor] = []
        self.sparse: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.sparse += [p.grad.is_sparse for p in pl_module.model.value_parameters() if p.grad is not None]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.touched.append(torch.cat([m.last_indices.flatten() for m in pl_module.model.memory_layers]).unique())


def _batches(n: int, vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, vocab, (4, 17), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))  # (B, T) inputs, next-token targets
    return out


def test_training_steps_match_adamw_plus_lazy_adam():
    """N Lightning steps with row_sparse_adam == a plain loop: torch AdamW on the dense groups + lazy Adam (written out)
    on the value rows read in each step, same clipping and schedules. Untouched value rows stay bitwise."""
    steps = 5
    over = ["--optim.value_optimizer=row_sparse_adam", "--optim.value_lr=0.01", "--model.memory.n_keys=32"]
    cfg = load_run_config([ROOT / TINY], over)  # 1024 slots: some are never read in 5 steps
    torch.manual_seed(0)
    module = LMModule(to_dict(cfg))
    ref_model = copy.deepcopy(module.model)
    init_values = module.model.value_parameters()[0].detach().clone()
    data = _batches(steps, cfg.model.vocab_size)
    watch = _Watch()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, precision="32-true", logger=False, callbacks=[watch],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    assert watch.sparse == [True] * steps

    # reference: dense gradients, torch AdamW, lazy Adam on the rows read
    o = cfg.optim
    groups = ref_model.param_groups(weight_decay=o.weight_decay, lr=o.lr, value_lr=o.value_lr)
    lambdas = group_lambdas(groups, o, steps)
    dense = [g for g in groups if g["name"] != "memory_values"]
    (vgroup,) = [g for g in groups if g["name"] == "memory_values"]
    (table,) = vgroup["params"]
    opt = torch.optim.AdamW(dense, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambdas[groups.index(g)] for g in dense])
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    for t, (x, y) in enumerate(data, start=1):
        opt.zero_grad(set_to_none=True)
        table.grad = None
        ref_model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_([p for g in dense for p in g["params"]], o.grad_clip)
        torch.nn.utils.clip_grad_norm_([table], o.value_grad_clip)
        opt.step()
        rows = torch.cat([mem.last_indices.flatten() for mem in ref_model.memory_layers]).unique()
        assert torch.equal(rows, watch.touched[t - 1])
        with torch.no_grad():
            lazy_adam_reference(table, table.grad, m, v, rows, t, lr=vgroup["lr"] * lambdas[-1](t - 1))
        sched.step()

    for (name, a), (_, b) in zip(module.model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-6, msg=name)
    final = module.model.value_parameters()[0].detach()
    never = torch.ones(final.shape[0], dtype=torch.bool)
    never[torch.cat(watch.touched)] = False
    assert never.any() and torch.equal(final[never], init_values[never])
    assert not torch.equal(final[~never], init_values[~never])
    assert cfg.model.memory.sparse_grad is False  # a training-time switch: the model config is unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_steps_touch_only_read_rows():
    """On CUDA (Triton sparse value gradient, fused AdamW for the dense groups, bf16 autocast)."""
    cfg = load_run_config([ROOT / TINY], ["--optim.value_optimizer=row_sparse_adam", "--model.memory.n_keys=32"])
    torch.manual_seed(0)
    module = LMModule(to_dict(cfg))
    init_values = module.model.value_parameters()[0].detach().clone()
    watch = _Watch()
    trainer = L.Trainer(
        max_steps=4, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False, callbacks=[watch],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(_batches(4, cfg.model.vocab_size), batch_size=None))
    assert watch.sparse == [True] * 4 and module.last_train_loss == module.last_train_loss  # sparse grads, finite
    final = module.model.value_parameters()[0].detach().cpu()
    never = torch.ones(final.shape[0], dtype=torch.bool)
    never[torch.cat(watch.touched).cpu()] = False
    assert never.any() and torch.equal(final[never], init_values[never].cpu())
    assert not torch.equal(final[~never], init_values[~never].cpu())


def _train(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", "--config", TINY, "--optim.value_optimizer=row_sparse_adam", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_launcher_row_sparse_and_resume(tmp_path):
    r = _train(f"--train.run_dir={tmp_path}/runs", "--train.name=rs", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "rs" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (opt_state,) = ckpt["optimizer_states"]
    groups = {g["name"]: g for g in opt_state["param_groups"]}
    assert groups["memory_values"]["row_sparse"] and not groups["decay"]["row_sparse"]
    r = _train(f"--train.run_dir={tmp_path}/runs", "--train.name=rs", "--trainer.max_steps=9", "--ckpt_path=last",
               cache=tmp_path / "cache")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps            9" in r.stdout
