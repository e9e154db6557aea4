"""Evaluation tasks: small declarative YAML files (``eval/tasks/*.yaml``) and the registry that finds them.

A task has a ``type``:

- ``generate``: QA by greedy generation, scored with exact match / token F1 against all aliases. ``dataset`` is a
  name :func:`memlm.data.qa.load_qa` knows (triviaqa, nq_open, simpleqa, worldfacts), ``qa_jsonl`` / ``qa_csv``
  with ``path``, or ``worldfacts_cloze`` (statement prefixes of the worldfacts facts, e.g. "The capital of France is").
  ``dataset: people`` asks about the invented individuals of the model's ``data.people`` section (split ``all`` or
  ``k<level>``); its rows have a ``question`` and a cloze ``prompt``, and its results add a ``capacity`` report:
  exact match / F1 per exposure level and attribute, each attribute's chance rate, bits (docs/capacity.md).
- ``multiple_choice``: log-likelihood of each choice; ``acc`` and ``acc_norm``. ``dataset: mc_jsonl`` with ``path``,
  rows ``{question|context, choices: [..], label: int}`` (field names configurable).
- ``perplexity``: rolling log-likelihood of held-out text; token / word / byte perplexity and bits per byte.
  ``dataset: worldfacts_docs`` (statements of the worldfacts facts of ``split``, default heldout), ``text`` (a .txt
  file, documents separated by blank lines) or ``jsonl`` (one ``text_field`` per line), with ``path``.

A task name on the command line may also be a path: ``my_task.yaml``, ``qa:FILE.jsonl`` (or any ``.jsonl`` / ``.csv``
file: a QA task with the default prompt), ``mc:FILE.jsonl`` or ``ppl:FILE``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from memlm.config import ConfigError, from_dict, read_yaml, to_dict

TaskType = Literal["generate", "multiple_choice", "perplexity"]
DEFAULT_METRICS = {
    "generate": ["exact_match", "f1"],
    "multiple_choice": ["acc", "acc_norm"],
    "perplexity": ["bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity"],
}
PRIMARY = {"generate": "f1", "multiple_choice": "acc", "perplexity": "bits_per_byte"}
REQUIRED = ("name", "type", "dataset")
TASKS_ENV = "MEMLM_EVAL_TASKS"  # extra task directories, os.pathsep-separated
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"


class TaskError(ValueError):
    """A task that cannot be used (unknown name, bad or incomplete YAML); the message says what to fix."""


@dataclass
class TaskSpec:
    """One evaluation task (the schema of ``eval/tasks/*.yaml``)."""

    name: str
    type: TaskType
    dataset: str
    path: str | None = None  # local file for qa_jsonl / qa_csv / mc_jsonl / text / jsonl datasets
    split: str | None = None  # evaluation split (None = the loader's default)
    fewshot_split: str | None = None  # few-shot examples come from here (None = the eval split, never the same row)
    fewshot_pool: int = 500  # rows of fewshot_split loaded to sample few-shot examples from
    description: str = ""  # text put before the (few-shot) prompt
    template: str = "Question: {question}\nAnswer:"  # fields: {question}, or {prompt} for cloze rows
    target: str = " {answer}"  # how a few-shot example's answer follows its prompt
    fewshot_delimiter: str = "\n\n"
    question_mark: bool = False  # append "?" to questions that lack one (NQ-open questions have none)
    until: list[str] = field(default_factory=lambda: ["\n", ".", ",", "Question:"])
    max_new_tokens: int = 32
    metrics: list[str] = field(default_factory=list)  # empty = the type's defaults
    primary_metric: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # local QA files: question / answers / id column names
    question_field: str = "question"  # multiple choice
    choices_field: str = "choices"
    label_field: str = "label"
    text_field: str = "text"  # perplexity jsonl
    file: str | None = None  # the YAML it came from (set by the loader)

    def __post_init__(self) -> None:
        known = DEFAULT_METRICS[self.type]
        if not self.metrics:
            self.metrics = list(known)
        bad = [m for m in self.metrics if m not in known]
        if bad:
            raise ConfigError(f"metrics {bad} do not apply to a {self.type} task (choose from {known})")
        if self.primary_metric is None:
            self.primary_metric = PRIMARY[self.type] if PRIMARY[self.type] in self.metrics else self.metrics[0]
        if self.primary_metric not in self.metrics:
            raise ConfigError(f"primary_metric {self.primary_metric!r} is not one of metrics {self.metrics}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.type != "generate" and self.dataset in ("qa_jsonl", "qa_csv", "worldfacts_cloze", "people"):
            raise ConfigError(f"dataset {self.dataset!r} is a QA dataset: use type: generate")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def spec_from_dict(data: dict[str, Any], where: str = "task") -> TaskSpec:
    """Validate a task mapping; missing or unknown fields and wrong types raise :class:`TaskError` naming ``where``."""
    if not isinstance(data, dict):
        raise TaskError(f"{where}: a task must be a mapping of fields, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data or data[k] in (None, "")]
    if missing:
        raise TaskError(f"{where}: missing required field(s) {missing} (every task needs {list(REQUIRED)})")
    try:
        return from_dict(TaskSpec, data)
    except ConfigError as e:
        raise TaskError(f"{where}: {e}") from None


def load_task_file(path: str | Path) -> TaskSpec:
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise TaskError(str(e)) from None
    spec = spec_from_dict(data, str(path))
    spec.file = str(path)
    if spec.path and not Path(spec.path).expanduser().is_absolute():
        beside = path.parent / spec.path
        if beside.exists() or not Path(spec.path).exists():  # relative paths are relative to the YAML file
            spec.path = str(beside)
    return spec


def task_dirs(extra: list[str | Path] | None = None) -> list[Path]:
    dirs = [Path(d) for d in (extra or [])]
    dirs += [Path(d) for d in os.environ.get(TASKS_ENV, "").split(os.pathsep) if d]
    dirs.append(DEFAULT_DIR)
    return [d for d in dirs if d.is_dir()]


def registry(extra_dirs: list[str | Path] | None = None) -> dict[str, Path]:
    """Known task names -> YAML files (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in task_dirs(extra_dirs):
        for f in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            found.setdefault(f.stem, f)
    return found


def known_tasks(extra_dirs: list[str | Path] | None = None) -> list[str]:
    return sorted(registry(extra_dirs))


def _path_task(kind: str, path: str) -> TaskSpec:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"task file not found: {p}")
    name = p.stem
    if kind == "qa":
        dataset = "qa_csv" if p.name.endswith((".csv", ".csv.gz")) else "qa_jsonl"
        return TaskSpec(name=name, type="generate", dataset=dataset, path=str(p))
    if kind == "mc":
        return TaskSpec(name=name, type="multiple_choice", dataset="mc_jsonl", path=str(p))
    dataset = "jsonl" if p.suffix in (".jsonl", ".json") else "text"
    return TaskSpec(name=name, type="perplexity", dataset=dataset, path=str(p))


def resolve_task(task: str | TaskSpec | dict[str, Any], extra_dirs: list[str | Path] | None = None) -> TaskSpec:
    """A registered name, a YAML path, ``qa:`` / ``mc:`` / ``ppl:`` + a data file, a .jsonl/.csv QA file, a mapping,
    or a :class:`TaskSpec` -> TaskSpec."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, dict):
        return spec_from_dict(dict(task), f"task {task.get('name', '?')}")
    name = str(task).strip()
    kind, sep, rest = name.partition(":")
    if sep and kind in ("qa", "mc", "ppl") and rest:
        return _path_task(kind, rest)
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise TaskError(f"task file not found: {name}")
        return load_task_file(name)
    if name.endswith((".jsonl", ".json", ".csv", ".csv.gz")):
        return _path_task("qa", name)
    reg = registry(extra_dirs)
    if name not in reg:
        raise TaskError(
            f"unknown task {name!r}. Known tasks: {', '.join(sorted(reg)) or '(none found)'}; "
            "or give a task .yaml, a QA .jsonl/.csv file, mc:FILE.jsonl or ppl:FILE"
        )
    return load_task_file(reg[name])


def resolve_tasks(tasks: str | list, extra_dirs: list[str | Path] | None = None) -> list[TaskSpec]:
    """A comma-separated string or a list of names / paths / specs -> specs (duplicates by name are an error)."""
    items = [t for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not items:
        raise TaskError(f"no tasks given. Known tasks: {', '.join(known_tasks(extra_dirs))}")
    specs = [resolve_task(t, extra_dirs) for t in items]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"task name(s) given twice: {dup}")
    return specs


def spec_fields() -> list[str]:
    return [f.name for f in fields(TaskSpec)]
