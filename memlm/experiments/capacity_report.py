"""The capacity ladder's report (:mod:`memlm.experiments.capacity`): per-run rows aggregated over seeds (mean ± SE),
the pooled lift against the equal-FLOP baseline and the 2x-FLOP reference, the markdown tables and the two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlm.experiments.seeds import aggregate, difference, fmt_pm, ratio

# per-run numbers aggregated over seeds (from the eval's capacity report and the launcher summary)
METRICS = ("exact_match_seen", "lift_seen", "bits", "bits_control", "control_em", "k50", "val_loss")
SLOT_KEYS = ("coverage", "distinct_slots", "shared_frac", "conflict_frac", "top1_weight")
SLOT_READS_NOTE = (
    "Memory reads of the fact prompts (first memory layer; memlm/inspection/fact_slots.py): at the answer position "
    "(end of the cloze prompt) and at the subject position (last token of the name). coverage = distinct slots read "
    "by all prompts / table slots; shared / conflict = share of a fact's slots that another person's fact reads too / "
    "another person's fact with another answer."
)

# ----------------------------------------------------------------------------------------------------------------------
# aggregation over seeds and the report


def summarize(ladder: dict, rows: list[dict]) -> dict[str, Any]:
    """Per model: every metric and every exposure level's recall as mean ± SE over seeds; then the pooled lift as
    a ratio to the baseline and the difference to the reference (both with standard errors)."""
    models: dict[str, Any] = {}
    for m in ladder["models"]:
        runs = [r for r in rows if r["model"] == m["name"]]
        if not runs:
            continue
        levels = sorted({k for r in runs for k in r["levels"]}, key=int)
        first = runs[0]
        models[m["name"]] = {
            "seeds": sorted(r["seed"] for r in runs),
            "agg": aggregate(runs, list(METRICS)),
            "levels": {k: aggregate([r["levels"][k] for r in runs if k in r["levels"]], ["exact_match", "lift"])
                       | {"chance": first["levels"][k]["chance"], "n": first["levels"][k]["n"]} for k in levels},
            "attributes": {a: aggregate([r["attributes"][a] for r in runs], ["exact_match", "lift"])
                           | {"chance": first["attributes"][a]["chance"]} for a in first["attributes"]},
            "slot_reads": {pos: aggregate([r["slot_reads"][pos] for r in runs], list(SLOT_KEYS))
                           for pos in ("answer", "subject")} if first.get("slot_reads") else None,
            **{k: first[k] for k in ("kind", "slots", "active_params", "total_params", "memory_values",
                                     "flops_per_token", "bits_max")},
        }  # fmt: skip
    base, ref = ladder.get("baseline"), ladder.get("reference")
    for name, e in models.items():
        lift = e["agg"]["lift_seen"]
        # how many seeds reach 50 % EM at all (k50 averages only those: a censored seed would otherwise vanish)
        e["k50_reached"] = sum(r["k50"] is not None for r in rows if r["model"] == name)
        if base in models:
            e["flops_vs_baseline"] = e["flops_per_token"] / models[base]["flops_per_token"]
            if name != base:  # (a model against itself is 1 by definition, not a measurement)
                e["lift_vs_baseline"] = ratio(lift, models[base]["agg"]["lift_seen"])
                e["em_minus_baseline"] = {k: difference(v["exact_match"], models[base]["levels"][k]["exact_match"])
                                          for k, v in e["levels"].items() if k in models[base]["levels"]}  # fmt: skip
        if ref in models and name != ref:
            e["lift_minus_reference"] = difference(lift, models[ref]["agg"]["lift_seen"])
    return {"baseline": base, "reference": ref, "models": models}


def markdown(ladder: dict, summary: dict, meta: dict) -> str:
    ms = summary["models"]
    base, ref = summary["baseline"] or "-", summary["reference"] or "-"
    levels = sorted({k for e in ms.values() for k in e["levels"]}, key=int)
    md = ["# Knowledge capacity ladder", "", f"Command: `{meta['command']}`", "",
          f"Machine: {meta['device']}; torch {meta['torch']}; {meta['date']}. Ladder {meta['ladder']}, recipe "
          f"{meta['recipe']}. Mean ± standard error over seeds (training seed; the invented people are the same in "
          "every run). EM: greedy exact match on the cloze prompt; lift = EM - chance; pooled over every row of the "
          "levels k >= 1. k50: exposures at which recall reaches 50 % EM (log-linear between levels; lower = "
          "fewer appearances needed). Bits: Fano lower bound on the facts' mutual information with the answers "
          "(docs/capacity.md); control = the never-seen level 0, the noise floor.", ""]  # fmt: skip
    md += ["| model | seeds | slots | active params | FLOPs × " + str(base) + " | val loss | EM seen (%) | lift (%) | "
           f"lift × {base} | lift − {ref} (pts) | k50 | bits | bits control | EM control (%) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in ms.items():
        a = e["agg"]
        vs, dr = e.get("lift_vs_baseline") or {}, e.get("lift_minus_reference") or {}
        tag = "" if dr.get("level") is None else (" (level)" if dr["level"] else "")
        md.append(
            f"| {name} | {len(e['seeds'])} | {e['slots'] or '-'} | {e['active_params']:,} | "
            f"{_num(e.get('flops_vs_baseline'))} | {fmt_pm(a['val_loss'], digits=3)} | "
            f"{fmt_pm(a['exact_match_seen'], 100)} | {fmt_pm(a['lift_seen'], 100)} | {fmt_pm(vs, digits=2)} | "
            f"{fmt_pm(dr, 100)}{tag} | {_k50(e)} | {fmt_pm(a['bits'], digits=0)} | "
            f"{fmt_pm(a['bits_control'], digits=0)} | {fmt_pm(a['control_em'], 100)} |"
        )
    md += ["", "Recall (EM %) per exposure level k (appearances in the corpus; the training run passes over the corpus "
           f"{meta.get('epochs', '?')} times):", "",
           "| model | " + " | ".join(f"k={k}" for k in levels) + " |", "|---|" + "---|" * len(levels)]  # fmt: skip
    for name, e in ms.items():
        md.append(f"| {name} | " + " | ".join(fmt_pm(e["levels"].get(k, {}).get("exact_match"), 100) for k in levels)
                  + " |")  # fmt: skip
    chance = next(iter(ms.values()))["levels"]
    md.append("| chance | " + " | ".join(f"{100 * chance[k]['chance']:.1f}" for k in levels) + " |")
    diffs = {n: e["em_minus_baseline"] for n, e in ms.items() if e.get("em_minus_baseline")}
    if diffs:
        md += ["", f"EM − {base} per exposure level (points, ± SE; * = resolved at 95 % by Welch's t test, otherwise "
               "level):", "", "| model | " + " | ".join(f"k={k}" for k in levels) + " |",
               "|---|" + "---|" * len(levels)]  # fmt: skip
        for name, d in diffs.items():
            cells = [fmt_pm(d.get(k), 100) + ("*" if (d.get(k) or {}).get("level") is False else "") for k in levels]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
    attrs = list(next(iter(ms.values()))["attributes"])
    md += ["", "Recall (EM %) per attribute, pooled over k >= 1:", "",
           "| model | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]  # fmt: skip
    for name, e in ms.items():
        md.append(f"| {name} | " + " | ".join(fmt_pm(e["attributes"][a]["exact_match"], 100) for a in attrs) + " |")
    mem = {n: e for n, e in ms.items() if e.get("slot_reads")}
    if mem:
        md += ["", SLOT_READS_NOTE, "",
               "| model | slots | position | distinct slots | coverage (%) | shared (%) | conflict (%) | top-1 w |",
               "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, e in mem.items():
            for pos, a in e["slot_reads"].items():
                md.append(f"| {name} | {e['slots']} | {pos} | {fmt_pm(a['distinct_slots'], digits=0)} | "
                          f"{fmt_pm(a['coverage'], 100, 2)} | {fmt_pm(a['shared_frac'], 100)} | "
                          f"{fmt_pm(a['conflict_frac'], 100)} | {fmt_pm(a['top1_weight'], digits=3)} |")  # fmt: skip
    return "\n".join(md) + "\n"


def _k50(e: dict) -> str:
    """k50 mean ± SE, with the count of seeds that reach 50 % when not all do (the others are > the top level)."""
    cell = fmt_pm(e["agg"]["k50"], digits=1)
    n = len(e["seeds"])
    return cell if e.get("k50_reached", n) == n else f"{cell} ({e['k50_reached']} of {n} seeds reach 50 %)"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Both plots' common finish: log2 x axis, labels, grid, legend, title; written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title} (mean ± SE over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """recall_vs_exposure.png (EM per level, one line per model, chance dashed) and recall_vs_memory_size.png
    (pooled lift against slots for the memory models, the dense models as horizontal bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = summary["models"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, e in ms.items():
        ks = sorted(e["levels"], key=int)
        xs = [max(int(k), 0.5) for k in ks]  # k = 0 (never seen) drawn at 0.5 on the log axis
        ys = [100 * e["levels"][k]["exact_match"]["mean"] for k in ks]
        err = [100 * (e["levels"][k]["exact_match"]["se"] or 0) for k in ks]
        style = "--" if e["kind"] == "dense" else "-"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, linestyle=style)
    first = next(iter(ms.values()))["levels"]
    ks = sorted(first, key=int)
    ax.plot([max(int(k), 0.5) for k in ks], [100 * first[k]["chance"] for k in ks], "k:", label="chance")
    paths.append(_save(fig, ax, "exposure level k (appearances in the corpus; 0.5 = never seen)", "exact match (%)",
                       "recall vs exposure", out_dir / "recall_vs_exposure.png"))  # fmt: skip

    mem = {n: e for n, e in ms.items() if e["slots"]}
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind in dict.fromkeys(e["kind"] for e in mem.values()):
            pts = sorted((e for e in mem.values() if e["kind"] == kind), key=lambda e: e["slots"])
            ax.errorbar([e["slots"] for e in pts], [100 * e["agg"]["lift_seen"]["mean"] for e in pts],
                        yerr=[100 * (e["agg"]["lift_seen"]["se"] or 0) for e in pts], marker="o", capsize=3,
                        label=kind)  # fmt: skip
        for (name, e), c in zip(((n, e) for n, e in ms.items() if not e["slots"]), ("tab:gray", "k", "tab:brown")):
            m, se = 100 * e["agg"]["lift_seen"]["mean"], 100 * (e["agg"]["lift_seen"]["se"] or 0)
            ax.axhline(m, color=c, linestyle="--", label=f"{name} ({e['active_params'] / 1e6:.2f}M active)")
            ax.axhspan(m - se, m + se, color=c, alpha=0.15)
        paths.append(_save(fig, ax, "memory slots", "pooled lift over chance, k >= 1 (%)", "recall vs memory size",
                           out_dir / "recall_vs_memory_size.png"))  # fmt: skip
    return paths
