"""Baselines of sparse memory finetuning: LoRA (peft) leaves base weights unchanged and merges correctly;
memory-only moves only value tables; full finetuning moves everything."""

import torch
from conftest import tiny_config

from memlm.config import FinetuneConfig
from memlm.continual.factory import build_method
from memlm.continual.stream import Batch
from memlm.model import MemLM


def _batch(seed: int, B: int = 3, T: int = 7) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (B, T), generator=g)
    y = torch.randint(0, 64, (B, T), generator=g)
    ones = torch.ones(B, T, dtype=torch.bool)
    return Batch(x, y, ones, ones)


def _cfg(method: str, **sections) -> FinetuneConfig:
    return FinetuneConfig.from_dict({"method": method, **sections})


def test_lora_freezes_base_and_merges():
    model = MemLM(tiny_config())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    m = build_method(model, _cfg("lora", optim={"lr": 1e-2}, lora={"rank": 4, "alpha": 8, "targets": ["wq", "w2"]}))
    assert m.model is model  # adapters injected in place: still the MemLM
    for step in range(3):
        m.step(_batch(step))
    # every base weight is bitwise unchanged; only adapter weights are trainable
    for name, p in m.peft_model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad
    for name, v in m.peft_model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(v, base[key]), name
    # the adapters learned something, and merging reproduces the adapted model
    wq = model.blocks[0].attn.wq
    a, b = wq.lora_A["default"].weight, wq.lora_B["default"].weight
    assert b.abs().sum() > 0
    want_wq = base["blocks.0.attn.wq.weight"] + (8 / 4) * b.detach() @ a.detach()
    x = _batch(9).x
    model.eval()
    with torch.no_grad():
        adapted, _ = model(x)
    merged = m.final_model()
    assert isinstance(merged, MemLM)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged.blocks[0].attn.wq.weight, want_wq, atol=1e-6)
    with torch.no_grad():
        out, _ = merged(x)
    assert torch.allclose(out, adapted, atol=1e-5)


def test_memory_only_moves_only_values():
    model = MemLM(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = build_method(model, _cfg("memory_only"))
    for step in range(3):
        m.step(_batch(step))
    values = {id(p) for p in model.value_parameters()}
    for name, p in model.named_parameters():
        if id(p) in values:
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), name


def test_full_finetuning_moves_everything():
    model = MemLM(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = build_method(model, _cfg("full", optim={"lr": 1e-3}))
    m.step(_batch(0))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(list(model.named_parameters()))


def test_dense_baselines_take_a_sparse_grad_checkpoint():
    """A model configured with sparse value gradients (row-sparse pretraining) finetunes with torch's dense
    optimizers: the baselines switch the layers to dense gradients instead of crashing in Adam."""
    for method in ("memory_only", "full"):
        model = MemLM(tiny_config(sparse_grad=True))
        m = build_method(model, _cfg(method, optim={"lr": 1e-3}))
        m.step(_batch(0))
        assert all(not layer.cfg.sparse_grad for layer in model.memory_layers)
