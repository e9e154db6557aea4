"""The command line behind ``eval/inspect_memory.py``: which slots hold which fact.

::

    python eval/inspect_memory.py --ckpt runs/tiny/export --text "The capital of France is"
    python eval/inspect_memory.py --ckpt runs/tiny/export --qa worldfacts:pretrain --limit 5 --out inspect_out
    python eval/inspect_memory.py --ckpt runs/tiny/export --slot 81237 --layer 0 [--corpus FILE] [--docs 300]
    python eval/inspect_memory.py --ckpt BASE --after FINETUNED [--qa new_facts.jsonl]

Writes a text report to stdout and, with ``--out DIR``, ``report.txt``, ``report.json`` and PNGs (``fact_slots.png``,
``usage.png``, ``row_changes.png``). Errors a user causes (a path that is not a checkpoint, a model without memory
layers, bad QA data, a slot out of range) print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from memlm.config import ConfigError
from memlm.continual.background import BackgroundError
from memlm.data.errors import DataError
from memlm.export import CheckpointError
from memlm.inspection.background import SlotFrequency, load_background
from memlm.inspection.capture import InspectionError, require_memory
from memlm.inspection.contexts import record_corpus, slot_contexts
from memlm.inspection.diff import CheckpointDiff, diff_checkpoints, facts_hitting_changes
from memlm.inspection.plots import plot_fact_slots, plot_row_changes, plot_usage_curve
from memlm.inspection.readout import TokenReadout, byte_tokens
from memlm.inspection.report import format_diff, format_hits, format_slot, format_trace
from memlm.inspection.trace import Example, qa_example, text_example, trace_example
from memlm.utils.cli import RawHelpFormatter

USER_ERRORS = (ConfigError, CheckpointError, DataError, InspectionError, BackgroundError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/inspect_memory.py", description=__doc__.split("\n")[0],
                                formatter_class=RawHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt", required=True, help="export directory (runs/<name>/export) or Lightning .ckpt")
    p.add_argument("--text", action="append", default=[], help="text whose every token is traced (repeatable)")
    p.add_argument("--qa", default=None, help="QA .jsonl/.csv file, or a built-in name[:split] (worldfacts:heldout); "
                                              "traces the tokens that predict each answer")  # fmt: skip
    p.add_argument("--limit", type=int, default=10, help="at most N QA rows")
    p.add_argument("--last", type=int, default=None, help="--text: trace only the last N tokens (default: all)")
    p.add_argument("--slot", type=int, action="append", default=[], help="slot id to explain (repeatable)")
    p.add_argument("--layer", type=int, default=None, help="memory layer index (0-based; default: all, 0 for --slot)")
    p.add_argument(
        "--corpus",
        default=None,
        help="corpus sample for --slot: .txt (blank-line separated) or .jsonl "
        "('text' field); default: worldfacts pretrain documents",
    )
    p.add_argument("--docs", type=int, default=300, help="documents sampled from the corpus for --slot")
    p.add_argument("--after", default=None, help="a finetuned checkpoint of --ckpt: diff its value rows")
    p.add_argument("--top-slots", type=int, default=5, dest="top_slots", help="slots shown per traced token")
    p.add_argument("--top-tokens", type=int, default=5, dest="top_tokens", help="tokens shown per slot read-out")
    p.add_argument("--bytes", action="store_true", help="also read out byte-fallback tokens (<0x41>; off by default)")
    p.add_argument("--background", default=None, help="SMF background statistics file (default: beside --ckpt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir, if the checkpoint has none")
    p.add_argument("--out", default=None, help="directory for report.txt, report.json and PNGs")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load(path: str, tokenizer: str | None, device: str):
    """(model, tokenizer) of a checkpoint; one clear error for anything a user can get wrong."""
    from memlm.export import load_pretrained

    model, tok = load_pretrained(path, device=device)
    if tokenizer:
        from memlm.data.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
    if tok is None:
        raise CheckpointError(f"{path} has no tokenizer; pass --tokenizer DIR")
    require_memory(model, f"checkpoint {path}")
    return model, tok


def load_qa_rows(spec: str, limit: int | None) -> list[dict]:
    from memlm.data.qa import load_qa

    if Path(spec).suffix in (".jsonl", ".json", ".csv", ".gz") or Path(spec).is_file():
        return list(load_qa(path=spec, limit=limit).rows)
    name, _, split = spec.partition(":")
    return list(load_qa(name, split or None, limit=limit).rows)


def load_corpus(spec: str | None, n_docs: int) -> list[str]:
    """A deterministic sample of ``n_docs`` documents (seed 0)."""
    if spec is None:
        from memlm.data.facts import worldfacts_documents

        docs = worldfacts_documents("pretrain")
    else:
        from memlm.data.corpus import read_jsonl, read_text

        path = Path(spec)
        if not path.is_file():
            raise DataError(f"--corpus file not found: {path}")
        docs = read_jsonl(path) if path.suffix == ".jsonl" else read_text(path)
    if not docs:
        raise DataError(f"the corpus {spec or 'worldfacts'} has no documents")
    rng = random.Random(0)
    return rng.sample(docs, n_docs) if len(docs) > n_docs else docs


def _check_layer(model, layer: int | None) -> list[int] | None:
    n = len(model.memory_layers)
    if layer is not None and not 0 <= layer < n:
        raise InspectionError(f"--layer {layer} out of range: the model has {n} memory layer(s) (0..{n - 1})")
    return None if layer is None else [layer]


def fact_slot_weights(traces: list[dict], n_layers: int) -> list[dict[int, dict[str, float]]]:
    """Per memory layer: slot -> {example name: its |weight| averaged over the example's inspected tokens}."""
    out: list[dict[int, dict[str, float]]] = [{} for _ in range(n_layers)]
    for tr in traces:
        for p in tr["positions"]:
            for lay in p["layers"]:
                for s, w in lay["reads"]:
                    d = out[lay["layer"]].setdefault(s, {})
                    d[tr["name"]] = d.get(tr["name"], 0.0) + abs(w) / len(tr["positions"])
    return out


def diff_json(diff: CheckpointDiff, base: str, after: str, bg: SlotFrequency | None) -> dict[str, Any]:
    tables = []
    for t in diff.tables:
        order = t.delta_norm.argsort(descending=True)
        rows = []
        for i in order.tolist():
            r = {"row": int(t.rows[i]), "delta_norm": float(t.delta_norm[i]),
                 "rel_change": float(t.delta_norm[i] / t.base_norm[i].clamp_min(1e-12))}  # fmt: skip
            if bg is not None and t.layers and t.is_value:
                r["df"] = max(bg.df(j, int(t.rows[i])) for j in t.layers)
            rows.append(r)
        dn = t.delta_norm
        tables.append({"name": t.name, "layers": t.layers, "is_value": t.is_value, "n_rows": t.n_rows,
                       "n_changed": len(rows), "changed_rows": sorted(int(r) for r in t.rows),
                       "max_delta": float(dn.max()) if len(dn) else 0.0,
                       "mean_delta": float(dn.mean()) if len(dn) else 0.0, "rows": rows})  # fmt: skip
    return {"base": base, "after": after, "tables": tables, "other_changed": diff.other_changed,
            "other_total": diff.other_total, "n_batches": bg.n_batches if bg else None}  # fmt: skip


def inspect(args) -> tuple[str, dict[str, Any], list[tuple[str, Any]]]:
    """Run every requested inspection -> (text report, JSON report, [(png name, plot thunk)])."""
    if not (args.text or args.qa or args.slot or args.after):
        raise InspectionError("nothing to inspect: pass --text, --qa, --slot or --after")
    model, tok = load(args.ckpt, args.tokenizer, args.device)
    layers = _check_layer(model, args.layer)
    bg = load_background(model, args.ckpt, args.background)
    nb = bg.n_batches if bg else None
    exclude = [] if args.bytes else byte_tokens(tok)
    readout = TokenReadout(model, tok, exclude)
    after = None
    if args.after:
        after, _ = load(args.after, args.tokenizer, args.device)
    text: list[str] = [f"checkpoint: {args.ckpt}"]
    if bg is not None:
        note = f" — {bg.note}" if bg.note else ""
        text.append(f"SMF background statistics: {bg.path} ({bg.n_batches} batches){note}")
    report: dict[str, Any] = {"checkpoint": args.ckpt, "background": bg.path if bg else None}
    plots: list[tuple[str, Any]] = []
    max_len = model.cfg.max_seq_len
    examples: list[Example] = [text_example(tok, t, max_len, args.last) for t in args.text]
    qa_examples: list[Example] = []
    if args.qa:
        qa_examples = [qa_example(tok, r, max_len) for r in load_qa_rows(args.qa, args.limit)]
    traced = examples + qa_examples
    if traced:
        # after a finetune, trace the finetuned model (what it now reads for the new facts)
        subject = after if after is not None else model
        sub_readout = TokenReadout(subject, tok, exclude) if after is not None else readout
        traces = [trace_example(subject, tok, ex, sub_readout, args.top_slots, args.top_tokens, bg, layers)
                  for ex in traced]  # fmt: skip
        report["traces"] = traces
        text += [format_trace(tr, nb) for tr in traces]
        weights = fact_slot_weights(traces, len(model.memory_layers))
        names = [tr["name"] for tr in traces]
        plots.append(("fact_slots.png", lambda p: plot_fact_slots(weights, names, p)))
    if args.slot:
        docs = load_corpus(args.corpus, args.docs)
        j = args.layer if args.layer is not None else 0
        _check_layer(model, j)
        record = record_corpus(model, tok, docs, progress=not args.quiet, queries_of=[j])
        infos = []
        for s in args.slot:
            info = slot_contexts(model, tok, record, j, s, top=10, readout=readout, top_tokens=8)
            if bg is not None:
                info["df"] = bg.df(j, s)
            infos.append(info)
            text.append(format_slot(info, nb))
        report["slots"] = infos
        usage = [record.usage(k) for k in range(len(record.indices))]
        report["usage"] = {"tokens": record.n_tokens, "docs": record.n_docs,
                           "used_fraction": [float((u > 0).double().mean()) for u in usage]}  # fmt: skip
        plots.append(("usage.png", lambda p: plot_usage_curve(usage, p)))
    if after is not None:
        diff = diff_checkpoints(model, after)
        d = diff_json(diff, args.ckpt, args.after, bg)
        report["diff"] = d
        text.append(format_diff(d))
        plots.append(("row_changes.png", lambda p: plot_row_changes(diff.tables, p)))
        if qa_examples:
            hits = facts_hitting_changes(
                after, tok, qa_examples, diff, TokenReadout(after, tok, exclude), args.top_tokens
            )
            report["new_fact_hits"] = hits
            text.append(format_hits(hits))
    return "\n\n".join(text), report, plots


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            txt, report, plots = inspect(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(txt)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(txt + "\n", encoding="utf-8")
        (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        for name, fn in plots:
            fn(out / name)
        print(f"\nwrote {out}/report.txt, report.json, " + ", ".join(n for n, _ in plots))
    return 0
