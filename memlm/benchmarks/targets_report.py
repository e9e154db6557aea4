"""Markdown tables of ``eval/speed.py --sections g`` runs: the median ratio over runs and its range, per case and
thread count, one column per set of runs ("before" beside "after", or any labelled sets in order).

    python -m memlm.benchmarks.targets_report --before a.json b.json --after c.json d.json > targets_tables.md
    python -m memlm.benchmarks.targets_report --set v1 a.json b.json --set v2 c.json --set v3 d.json

Each JSON is one run of speed.py; every ratio in it was measured within that run (cases interleaved), so the spread
over runs shows how much the machine's load moved the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

PARTS = ("layers", "optimizer", "bandwidth", "training")  # bandwidth: the optimizer runs' diagnostic


def _ratios(paths: list[Path]) -> dict[str, dict[tuple, list[float]]]:
    """{part: {(case..., threads): [ratio of each run]}} for the parts of section g."""
    out: dict[str, dict[tuple, list[float]]] = {part: defaultdict(list) for part in PARTS}
    for p in paths:
        g = json.loads(p.read_text())["sections"]["g"]
        for r in g["layers"]:
            if r["vs_peer"] is not None:
                out["layers"][(r["slots"], r["layer"], r["threads"])].append(r["vs_peer"])
        for r in g["optimizer"]:
            out["optimizer"][(r["batch"], f"{r['frac']:.0%}", r["threads"])].append(r["vs_dense"])
            for field, step in (("sparse_gbs", "row-sparse"), ("dense_gbs", "dense fused")):
                if field in r:  # runs since the bandwidth diagnostic: each step's GB/s as a multiple of the copy's
                    key = (r["batch"], f"{r['frac']:.0%}", step, r["threads"])
                    out["bandwidth"][key].append(r[field] / r["copy_gbs"])
        for r in g["training"]:
            if not r["model"].startswith("dense"):
                out["training"][(r["model"], r["threads"])].append(r["vs_dense"])
    return out


def _cell(v: list[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"


def tables(before: list[Path], after: list[Path]) -> str:
    """Two sets of runs: "before" and "after"."""
    return labelled_tables({"before": before, "after": after})


def labelled_tables(sets: dict[str, list[Path]]) -> str:
    """One column per labelled set of runs, in order."""
    ratios = {label: _ratios(paths) for label, paths in sets.items()}
    heads = {"layers": ("slots", "layer", "threads"), "optimizer": ("batch", "rows touched", "threads"),
             "bandwidth": ("batch", "rows touched", "step", "threads"), "training": ("model", "threads")}  # fmt: skip
    what = {"layers": "x PyPI layer (target <= 0.7 for pkm / memory_plus)",
            "optimizer": "row-sparse step x dense fused Adam (target <= 1)",
            "bandwidth": "the step's GB/s (bytes Adam must move / time) x a table copy's GB/s (diagnostic)",
            "training": "tokens/s x dense twin (target >= 0.9)"}  # fmt: skip
    counts = ", ".join(f"{len(paths)} run(s) {label}" for label, paths in sets.items())
    lines = [f"Median over runs (range); {counts}.", ""]
    labels = list(sets)
    for part in PARTS:
        if not any(ratios[label][part] for label in labels):  # runs from before the part existed
            continue
        cols = [*heads[part], f"{labels[0]}: {what[part]}", *labels[1:]]
        lines += [f"**{part}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        keys = dict.fromkeys(k for label in reversed(labels) for k in ratios[label][part])
        for key in keys:
            cells = [_cell(ratios[label][part].get(key, [])) for label in labels]
            lines.append("| " + " | ".join([*(str(k) for k in key), *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m memlm.benchmarks.targets_report", description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, nargs="*", default=[], help="speed.py --sections g JSONs before a change")
    p.add_argument("--after", type=Path, nargs="*", default=[], help="... and after it")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar=("LABEL", "JSON"),
                   help="a labelled set of runs (repeatable; columns in the order given, after --before/--after)")
    args = p.parse_args(argv)
    sets = {k: v for k, v in (("before", args.before), ("after", args.after)) if v}
    for label, *paths in args.set:
        if not paths:
            p.error(f"--set {label}: give the label, then at least one JSON")
        sets[label] = [Path(x) for x in paths]
    if not sets:
        p.error("give runs: --after JSON... (with --before JSON...) or --set LABEL JSON...")
    print(labelled_tables(sets))


if __name__ == "__main__":
    main()
