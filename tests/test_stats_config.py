"""Memory usage statistics on constructed histograms; config validation; parameter/FLOP accounting."""

import math

import pytest
import torch
from conftest import tiny_config

from memlm import MemLM, ModelConfig
from memlm.config import ConfigError, MemoryConfig, from_dict, parse_overrides
from memlm.model import dense_matched_config, flops_per_token, param_counts
from memlm.model.memory.stats import gini, slots_for_mass, usage_stats


def test_stats_uniform_usage():
    idx = torch.arange(16).repeat(10)  # every slot used 10 times
    s = usage_stats(idx.view(-1, 4), 16)
    assert s["used_frac"] == 1.0
    assert s["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert s["gini"] == pytest.approx(0.0, abs=1e-12)
    assert s["slots_50"] == 8 and s["slots_90"] == 15 and s["slots_99"] == 16


def test_stats_concentrated_usage():
    idx = torch.zeros(40, dtype=torch.long)  # one slot of 16
    s = usage_stats(idx.view(-1, 4), 16)
    assert s["used_frac"] == pytest.approx(1 / 16)
    assert s["kl_uniform"] == pytest.approx(math.log(16))
    assert s["kl_uniform_norm"] == pytest.approx(1.0)
    assert s["gini"] == pytest.approx(15 / 16)
    assert s["slots_50"] == s["slots_99"] == 1


def test_stats_half_used_and_weighted():
    # slots 0..3 used, counts 4,3,2,1 over 8 slots
    idx = torch.tensor([0] * 4 + [1] * 3 + [2] * 2 + [3])
    s = usage_stats(idx.view(-1, 1), 8)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert s["used_frac"] == 0.5
    assert s["kl_uniform"] == pytest.approx(float((p * (p * 8).log()).sum()))
    assert s["slots_50"] == 2 and s["slots_90"] == 3 and s["slots_99"] == 4
    counts = torch.tensor([4.0, 3, 2, 1, 0, 0, 0, 0])
    # Gini by its definition: mean absolute difference / (2 * mean)
    ref = (counts[:, None] - counts[None, :]).abs().mean() / (2 * counts.mean())
    assert gini(counts) == pytest.approx(float(ref))
    assert slots_for_mass(counts, 0.7) == 2
    w = torch.ones(10, 1)
    sw = usage_stats(idx.view(-1, 1), 8, weights=w)
    assert sw["kl_uniform_weighted"] == pytest.approx(s["kl_uniform"])
    assert sw["top1_weight"] == 1.0


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"dimm": 3}, "dimm"),
        ({"dim": "big"}, "dim"),
        ({"memory": {"knn": 4, "n_keys": 2}}, "knn"),
        ({"memory": {"n_keys": 0}}, "n_keys"),
        ({"memory": {"layers": [7]}}, "memory.layers"),
        ({"dim": 30, "n_heads": 4}, "n_heads"),
        ({"memory": {"k_dim": 15}}, "k_dim"),
        ({"memory": {"kind": "foo"}}, "memory.kind"),
        ({"memory": {"heads": 2.5}}, "memory.heads"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ],
)
def test_bad_model_config_names_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(ModelConfig, data)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dim: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        ModelConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")
    ok = tmp_path / "ok.yaml"
    ok.write_text(tiny_config().to_yaml())
    assert ModelConfig.from_yaml(ok) == tiny_config()


def test_overrides_parse():
    o = parse_overrides(["--model.dim=64", "--model.memory.layers", "[0, 1]", "--train.name=x"])
    assert o == {"model": {"dim": 64, "memory": {"layers": [0, 1]}}, "train": {"name": "x"}}
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--model.dim"])


def test_kind_defaults():
    assert MemoryConfig(kind="memory_plus").use_gate and MemoryConfig(kind="memory_plus").use_shared_values
    assert not MemoryConfig(kind="pkm").use_gate
    assert not MemoryConfig(kind="memory_plus", gated=False).use_gate
    assert MemoryConfig(n_keys=12).n_slots == 144


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config("pkm"),
        tiny_config("memory_plus", mode="parallel", v_dim=24),
        tiny_config("pkm", query_norm="layernorm", v_dim=48),
        ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False),
    ],
)
def test_param_accounting_matches_model(cfg):
    counts = param_counts(cfg)
    assert counts["total"] == MemLM(cfg).num_params()
    if cfg.memory is None:
        assert counts["active"] == counts["total"]
    else:
        assert counts["active"] < counts["total"]


def test_dense_matched_config():
    cfg = tiny_config("memory_plus")
    dense = dense_matched_config(cfg)
    assert dense.memory is None
    assert abs(flops_per_token(dense) - flops_per_token(cfg)) / flops_per_token(cfg) < 0.02
