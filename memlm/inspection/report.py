"""Readable text for the inspection results (the JSON holds the same data in full)."""

from __future__ import annotations


def _toks(items: list[dict], n: int = 5) -> str:
    return " ".join(f"{d['piece']!r}({d['logit']:+.2f})" for d in items[:n])


def _df(item: dict, n_batches: int | None) -> str:
    return f"  df {item['df']}/{n_batches}" if "df" in item and n_batches else ""


def format_trace(tr: dict, n_batches: int | None = None) -> str:
    """One example's trace: per inspected token, per memory layer, the top slots and what they write."""
    lines = [f"== {tr['name']!r}", "tokens: " + " ".join(t.replace("\n", "\\n") for t in tr["tokens"])]
    for p in tr["positions"]:
        head = f"-- pos {p['pos']} {p['token']!r} -> predicts {p['predicts']!r} (p={p['p_predicts']:.3f})"
        if "target" in p:
            head += f"; target {p['target']!r} (p={p['p_target']:.3f})"
        lines.append(head)
        for lay in p["layers"]:
            tgt = f", target logit {lay['target_logit']:+.2f}" if "target_logit" in lay else ""
            lines.append(f"   memory layer {lay['layer']} (block {lay['block']}): |out| {lay['out_norm']:.3f}{tgt}; "
                         f"promotes {_toks(lay['promotes'])}")  # fmt: skip
            for s in lay["slots"]:
                tl = f"  target {s['target_logit']:+.2f}" if "target_logit" in s else ""
                lines.append(f"     slot {s['slot']:>8}  w {s['weight']:.3f}  |write| {s['write_norm']:.3f}{tl}"
                             f"{_df(s, n_batches)}  -> {_toks(s['promotes'])}")  # fmt: skip
    return "\n".join(lines)


def format_slot(info: dict, n_batches: int | None = None) -> str:
    """Slot -> contexts answer."""
    lines = [f"== slot {info['slot']} of memory layer {info['layer']} (block {info['block']})",
             f"read at {info['hits']} of {info['tokens_scanned']} tokens ({info['hit_rate']:.2%}) of {info['docs']} "
             f"documents; usage rank {info['usage_rank']} of {info['n_slots']}; total weight "
             f"{info['total_weight']:.3f}"]  # fmt: skip
    if "df" in info and n_batches:
        lines.append(f"background document frequency: {info['df']}/{n_batches} batches")
    nearest = [f"  score {c['score']:.3f} h{c['head']}{' *' if c['retrieved'] else '  '} {c['text']}"
               for c in info.get("nearest", [])]  # fmt: skip
    if nearest:
        nearest.insert(0, "contexts whose queries score the slot's key highest (faiss; * = slot in its top-k):")
    if info["hits"] == 0:
        lines.append("no token of the sample reads this slot (try more --docs or another --corpus)")
        return "\n".join(lines + nearest)
    if "promotes" in info:
        head = f"writes (mean over its top contexts, |write| {info['write_norm']:.3f}): "
        lines.append(head + _toks(info["promotes"], 8))
    lines.append("fires on: " + ", ".join(f"{p!r} x{c}" for p, c in info["fires_on"]))
    lines.append("followed by: " + ", ".join(f"{p!r} x{c}" for p, c in info["followed_by"]))
    lines.append("strongest contexts ([token read at] next token):")
    for c in info["contexts"]:
        lines.append(f"  w {c['weight']:.3f}  {c['text']}")
    return "\n".join(lines + nearest)


def format_diff(d: dict) -> str:
    """Two-checkpoint diff (the dict of :func:`memlm.inspection.cli.diff_json`)."""
    lines = [f"== diff: {d['base']} -> {d['after']}"]
    for t in d["tables"]:
        lines.append(
            f"{t['name']} (memory layers {t['layers']}): {t['n_changed']} of {t['n_rows']} rows changed"
            + (f"; |delta| max {t['max_delta']:.4g}, mean {t['mean_delta']:.4g}" if t["n_changed"] else "")
        )
        for r in t["rows"][: d.get("show_rows", 20)]:
            df = f"  df {r['df']}/{d['n_batches']}" if "df" in r else ""
            lines.append(f"  row {r['row']:>8}  |delta| {r['delta_norm']:.4g}  rel {r['rel_change']:.3g}{df}")
        if t["n_changed"] > d.get("show_rows", 20):
            lines.append(f"  ... {t['n_changed'] - d.get('show_rows', 20)} more rows in the JSON")
    other = d["other_changed"]
    if other:
        lines.append(f"other parameters changed: {len(other)} tensors, {sum(other.values())} of {d['other_total']} "
                     f"elements: " + ", ".join(list(other)[:8]) + (" ..." if len(other) > 8 else ""))  # fmt: skip
    else:
        lines.append(f"every other parameter ({d['other_total']} elements) is bitwise unchanged")
    return "\n".join(lines)


def format_hits(facts: list[dict]) -> str:
    """Per new fact: the changed slots its answer queries read and what the change writes."""
    lines = ["== new facts -> changed slots (queries of the finetuned model at the answer-predicting tokens)"]
    for f in facts:
        lines.append(f"-- {f['name']}")
        for p in f["positions"]:
            for lay in p["layers"]:
                head = (
                    f"   pos {p['pos']} -> {p['target']!r}  layer {lay['layer']}: {lay['changed_reads']}/"
                    f"{lay['reads']} reads hit changed rows ({lay['changed_weight']:.0%} of the weight)"
                )
                if "delta_promotes" in lay:
                    tl = f", target {lay['delta_target_logit']:+.2f}" if "delta_target_logit" in lay else ""
                    head += f"; the changes write {_toks(lay['delta_promotes'])}{tl}"
                lines.append(head)
                for s in lay["slots"][:5]:
                    tl = f"  target {s['target_logit']:+.2f}" if "target_logit" in s else ""
                    lines.append(f"     slot {s['slot']:>8}  w {s['weight']:.3f}  |delta write| "
                                 f"{s['delta_write_norm']:.3f}{tl}  -> {_toks(s['promotes'], 4)}")  # fmt: skip
    return "\n".join(lines)
