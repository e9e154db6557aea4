"""The learning / forgetting frontier of continual finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory
Finetuning", Figs. 3-4): every method is a curve over its hyper-parameters of learning (F1 on the new facts) against
forgetting (relative drop on what the base model knew), and methods are compared at matched learning.

Pure functions over per-run metric dicts (``{"learning_f1": ..., "forgetting_f1": ..., ...}``): aggregation over
seeds (mean and standard error), the Pareto frontier of each method, forgetting interpolated at a common learning
level, a markdown table and a plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlm.experiments.seeds import aggregate, mean_se  # noqa: F401  (part of this module's API)

# metric name -> how it is read from a run's last stage summary (memlm.continual.stage_eval.summarize)
LEARN, FORGET = "learning_f1", "forgetting_f1"
METRICS = ("learning_f1", "learning_em", "forgetting_f1", "forgetting_em", "ppl_increase", "heldin_all_f1_drop")


def run_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    """The frontier metrics of one finished run (its ``summary.json``): learning on the new facts after the last
    stage, forgetting on the held-in facts the base model knew (``heldin_known``; all held-in facts as a second
    number), the relative increase of held-out text perplexity, and SMF's mean per-step diagnostics."""
    last = summary["stages"][-1]
    f = last["forgetting"]

    def drop(task: str, metric: str) -> float | None:
        r = (f.get(task) or {}).get(metric)
        return None if not isinstance(r, dict) else r.get("relative_drop")

    out: dict[str, float | None] = {
        "learning_f1": last["learning"]["f1"],
        "learning_em": last["learning"]["exact_match"],
        "base_learning_f1": last["base_learning"]["f1"],
        "forgetting_f1": drop("heldin_known", "f1"),
        "forgetting_em": drop("heldin_known", "exact_match"),
        "heldin_known_n": (f.get("heldin_known") or {}).get("n"),
        "ppl_increase": drop("heldout_text", "token_perplexity"),
        "heldin_all_f1_drop": drop("heldin", "f1"),
    }
    for k, v in last.get("train", {}).items():
        if k.startswith("mean_smf/"):
            out[k.removeprefix("mean_")] = v
    out["rows_updated_frac"] = summary.get("method", {}).get("rows_updated_frac")
    return out


def pareto(
    points: list[dict[str, Any]], learn: str = LEARN, forget: str = FORGET, origin: float | None = None
) -> list[dict[str, Any]]:
    """The points no other point beats (learning >= and forgetting <=, one of them strictly), by increasing
    learning. Each point is ``{"agg": aggregate(...), ...}``; points without both numbers are skipped. ``origin``: the
    base model's learning level; the base itself (that learning, forgetting 0) is a virtual competitor, so a point
    that learns no more than the base but forgets is never on the frontier."""
    ok = [p for p in points if p["agg"].get(learn, {}).get("mean") is not None
          and p["agg"].get(forget, {}).get("mean") is not None]  # fmt: skip
    if origin is not None:
        ok = [p for p in ok if p["agg"][learn]["mean"] > origin or p["agg"][forget]["mean"] <= 0]

    def lf(p):
        return p["agg"][learn]["mean"], p["agg"][forget]["mean"]

    front = []
    for p in ok:
        lp, fp = lf(p)
        beaten = any((lq >= lp and fq <= fp) and (lq > lp or fq < fp) for lq, fq in map(lf, ok) if (lq, fq) != (lp, fp))
        if not beaten:
            front.append(p)
    return sorted(front, key=lambda p: lf(p)[0])


def forgetting_at(
    front: list[dict[str, Any]], level: float, learn: str = LEARN, forget: str = FORGET, origin: float | None = None
):
    """(forgetting, its standard error) at learning ``level`` along a frontier, linear between frontier points (the
    standard errors are interpolated the same way). ``origin``: the base model's learning level, where forgetting is
    0 by definition (no update): below the first frontier point the line runs from there. None when the frontier does
    not reach ``level``."""
    if not front:
        return None, None
    pts = [(p["agg"][learn]["mean"], p["agg"][forget]["mean"], p["agg"][forget].get("se")) for p in front]
    if origin is not None and origin < pts[0][0]:
        pts.insert(0, (origin, 0.0, 0.0))
    if level > pts[-1][0] + 1e-12:
        return None, None
    if level <= pts[0][0]:
        return pts[0][1], pts[0][2]  # the least-forgetting point already learns this much
    for (l0, f0, s0), (l1, f1, s1) in zip(pts, pts[1:]):
        if l0 <= level <= l1:
            w = 0.0 if l1 == l0 else (level - l0) / (l1 - l0)
            se = None if s0 is None or s1 is None else (1 - w) * s0 + w * s1
            return (1 - w) * f0 + w * f1, se
    return pts[-1][1], pts[-1][2]


def matched_level(fronts: dict[str, list[dict[str, Any]]], learn: str = LEARN) -> float | None:
    """The highest learning level every method's frontier reaches (None when a method has no frontier)."""
    tops = [f[-1]["agg"][learn]["mean"] for f in fronts.values() if f]
    if not tops or len(tops) < len(fronts):
        return None
    return min(tops)


def _mean(agg: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    """``agg[key]``'s mean, scaled, without its standard error ("n/a" when missing)."""
    v = (agg.get(key) or {}).get("mean")
    return "n/a" if v is None else f"{scale * v:.{digits}f}"


def _fmt(agg: dict[str, Any], key: str, pct: bool = True) -> str:
    e = agg.get(key) or {}
    m, se = e.get("mean"), e.get("se")
    if m is None:
        return "n/a"
    scale = 100.0 if pct else 1.0
    s = f"{scale * m:.1f}" if pct else f"{m:.3g}"
    return s + (f" ± {scale * se:.1f}" if se is not None and pct else (f" ± {se:.2g}" if se is not None else ""))


def markdown(report: dict[str, Any]) -> str:
    """The frontier table (every point, frontier points marked; the frontier is taken over ``report["forgetting"]``)
    and the matched-learning comparison."""
    lines = [
        "| method | setting | seeds | learning F1 % | forgetting F1 % (known held-in) | held-out ppl +% | "
        "held-in (all) F1 drop % | frontier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        a = p["agg"]
        lines.append(
            f"| {p['method']} | {p['label']} | {a.get(LEARN, {}).get('n', 0)} | {_fmt(a, LEARN)} | {_fmt(a, FORGET)} | "
            f"{_fmt(a, 'ppl_increase')} | {_fmt(a, 'heldin_all_f1_drop')} | {'yes' if p.get('frontier') else ''} |"
        )
    diag = [p for p in report["points"] if "smf/selected" in p["agg"]]
    if diag:
        lines += ["", "SMF diagnostics (means over steps and seeds): rows read per batch, rows selected, share of "
                      "the batch's reads the selection covers, overlap with the previous fact's selection, share of "
                      "selected rows among the slots the known held-in answers read (vs that set's share of the "
                      "table), relative change of the updated rows per step, share of the table ever updated:", "",
                  "| setting | rows read | selected | coverage % | prev-fact overlap % | held-in slot overlap % "
                  "(chance) | rel. change per step % | table updated % |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in diag:
            a = p["agg"]

            def g(k, scale=100.0, digits=1, a=a):
                return _mean(a, k, scale, digits)

            lines.append(f"| {p['label']} | {g('smf/rows_read', 1, 0)} | {g('smf/selected', 1, 0)} | "
                         f"{g('smf/access_coverage')} | {g('smf/overlap_prev_fact')} | "
                         f"{g('smf/protected_overlap', 100, 2)} ({g('smf/protected_frac', 100, 2)}) | "
                         f"{g('smf/rel_change', 100, 2)} | {g('rows_updated_frac', 100, 2)} |")  # fmt: skip
    m = report.get("matched")
    if m and m.get("level") is not None and m.get("origin") is not None and m["level"] <= m["origin"]:
        lines += [
            "",
            "No method's frontier learns more than the base model already knew (new-fact F1 "
            f"{100 * m['origin']:.1f} %): there is no matched learning level to compare forgetting at.",
        ]
    elif m and m.get("level") is not None:
        lines += ["", f"Forgetting ({report.get('forgetting', FORGET)}) at matched learning (new-fact F1 = "
                      f"{100 * m['level']:.1f} %, the highest level every method's frontier reaches; linear between "
                      "frontier points):", "",
                  "| method | forgetting % | ± SE | × sparse_memory |", "|---|---|---|---|"]  # fmt: skip
        ref = m["forgetting"].get("sparse_memory", {}).get("mean")
        for meth, e in m["forgetting"].items():
            v, se = e.get("mean"), e.get("se")
            ratio = "" if not ref or v is None else f"{v / ref:.2f}"
            lines.append(f"| {meth} | {'n/a' if v is None else f'{100 * v:.1f}'} | "
                         f"{'' if se is None else f'{100 * se:.1f}'} | {ratio} |")  # fmt: skip
    pw = (m or {}).get("pairwise") or {}
    if pw:
        lines += ["", "Pairwise against SMF, each at the highest new-fact F1 both frontiers reach:", "",
                  "| method | at learning F1 % | its forgetting % | SMF forgetting % | SMF ÷ method |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for meth, e in pw.items():
            a, b = e[meth], e["sparse_memory"]
            ratio = "" if not a.get("mean") or b.get("mean") is None else f"{b['mean'] / a['mean']:.2f}"
            lines.append(
                f"| {meth} | {100 * e['level']:.1f} | {_fmt(e, meth)} | {_fmt(e, 'sparse_memory')} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out_png: str | Path) -> Path:
    """Two panels: forgetting of the known held-in facts, and held-out perplexity increase, against learning; one
    colour per method, every point faint, the frontier as a line with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = report.get("forgetting", FORGET)
    panels = (fg, "ppl_increase" if fg != "ppl_increase" else FORGET)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"sparse_memory": "tab:green", "full": "tab:red", "lora": "tab:blue", "memory_only": "tab:orange"}
    for meth in dict.fromkeys(p["method"] for p in report["points"]):
        pts = [p for p in report["points"] if p["method"] == meth]
        c = colors.get(meth)
        for ax, key in zip(axes, panels):
            xs = [100 * p["agg"][LEARN]["mean"] for p in pts if p["agg"].get(key, {}).get("mean") is not None]
            ys = [100 * p["agg"][key]["mean"] for p in pts if p["agg"].get(key, {}).get("mean") is not None]
            ax.scatter(xs, ys, color=c, alpha=0.3, s=18)
            front = sorted((p for p in pts if p.get("frontier") and p["agg"].get(key, {}).get("mean") is not None),
                           key=lambda p: p["agg"][LEARN]["mean"])  # fmt: skip
            if front:
                ax.errorbar(
                    [100 * p["agg"][LEARN]["mean"] for p in front],
                    [100 * p["agg"][key]["mean"] for p in front],
                    xerr=[100 * (p["agg"][LEARN].get("se") or 0) for p in front],
                    yerr=[100 * (p["agg"][key].get("se") or 0) for p in front],
                    color=c, marker="o", label=meth, capsize=3,
                )  # fmt: skip
    names = {
        FORGET: "F1 drop on known held-in facts (%)",
        "forgetting_em": "EM drop on known held-in facts (%)",
        "ppl_increase": "held-out text perplexity increase (%)",
        "heldin_all_f1_drop": "held-in F1 drop (%)",
    }
    for ax, key in zip(axes, panels):
        ax.set_ylabel(names.get(key, key))
        top = max((100 * p["agg"][key]["mean"] for p in report["points"] if p["agg"].get(key, {}).get("mean")),
                  default=0.0)  # fmt: skip
        if top > 300:  # perplexity blow-ups of the baselines would flatten everything else
            ax.set_yscale("symlog", linthresh=10)
    for ax in axes:
        ax.set_xlabel("learning: F1 on the new facts (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("learning vs forgetting (frontier per method, mean ± SE over seeds)")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
