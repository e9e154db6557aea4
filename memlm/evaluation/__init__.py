"""Evaluation harness: QA / multiple-choice / perplexity tasks, the lm-eval-style model adapter, forgetting reports.

Library API (used by ``eval/run.py``, ``eval/forgetting.py`` and the continual-learning script)::

    from memlm.evaluation import evaluate, forgetting_report
    results = evaluate(model, tokenizer, "triviaqa,nq_open,worldfacts", limit=200, shots=0, batch_size=16)
    report = forgetting_report(base_results, [after_results])
"""

from memlm.evaluation.adapter import MemLMAdapter
from memlm.evaluation.forgetting import forgetting_report, format_report, plot_forgetting, relative_drop
from memlm.evaluation.metrics import normalize_answer, qa_scores
from memlm.evaluation.runner import evaluate, format_table, run_task
from memlm.evaluation.tasks import TaskError, TaskSpec, known_tasks, resolve_task, resolve_tasks

__all__ = [
    "MemLMAdapter",
    "TaskError",
    "TaskSpec",
    "evaluate",
    "forgetting_report",
    "format_report",
    "format_table",
    "known_tasks",
    "normalize_answer",
    "plot_forgetting",
    "qa_scores",
    "relative_drop",
    "resolve_task",
    "resolve_tasks",
    "run_task",
]
