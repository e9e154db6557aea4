"""Typed configuration: dataclasses are the schema, YAML and the command line fill them in.

Precedence is defaults < YAML files (merged in order) < dotted command-line overrides (``--model.dim=64``).
Every unknown key or wrongly typed value raises :class:`ConfigError` naming the full dotted key. One file per section:
``base`` (the dict <-> dataclass machinery), ``model``, ``data``, ``run`` (optim / train / trainer), ``finetune``.
"""

from memlm.config.base import ConfigError, deep_merge, from_dict, parse_overrides, read_yaml, to_dict
from memlm.config.data import DataConfig, FactsConfig, SourceConfig, TokenizerConfig
from memlm.config.finetune import *  # noqa: F403
from memlm.config.finetune import FinetuneConfig, load_finetune_config
from memlm.config.model import MemoryConfig, ModelConfig, load
from memlm.config.run import OptimConfig, RunConfig, TrainConfig, load_run_config

__all__ = [
    "ConfigError", "DataConfig", "FactsConfig", "FinetuneConfig", "MemoryConfig", "ModelConfig", "OptimConfig",
    "RunConfig", "SourceConfig", "TokenizerConfig", "TrainConfig", "deep_merge", "from_dict", "load",
    "load_finetune_config", "load_run_config", "parse_overrides", "read_yaml", "to_dict",
]  # fmt: skip
