"""Pictures of slot usage: the sorted usage curve of each memory layer, the slots a fact set touches, and the sizes of
the value-row changes between two checkpoints (matplotlib, Agg backend, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, ax, path: str | Path) -> Path:
    """Grid, tight layout, write the PNG and free the figure."""
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_usage_curve(usage: list[torch.Tensor], path: str | Path, title: str = "slot usage over the corpus sample"):
    """usage: per memory layer (rows,) read counts -> log-log curve of counts sorted descending (+ unused share)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, u in enumerate(usage):
        c = u.double().sort(descending=True).values.numpy()  # (rows,)
        used = (c > 0).mean()
        ranks = np.arange(1, len(c) + 1)
        ax.loglog(ranks[c > 0], c[c > 0], label=f"memory layer {j}: {used:.1%} of {len(c)} slots used")
    ax.set_xlabel("slot rank")
    ax.set_ylabel("reads")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, ax, path)


def plot_fact_slots(
    weights: list[dict[int, dict[str, float]]], names: list[str], path: str | Path, max_slots: int = 40
) -> Path:
    """Heatmap per memory layer: rows = examples, columns = the slots with the largest total weight over the set,
    colour = the example's mean |weight| on the slot per inspected token. ``weights[j][slot][example_name]``."""
    n = len(weights)
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 0.22 * max_slots + 2), 0.3 * len(names) * n + 1.6 * n),
                             squeeze=False)  # fmt: skip
    for j, (ax, per_slot) in enumerate(zip(axes[:, 0], weights)):
        top = sorted(per_slot, key=lambda s: -sum(per_slot[s].values()))[:max_slots]
        grid = np.array([[per_slot[s].get(nm, 0.0) for s in top] for nm in names]) if top else np.zeros((len(names), 1))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(names)), [nm[:40] for nm in names], fontsize=7)
        ax.set_xticks(range(len(top)), [str(s) for s in top], rotation=90, fontsize=6)
        ax.set_title(f"memory layer {j}: slots read at the inspected tokens (mean |weight| per token)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_row_changes(tables: list, path: str | Path) -> Path:
    """Sorted L2 norms of the changed value rows of each table (a :class:`memlm.inspection.diff.TableDiff` list)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for t in tables:
        d = t.delta_norm.sort(descending=True).values.numpy()
        if len(d):
            ax.semilogy(np.arange(1, len(d) + 1), d, marker=".", label=f"{t.name}: {len(d)} of {t.n_rows} rows changed")
    ax.set_xlabel("changed row (sorted)")
    ax.set_ylabel("||after - base||")
    ax.set_title("value rows changed by finetuning")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, ax, path)
