"""Knowledge-capacity scores of the ``people`` tasks: recall per exposure level and attribute, chance, bits.

Input: the task's rows (each with ``level``, ``attribute``, ``num_values``, ``answers``) and the per-example records
of the runner (``id``, ``exact_match``, ``f1``). Definitions (also docs/capacity.md):

- **chance** of an attribute with ``V`` values: ``1 / V``. Values are drawn uniformly and independently of the name,
  so any answer that does not depend on who is asked about is right with exactly this probability. ``majority`` (the
  empirical frequency of the most common answer among the rows scored) is reported beside it: what always answering
  that one value would score on this sample. ``lift`` = exact match - chance.
- **bits** of a group of ``n`` facts (one exposure level x one attribute) answered with exact-match accuracy ``a``::

      bits = n * max(0, log2 V - h(1 - a) - (1 - a) * log2(V - 1)),   h(p) = -p log2 p - (1-p) log2(1-p)

  Fano's inequality gives ``H(X | answer) <= h(Pe) + Pe log2(V - 1)`` for a uniform ``X`` with ``V`` values and error
  rate ``Pe = 1 - a``, so this is a lower bound on the mutual information between the true values and the model's
  answers, i.e. on the bits about these facts the model must hold (the capacity studies' "reduction in entropy of
  the attribute given the model"; they bound it from the model's loss, here from its greedy answers). Using the
  group's mean accuracy keeps it a lower bound (the bound is convex in the error rate, and the facts are independent).
  It is 0 at chance, ``log2 V`` per fact at ``a = 1``.
- **summary**: ``bits`` sums the groups of the levels ``k >= 1`` (facts the model saw); ``bits_max`` is the most
  possible (every seen fact right); ``bits_control`` is the same sum over level 0 (never seen): 0 up to sampling noise,
  the floor to read ``bits`` against. ``exact_match_seen`` / ``lift_seen`` pool every row of the levels ``k >= 1``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

from memlm.evaluation.metrics import mean_and_stderr, normalize_answer

REQUIRED_FIELDS = ("level", "attribute", "num_values")


def _h2(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def fano_bits(accuracy: float, num_values: int) -> float:
    """Bits per fact guaranteed by Fano's inequality when a uniform ``num_values``-valued attribute is answered with
    ``accuracy``: ``max(0, log2 V - h(1 - a) - (1 - a) log2(V - 1))``; 0 at or below chance (``a <= 1/V``)."""
    if num_values < 2 or accuracy <= 1.0 / num_values:
        return 0.0
    a = min(1.0, accuracy)
    err = 1.0 - a
    return max(0.0, math.log2(num_values) - _h2(err) - err * math.log2(num_values - 1))


def _summary(rows: list[dict], scores: list[dict]) -> dict:
    """n, EM and F1 (with standard errors), chance, lift and bits of one group of rows (one attribute or mixed)."""
    em, em_se = mean_and_stderr([s["exact_match"] for s in scores])
    f1, f1_se = mean_and_stderr([s["f1"] for s in scores])
    chance = sum(1.0 / r["num_values"] for r in rows) / len(rows)
    return {"n": len(rows), "exact_match": em, "exact_match_stderr": em_se, "f1": f1, "f1_stderr": f1_se,
            "chance": chance, "lift": em - chance}  # fmt: skip


def capacity_report(rows: Sequence[dict], preds: Sequence[dict]) -> dict:
    """Per-level and per-attribute recall, chance and bits (see the module docstring) of scored people rows.

    Returns ``{"levels": {k: {..., "bits", "attributes": {a: {...}}}}, "attributes": {a: {..., "num_values",
    "majority", "bits"}}, "bits", "bits_max", "bits_control", "exact_match_seen", "lift_seen", "n_seen",
    "n_control"}``; level keys are strings ("16") so the report is JSON as written.
    """
    missing = [f for f in REQUIRED_FIELDS if rows and f not in rows[0]]
    if missing:
        raise ValueError(f"capacity_report needs rows with {list(REQUIRED_FIELDS)}; these lack {missing}")
    by_id = {p["id"]: p for p in preds}
    lost = [r["id"] for r in rows if r["id"] not in by_id]
    if lost:
        raise ValueError(f"capacity_report: {len(lost)} row(s) have no prediction, e.g. {lost[0]}")
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["level"], r["attribute"])].append(r)
    attrs = list(dict.fromkeys(r["attribute"] for r in rows))

    levels: dict[str, dict] = {}
    bits = {"seen": 0.0, "control": 0.0, "max": 0.0}
    for k in sorted({r["level"] for r in rows}):
        level_rows = [r for r in rows if r["level"] == k]
        entry = _summary(level_rows, [by_id[r["id"]] for r in level_rows])
        entry["attributes"], entry["bits"] = {}, 0.0
        for a in attrs:
            g = groups.get((k, a))
            if not g:
                continue
            s = _summary(g, [by_id[r["id"]] for r in g])
            s["bits"] = s["n"] * fano_bits(s["exact_match"], g[0]["num_values"])
            entry["attributes"][a] = s
            entry["bits"] += s["bits"]
            if k > 0:
                bits["max"] += s["n"] * math.log2(g[0]["num_values"])
        bits["seen" if k > 0 else "control"] += entry["bits"]
        levels[str(k)] = entry

    attributes: dict[str, dict] = {}
    for a in attrs:
        seen = [r for r in rows if r["attribute"] == a and r["level"] > 0]
        every = [r for r in rows if r["attribute"] == a]
        s = _summary(seen or every, [by_id[r["id"]] for r in seen or every])
        counts = Counter(normalize_answer(r["answers"][0]) for r in every)
        s.update(num_values=every[0]["num_values"], majority=max(counts.values()) / len(every),
                 bits=sum(levels[str(k)]["attributes"][a]["bits"] for k in levels if int(k) > 0
                          and a in levels[str(k)]["attributes"]))  # fmt: skip
        attributes[a] = s

    seen = [r for r in rows if r["level"] > 0]
    pooled = _summary(seen, [by_id[r["id"]] for r in seen]) if seen else {}
    return {
        "levels": levels,
        "attributes": attributes,
        "bits": bits["seen"],
        "bits_max": bits["max"],
        "bits_control": bits["control"],
        "exact_match_seen": pooled.get("exact_match"),
        "lift_seen": pooled.get("lift"),
        "n_seen": len(seen),
        "n_control": sum(1 for r in rows if r["level"] == 0),
    }


def format_capacity(name: str, report: dict) -> str:
    """A markdown table: one row per exposure level (EM, lift over chance, bits) and the summary line."""
    attrs = list(report["attributes"])
    head = "| k | n | EM | chance | lift | " + " | ".join(f"EM {a}" for a in attrs) + " | bits |"
    lines = [f"{name}: recall per exposure level", head, "|" + "---:|" * (6 + len(attrs))]
    for k, e in report["levels"].items():
        per = [e["attributes"].get(a, {}).get("exact_match") for a in attrs]
        cells = " | ".join("" if v is None else f"{v:.3f}" for v in per)
        lines.append(f"| {k} | {e['n']} | {e['exact_match']:.3f} | {e['chance']:.3f} | {e['lift']:+.3f} | {cells} "
                     f"| {e['bits']:.1f} |")  # fmt: skip
    chance = " ".join(f"{a} {s['chance']:.3f}" for a, s in report["attributes"].items())
    lines.append(
        f"bits {report['bits']:.1f} of {report['bits_max']:.1f} possible (levels >= 1); control (k=0) "
        f"{report['bits_control']:.1f}; chance: {chance}"
    )
    return "\n".join(lines)
