"""Markdown tables of ``eval/speed.py --sections g`` runs: the median ratio over runs and its range, per case and
thread count, with a "before" set of runs beside an "after" set.

    python -m memlm.benchmarks.targets_report --before a.json b.json --after c.json d.json > targets_tables.md

Each JSON is one run of speed.py; every ratio in it was measured within that run (cases interleaved), so the spread
over runs shows how much the machine's load moved the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def _ratios(paths: list[Path]) -> dict[str, dict[tuple, list[float]]]:
    """{part: {(case..., threads): [ratio of each run]}} for the three parts of section g."""
    out: dict[str, dict[tuple, list[float]]] = {"layers": defaultdict(list), "optimizer": defaultdict(list),
                                                "training": defaultdict(list)}  # fmt: skip
    for p in paths:
        g = json.loads(p.read_text())["sections"]["g"]
        for r in g["layers"]:
            if r["vs_peer"] is not None:
                out["layers"][(r["slots"], r["layer"], r["threads"])].append(r["vs_peer"])
        for r in g["optimizer"]:
            out["optimizer"][(r["batch"], f"{r['frac']:.0%}", r["threads"])].append(r["vs_dense"])
        for r in g["training"]:
            if not r["model"].startswith("dense"):
                out["training"][(r["model"], r["threads"])].append(r["vs_dense"])
    return out


def _cell(v: list[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"


def tables(before: list[Path], after: list[Path]) -> str:
    b, a = _ratios(before), _ratios(after)
    heads = {"layers": ("slots", "layer", "threads"), "optimizer": ("batch", "rows touched", "threads"),
             "training": ("model", "threads")}  # fmt: skip
    what = {"layers": "x PyPI layer (target <= 0.7 for pkm / memory_plus)",
            "optimizer": "row-sparse step x dense fused Adam (target <= 1)",
            "training": "tokens/s x dense twin (target >= 0.9)"}  # fmt: skip
    lines = [f"Median over runs (range); {len(before)} run(s) before, {len(after)} after.", ""]
    for part in ("layers", "optimizer", "training"):
        cols = [*heads[part], f"before: {what[part]}", "after"]
        lines += [f"**{part}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for key in dict.fromkeys([*a[part], *b[part]]):
            lines.append("| " + " | ".join(str(k) for k in key) + f" | {_cell(b[part].get(key, []))} | "
                         f"{_cell(a[part].get(key, []))} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m memlm.benchmarks.targets_report", description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, nargs="*", default=[], help="speed.py --sections g JSONs before a change")
    p.add_argument("--after", type=Path, nargs="+", required=True, help="... and after it")
    args = p.parse_args(argv)
    print(tables(args.before, args.after))


if __name__ == "__main__":
    main()
