"""Continual-finetuning configs (``python -m memlm.continual``; used by memlm/continual/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memlm.config.base import _require, _YamlMixin, from_dict
from memlm.config.data import DataConfig
from memlm.config.run import _merge_layers

FinetuneMethod = Literal["sparse_memory", "full", "lora", "memory_only"]
METHODS: tuple[str, ...] = ("sparse_memory", "full", "lora", "memory_only")
# optimizer and lr of each method when the config leaves them unset (SMF paper: SGD, lr 2.0, no weight decay)
METHOD_OPTIM_DEFAULTS: dict[str, tuple[str, float]] = {
    "sparse_memory": ("sgd", 2.0),
    "full": ("adamw", 1e-4),
    "lora": ("adamw", 1e-3),
    "memory_only": ("adam", 1e-3),
}
# the lr when the optimizer is named but the lr is not. SMF + Adam: Adam's first step on a row moves every coordinate by
# ~lr whatever the gradient, so its lr must be small next to the values' own scale or one step overwrites the row.
OPTIM_LR_DEFAULTS: dict[tuple[str, str], float] = {("sparse_memory", "adam"): 1e-3}


@dataclass
class FTOptimConfig(_YamlMixin):
    """Optimizer of a finetuning method. Sparse memory finetuning allows only ``sgd`` or ``adam`` (row-sparse, lazy)
    without weight decay: anything else would move rows that were not selected."""

    name: Literal["sgd", "adam", "adamw"] | None = None  # None -> the method's default (METHOD_OPTIM_DEFAULTS)
    lr: float | None = None  # None -> the method's default
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = None  # global norm over the trainable parameters (not with sparse_memory)
    per_row_step: bool = True  # sparse_memory + adam: bias correction by each row's own update count

    def __post_init__(self) -> None:
        _require(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two numbers in [0, 1)"
        )
        _require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class SMFConfig(_YamlMixin):
    """Sparse memory finetuning (Lin et al. 2025): background document frequencies and per-batch top-t slots."""

    top_t: int = 500  # value rows trainable per step (per value table)
    ranking: Literal["tfidf", "kl", "tf"] = "tfidf"  # tf: raw counts (the paper's TF-only ablation)
    answer_only: bool = False  # count slot accesses only at answer tokens (the paper: all non-padding tokens)
    # document frequency per background batch (the paper) or per background sequence: at small scale a batch reads
    # a large part of the table, so batch df saturates (IDF 0 for every common slot); sequence df stays informative
    df_unit: Literal["batch", "sequence"] = "batch"
    background_batches: int = 1000  # pretraining batches the background statistics are counted over (the paper: 1,000)
    background_batch_size: int = 16
    background_seq_len: int | None = None  # None -> model.max_seq_len
    background_data: DataConfig | None = None  # None -> the checkpoint's own pretraining data config
    background_path: str | None = None  # None -> beside the checkpoint
    recompute_background: bool = False

    def __post_init__(self) -> None:
        _require(self.top_t > 0, f"smf.top_t must be > 0, got {self.top_t}")
        _require(self.background_batches > 0, f"smf.background_batches must be > 0, got {self.background_batches}")
        _require(self.background_batch_size > 0, "smf.background_batch_size must be > 0")
        _require(
            self.background_seq_len is None or self.background_seq_len > 1,
            f"smf.background_seq_len must be > 1, got {self.background_seq_len}",
        )


@dataclass
class LoraFTConfig(_YamlMixin):
    """LoRA through ``peft`` on the attention / FFN projections (module-name suffixes of MemLM)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])

    def __post_init__(self) -> None:
        _require(self.rank > 0, f"lora.rank must be > 0, got {self.rank}")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _require(len(self.targets) > 0, "lora.targets must name at least one module")


@dataclass
class StreamConfig(_YamlMixin):
    """The new-fact stream: QA pairs rendered by templates, split into ``stages`` sequential stages."""

    dataset: str = "triviaqa"  # a name memlm.data.qa.load_qa knows, or a local .jsonl / .csv QA file
    split: str | None = "validation"
    offset: int = 0  # skip this many usable facts (after the max_answer_words filter): disjoint blocks of facts
    stages: int = 3
    facts_per_stage: int = 50
    repetitions: int = 10  # each (fact, template) text is seen this many times per stage
    max_answer_words: int | None = 4  # keep facts whose first answer is short (None = all)
    templates: list[str] = field(
        default_factory=lambda: [
            "Question: {question}\nAnswer: {answer}",
            "{question} The answer is {answer}.",
            'The answer to "{question}" is {answer}.',
        ]
    )
    seed: int = 0
    # mixed: batches of train.batch_size texts drawn from the whole stage (facts mixed), train.steps_per_stage steps;
    # paraphrase: the paper's fact setting -- one fact per step, the batch = `paraphrases` distinct texts of that fact
    # (memlm.continual.paraphrase), `steps_per_fact` steps per fact, facts in sequence (templates / repetitions unused)
    mode: Literal["mixed", "paraphrase"] = "paraphrase"
    paraphrases: int = 64
    steps_per_fact: int = 1

    def __post_init__(self) -> None:
        _require(self.paraphrases > 0, f"stream.paraphrases must be > 0, got {self.paraphrases}")
        _require(self.steps_per_fact > 0, f"stream.steps_per_fact must be > 0, got {self.steps_per_fact}")
        _require(self.stages > 0, f"stream.stages must be > 0, got {self.stages}")
        _require(self.facts_per_stage > 0, f"stream.facts_per_stage must be > 0, got {self.facts_per_stage}")
        _require(self.repetitions > 0, f"stream.repetitions must be > 0, got {self.repetitions}")
        _require(self.offset >= 0, f"stream.offset must be >= 0, got {self.offset}")
        _require(len(self.templates) > 0, "stream.templates must list at least one template")
        for t in self.templates:
            _require(
                "{question}" in t and "{answer}" in t,
                f"stream.templates: {t!r} must contain {{question}} and {{answer}}",
            )


@dataclass
class FTTrainConfig(_YamlMixin):
    """The finetuning loop (plain PyTorch)."""

    batch_size: int = 16
    loss_on: Literal["all", "answer"] = "all"  # train on every token of the text, or only the answer's
    steps_per_stage: int | None = None  # None -> one pass over the stage's (repeated) examples
    seed: int = 0
    device: str = "auto"  # auto -> cuda when available, else cpu
    log_every: int = 10

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _require(self.steps_per_stage is None or self.steps_per_stage > 0, "train.steps_per_stage must be > 0")
        _require(self.log_every > 0, f"train.log_every must be > 0, got {self.log_every}")


@dataclass
class FTEvalConfig(_YamlMixin):
    """Evaluation after every stage (through memlm.evaluation)."""

    prompt: str = "Question: {question}\nAnswer:"  # how the new facts are asked (match stream.templates[0])
    until: list[str] = field(default_factory=lambda: ["\n", ".", ",", "Question:"])
    max_new_tokens: int = 16
    heldin_task: str = "worldfacts"  # pretraining facts the base model knows
    heldin_limit: int | None = 200
    ppl_docs: int | None = 100  # validation documents of the checkpoint's pretraining corpus (None = all)
    ppl_task: str | None = None  # a perplexity task instead of the validation documents (e.g. heldout_ppl)
    extra_tasks: list[str] = field(default_factory=list)  # e.g. [nq_open]; reported with their relative drop
    extra_limit: int | None = 200
    batch_size: int = 32

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")


@dataclass
class FinetuneConfig(_YamlMixin):
    """A continual-finetuning run: ``method`` picks how the same loop updates the model; its section configures it."""

    method: FinetuneMethod = "sparse_memory"
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    smf: SMFConfig = field(default_factory=SMFConfig)
    lora: LoraFTConfig = field(default_factory=LoraFTConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    eval: FTEvalConfig = field(default_factory=FTEvalConfig)
    out_dir: str = "runs/continual"
    name: str | None = None  # None -> the method name
    save_model: bool = True  # write the finetuned model (export format, memlm.load_pretrained) to <run>/export

    def __post_init__(self) -> None:
        name, lr = METHOD_OPTIM_DEFAULTS[self.method]
        if self.optim.name is None:
            self.optim.name = name
        elif self.optim.name != name:
            lr = OPTIM_LR_DEFAULTS.get((self.method, self.optim.name), lr)
        if self.optim.lr is None:
            self.optim.lr = lr
        if self.method == "sparse_memory":
            _require(
                self.optim.name in ("sgd", "adam"),
                f"optim.name: sparse_memory needs 'sgd' or 'adam' (row-sparse), got {self.optim.name!r}",
            )
            _require(
                self.optim.weight_decay == 0,
                "optim.weight_decay must be 0 with sparse_memory (decay would move rows that were not selected)",
            )
            _require(self.optim.grad_clip is None, "optim.grad_clip is not supported with sparse_memory")

    @property
    def run_name(self) -> str:
        return self.name or self.method


def load_finetune_config(
    paths: list[str | Path] | None = None, overrides: list[str] | dict | None = None
) -> FinetuneConfig:
    """defaults < YAML files (merged in order) < overrides (``--a.b=c`` strings or a nested dict)."""
    return from_dict(FinetuneConfig, _merge_layers(paths, overrides))
