"""Continual-finetuning reports (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"): learning vs
forgetting per method across stages (PNG) and one comparison table (markdown).

Every function takes ``{label: run summary}`` where a run summary is what :func:`memlm.continual.script.run`
returns (its ``stages`` list holds :func:`memlm.continual.stage_eval.summarize` dicts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlm.continual.stage_eval import HELDIN, PPL


def _forget(stage: dict, task: str, metric: str | None = None) -> tuple[float | None, float | None, float | None]:
    """(base, after, relative drop) of ``task``'s ``metric`` (its primary metric when None) in one stage summary."""
    f = stage["forgetting"].get(task)
    if not f:
        return None, None, None
    r = f[metric or f["primary_metric"]]
    return r["base"], r["after"], r["relative_drop"]


def plot_stages(runs: dict[str, dict[str, Any]], out_png: str | Path) -> Path:
    """Three panels across stages: new-fact EM (learned so far), held-in fact F1 drop, held-out perplexity increase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, run in runs.items():
        st = run["stages"]
        xs = [0] + [s["stage"] for s in st]
        learn = [st[0]["base_learning"]["exact_match"] if st else 0.0] + [s["learning"]["exact_match"] for s in st]
        axes[0].plot(xs, [100 * v for v in learn], marker="o", label=label)
        heldin = [0.0] + [100 * (_forget(s, HELDIN, "f1")[2] or 0.0) for s in st]
        axes[1].plot(xs, heldin, marker="o", label=label)
        ppl = [0.0] + [100 * (_forget(s, PPL, "token_perplexity")[2] or 0.0) for s in st]
        axes[2].plot(xs, ppl, marker="o", label=label)
    titles = ["learning: new-fact EM, facts so far (%)", "forgetting: held-in fact F1 drop (%)",
              "forgetting: held-out perplexity increase (%)"]  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("stage")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def table_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, from its last stage."""
    rows = []
    for label, run in runs.items():
        last = run["stages"][-1]
        hb, ha, hd = _forget(last, HELDIN, "f1")
        pb, pa, pd = _forget(last, PPL, "token_perplexity")
        ret = last["retention"].get("new_facts_stage1")
        rows.append({
            "method": label,
            "optim": f"{run['config']['optim']['name']} lr={run['config']['optim']['lr']:g}",
            "new_em": last["learning"]["exact_match"], "new_f1": last["learning"]["f1"],
            "stage1_em_at_end": None if ret is None else ret["exact_match"],
            "heldin_f1_base": hb, "heldin_f1_after": ha, "heldin_f1_drop": hd,
            "ppl_base": pb, "ppl_after": pa, "ppl_increase": pd,
            "trainable": run["method"].get("trainable_params"), "steps": run["steps"], "wall_s": run["wall_s"],
            "extra": {t: _forget(last, t)[2] for t in last["forgetting"] if t not in (HELDIN, PPL)},
        })  # fmt: skip
    return rows


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: learning (new-fact EM/F1) vs forgetting (held-in F1 drop, perplexity increase) per method."""
    rows = table_rows(runs)
    extra = sorted({t for r in rows for t in r["extra"]})
    head = ("| method | optimizer | new-fact EM | new-fact F1 | stage-1 EM at end | held-in F1 (base -> after) | "
            "held-in F1 drop | ppl (base -> after) | ppl increase | " + "".join(f"{t} drop | " for t in extra)
            + "trainable params | steps | wall s |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ret = "n/a" if r["stage1_em_at_end"] is None else f"{100 * r['stage1_em_at_end']:.1f}%"
        hb = "n/a" if r["heldin_f1_base"] is None else f"{r['heldin_f1_base']:.3f} -> {r['heldin_f1_after']:.3f}"
        pb = "n/a" if r["ppl_base"] is None else f"{r['ppl_base']:.2f} -> {r['ppl_after']:.2f}"
        cells = [
            r["method"],
            r["optim"],
            f"{100 * r['new_em']:.1f}%",
            f"{100 * r['new_f1']:.1f}%",
            ret,
            hb,
            _pct(r["heldin_f1_drop"]),
            pb,
            _pct(r["ppl_increase"]),
            *[_pct(r["extra"].get(t)) for t in extra],
            f"{r['trainable']:,}" if r["trainable"] is not None else "n/a",
            str(r["steps"]),
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
