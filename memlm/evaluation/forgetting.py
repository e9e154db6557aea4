"""Forgetting report: how much each task's score drops from a base model to one or more finetuned models.

``relative drop = (base - after) / base`` for higher-is-better metrics (F1, EM, accuracy) and
``(after - base) / base`` for lower-is-better ones (perplexity, bits per byte), so a positive number is always a
loss (SMF paper: NQ F1 drops 89% with full finetuning, 11% with sparse memory finetuning). A zero base gives None.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from memlm.evaluation.metrics import higher_is_better


def relative_drop(base: float, after: float, higher_better: bool = True) -> float | None:
    """Relative degradation from ``base`` to ``after`` (positive = worse); None when base is 0 or not finite."""
    if base is None or after is None or not math.isfinite(base) or not math.isfinite(after) or base == 0:
        return None
    return (base - after) / abs(base) if higher_better else (after - base) / abs(base)


def forgetting_report(
    base_results: dict[str, Any],
    after_results_list: list[dict[str, Any]],
    labels: list[str] | None = None,
    base_label: str = "base",
) -> dict[str, Any]:
    """Per task and metric: base value, each after-value, absolute change and relative drop.

    Args:
        base_results / after_results_list: results dicts from :func:`memlm.evaluation.evaluate` (tasks present in
            the base and an after-result are compared; others are skipped).
        labels: a name per after-result (default ``after1``, ``after2``, ...).
    Returns:
        ``{"base": label, "after": [labels], "tasks": {task: {"primary_metric", "metrics": {metric:
        {"higher_is_better", "base", "after": [...], "delta": [...], "relative_drop": [...]}}}},
        "summary": {label: {task: relative drop of the primary metric}}}``.
    """
    labels = list(labels or [f"after{i + 1}" for i in range(len(after_results_list))])
    if len(labels) != len(after_results_list):
        raise ValueError("forgetting_report: one label per after-result")
    report: dict[str, Any] = {"base": base_label, "after": labels, "tasks": {}, "summary": {lab: {} for lab in labels}}
    for task, b in base_results["tasks"].items():
        afters = [a["tasks"].get(task) for a in after_results_list]
        if all(a is None for a in afters):
            continue
        primary = b.get("primary_metric")
        names = b.get("spec", {}).get("metrics") or [k for k in b["metrics"] if not k.endswith("_stderr")]
        entry = {"primary_metric": primary, "metrics": {}}
        for m in names:
            hib = higher_is_better(m)
            bv = b["metrics"].get(m)
            avs = [None if a is None else a["metrics"].get(m) for a in afters]
            entry["metrics"][m] = {
                "higher_is_better": hib,
                "base": bv,
                "after": avs,
                "delta": [None if v is None or bv is None else v - bv for v in avs],
                "relative_drop": [relative_drop(bv, v, hib) for v in avs],
            }
        report["tasks"][task] = entry
        if primary in entry["metrics"]:
            for lab, d in zip(labels, entry["metrics"][primary]["relative_drop"]):
                report["summary"][lab][task] = d
    return report


def format_report(report: dict[str, Any]) -> str:
    """Markdown table of the primary metric per task: base, each after-value and its relative drop."""
    head = "| task | metric | " + report["base"] + " | " + " | ".join(f"{lab} (drop)" for lab in report["after"]) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(report["after"])]
    for task, e in report["tasks"].items():
        m = e["primary_metric"]
        r = e["metrics"][m]
        cells = []
        for v, d in zip(r["after"], r["relative_drop"]):
            cells.append("n/a" if v is None else f"{v:.4f} ({'n/a' if d is None else f'{100 * d:+.1f}%'})")
        lines.append(f"| {task} | {m} | {r['base']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_forgetting(report: dict[str, Any], out_png: str | Path) -> Path:
    """Two panels: primary metric per task across checkpoints, and relative drops as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    labels = [report["base"], *report["after"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2 + 1.6 * len(tasks) + 0.6 * len(labels)), 4))
    for t in tasks:
        e = report["tasks"][t]
        r = e["metrics"][e["primary_metric"]]
        ys = [r["base"], *r["after"]]
        ax1.plot(range(len(ys)), [float("nan") if y is None else y for y in ys], marker="o",
                 label=f"{t} ({e['primary_metric']})")  # fmt: skip
    ax1.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax1.set_title("primary metric")
    ax1.legend(fontsize=8)
    width = 0.8 / max(1, len(report["after"]))
    for k, lab in enumerate(report["after"]):
        vals = [report["summary"][lab].get(t) for t in tasks]
        xs = [i + (k - (len(report["after"]) - 1) / 2) * width for i in range(len(tasks))]
        ax2.bar(xs, [0.0 if v is None else 100 * v for v in vals], width, label=lab)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax2.set_ylabel("relative drop (%)")
    ax2.set_title(f"forgetting vs. {report['base']} (positive = worse)")
    if report["after"]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# path components that name what a run wrote, not the run: runs/smf/export -> "smf"
_GENERIC_PARTS = {"export", "checkpoints", "final", "model", "results"}


def _run_parts(path: str | Path) -> list[str]:
    parts = [p for p in Path(path).parts if p not in ("/", ".", "")]
    if parts and Path(parts[-1]).suffix in (".ckpt", ".json", ".safetensors"):
        parts = parts[:-1]  # runs/x/checkpoints/last.ckpt, runs/x/results.json
    while len(parts) > 1 and parts[-1].lower() in _GENERIC_PARTS:
        parts = parts[:-1]
    return parts


def run_labels(paths: list[str | Path]) -> list[str]:
    """Column names for checkpoints / exports / results files, named by run: ``runs/smf/export`` -> ``smf``,
    ``runs/full_ft/checkpoints/last.ckpt`` -> ``full_ft``. Runs whose names collide get as many parent directories as
    it takes to tell them apart (``a/smf``, ``b/smf``); identical paths get a ``1:``, ``2:`` prefix."""
    split = [_run_parts(p) or [str(p)] for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(parts[-d:]) for parts, d in zip(split, depth)]
        dup = {lab for lab in labels if labels.count(lab) > 1}
        grow = [i for i, lab in enumerate(labels) if lab in dup and depth[i] < len(split[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    if len(set(labels)) != len(labels):
        labels = [f"{i + 1}:{lab}" for i, lab in enumerate(labels)]
    return labels
