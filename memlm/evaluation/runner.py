"""Run evaluation tasks on a model: ``evaluate(model, tokenizer, tasks, ...) -> results dict``.

The results dict (also what ``eval/run.py`` writes as JSON)::

    {"config": {...}, "tasks": {name: {"type", "metrics": {metric: value, metric_stderr: ...}, "primary_metric",
     "n", "shots", "source", "split", "seconds", "examples_per_s", "spec": {...}, ["predictions": [...]]}}}
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from memlm.data.errors import BadRows, DataError, jsonl_records
from memlm.evaluation.adapter import MemLMAdapter
from memlm.evaluation.capacity import capacity_report, format_capacity
from memlm.evaluation.metrics import aggregate, mc_scores, perplexity_scores, qa_scores
from memlm.evaluation.tasks import TaskError, TaskSpec, resolve_tasks

# ----------------------------------------------------------------------------------------------------------------------
# data


def _facts_kw(run_config: dict | None) -> dict[str, Any]:
    """worldfacts split settings of the run that trained the model (so 'pretrain' means the facts it saw)."""
    data = (run_config or {}).get("data") or {}
    kw = dict(data.get("facts") or {})
    if data.get("cache_dir"):
        kw["cache_dir"] = data["cache_dir"]
    return kw


def _people_cfg(run_config: dict | None) -> dict | None:
    """The ``data.people`` section of the run that trained the model (its individuals are what the people tasks ask
    about); None when there is no run config (the default section is used). A run without a people source is an
    error: its model never saw any of them."""
    data = (run_config or {}).get("data")
    if not data:
        return None
    if not any(isinstance(s, dict) and s.get("kind") == "people" for s in data.get("sources") or []):
        raise TaskError("the people tasks need a model trained on a {kind: people} source; this run has none")
    return dict(data.get("people") or {})


def _cloze_rows(split: str, facts_kw: dict) -> list[dict]:
    """worldfacts as statement prefixes: 'The capital of France is' -> answers ['Paris']."""
    from memlm.data.facts import worldfacts

    rows = []
    for f in worldfacts(split, **facts_kw):
        a = f.answers[0]
        ranked = sorted(f.statements, key=lambda s: not s.rstrip(".").endswith(a))  # answer-last statements first
        for s in ranked:
            at = s.find(a)
            if at > 0:
                rows.append({"id": f.id, "prompt": s[:at].rstrip(), "question": f.question, "answers": list(f.answers)})
                break
    return rows


def _mc_rows(spec: TaskSpec) -> list[dict]:
    path = Path(spec.path or "")
    if not path.is_file():
        raise DataError(f"task {spec.name}: multiple-choice file not found: {path}")
    bad = BadRows(path)
    rows = []
    for i, rec in jsonl_records(path, bad):
        q = rec.get(spec.question_field, rec.get("context")) if isinstance(rec, dict) else None
        choices, label = (rec.get(spec.choices_field), rec.get(spec.label_field)) if isinstance(rec, dict) else (0, 0)
        if not isinstance(q, str):
            bad.bad(i, f"row has no '{spec.question_field}' text")
        elif not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            bad.bad(i, f"'{spec.choices_field}' must be a list of at least two strings")
        elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            bad.bad(i, f"'{spec.label_field}' must be an integer index into the {len(choices)} choices")
        else:
            rid = str(rec.get("id", f"{path.stem}-{i}"))
            rows.append({"id": rid, "question": q, "choices": choices, "label": label})
    if not rows:
        raise DataError(f"{path}: no multiple-choice rows")
    return rows


def _text_rows(spec: TaskSpec, facts_kw: dict) -> list[dict]:
    if spec.dataset == "worldfacts_docs":
        from memlm.data.facts import worldfacts_documents

        docs = worldfacts_documents(spec.split or "heldout", **facts_kw)
    else:
        from memlm.data.corpus import read_jsonl, read_text

        path = Path(spec.path or "")
        if not path.is_file():
            raise DataError(f"task {spec.name}: text file not found: {path}")
        docs = read_jsonl(path, spec.text_field) if spec.dataset == "jsonl" else read_text(path)
    rows = [{"id": f"{spec.name}-{i}", "text": d} for i, d in enumerate(docs) if d.strip()]
    if not rows:
        raise DataError(f"task {spec.name}: no text to score")
    return rows


def load_rows(
    spec: TaskSpec, split: str | None, limit: int | None, facts_kw: dict, people: dict | None = None
) -> tuple[list[dict], str]:
    """Rows of ``spec``'s dataset (``split`` overrides the spec's) and a description of where they came from."""
    kind = spec.dataset
    if spec.type == "perplexity":
        if kind not in ("worldfacts_docs", "text", "jsonl"):
            raise TaskError(
                f"task {spec.name}: perplexity dataset must be worldfacts_docs, text or jsonl; got {kind!r}"
            )
        rows = _text_rows(spec, facts_kw)
        src = f"worldfacts documents [{spec.split or 'heldout'}]" if kind == "worldfacts_docs" else f"local {spec.path}"
        return rows[:limit] if limit else rows, src
    if spec.type == "multiple_choice":
        if kind != "mc_jsonl":
            raise TaskError(f"task {spec.name}: multiple-choice dataset must be mc_jsonl, not {kind!r}")
        rows = _mc_rows(spec)
        return rows[:limit] if limit else rows, f"local {spec.path}"
    if kind == "worldfacts_cloze":
        split = split or "pretrain"
        kw = {k: v for k, v in facts_kw.items()}
        rows = _cloze_rows(split, kw)
        return rows[:limit] if limit else rows, f"worldfacts cloze [{split}]"
    from memlm.data.qa import load_qa

    if kind in ("qa_jsonl", "qa_csv"):
        if not spec.path:
            raise TaskError(f"task {spec.name}: dataset {kind} needs a 'path'")
        ds = load_qa(path=spec.path, split=split, limit=limit, columns=spec.columns or None)
    elif kind == "people":
        ds = load_qa(kind, split=split, limit=limit, people=people)
    else:
        ds = load_qa(kind, split=split, limit=limit, **(facts_kw if kind == "worldfacts" else {}))
    return list(ds), ds.source


# ----------------------------------------------------------------------------------------------------------------------
# prompts


def _fmt(template: str, row: dict, spec: TaskSpec) -> str:
    fields = dict(row)
    q = fields.get("question")
    if spec.question_mark and isinstance(q, str) and not q.rstrip().endswith("?"):
        fields["question"] = q.rstrip() + "?"
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as e:
        raise TaskError(f"task {spec.name}: template {template!r} uses a field the rows lack: {e}") from None


def _answer(row: dict) -> str:
    return row["choices"][row["label"]] if "choices" in row else row["answers"][0]


def _context(spec: TaskSpec, row: dict, shots: list[dict]) -> str:
    parts = [_fmt(spec.template, s, spec) + spec.target.format(answer=_answer(s)) for s in shots]
    parts.append(_fmt(spec.template, row, spec))
    body = spec.fewshot_delimiter.join(parts)
    return spec.description + body if spec.description else body


def _fewshot(pool: list[dict], row: dict, k: int, seed: int) -> list[dict]:
    if k <= 0:
        return []
    cands = [r for r in pool if r["id"] != row["id"] and r.get("question") != row.get("question")]
    rng = random.Random(f"{seed}:{row['id']}")
    return rng.sample(cands, min(k, len(cands)))


# ----------------------------------------------------------------------------------------------------------------------
# running


def _score_rows(adapter: MemLMAdapter, spec: TaskSpec, rows: list[dict], pool: list[dict], shots: int,
                seed: int) -> list[dict]:  # fmt: skip
    """One prediction record per row (prompt, prediction, per-example scores) — everything the metrics need."""
    preds: list[dict] = []
    if spec.type == "generate":
        contexts = [_context(spec, r, _fewshot(pool, r, shots, seed)) for r in rows]
        outs = adapter.generate_until(contexts, spec.until, spec.max_new_tokens, desc=spec.name)
        for r, ctx, out in zip(rows, contexts, outs):
            s = qa_scores(out, r["answers"])
            preds.append({"id": r["id"], "prompt": ctx, "prediction": out, "answers": r["answers"], **s})
    elif spec.type == "multiple_choice":
        reqs, owners = [], []
        for j, r in enumerate(rows):
            ctx = _context(spec, r, _fewshot(pool, r, shots, seed))
            for c in r["choices"]:
                reqs.append((ctx, spec.target.format(answer=c)))
                owners.append(j)
        lls: list[list[float]] = [[] for _ in rows]
        for j, (ll, _) in zip(owners, adapter.loglikelihood(reqs, desc=spec.name)):
            lls[j].append(ll)
        for r, ll in zip(rows, lls):
            s = mc_scores(ll, r["choices"], r["label"])
            best = max(range(len(ll)), key=lambda i: ll[i])
            preds.append({"id": r["id"], "logliks": ll, "prediction": best, "label": r["label"], **s})
    else:
        texts = [r["text"] for r in rows]
        lls = adapter.loglikelihood_rolling(texts, desc=spec.name)
        for r, t, ll in zip(rows, texts, lls):
            n_tok, n_bytes, n_words = adapter.count_tokens(t), len(t.encode("utf-8")), len(t.split())
            preds.append({"id": r["id"], "loglik": ll, "tokens": n_tok, "bytes": n_bytes, "words": n_words})
    return preds


def run_task(
    adapter: MemLMAdapter,
    spec: TaskSpec,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 1234,
    predictions: bool = False,
    facts_kw: dict | None = None,
    log: ResultsLog | None = None,
    people: dict | None = None,
) -> dict[str, Any]:
    """Evaluate one task; returns its results entry (see module docstring). With ``log`` the rows are scored in
    chunks of ``log.chunk`` examples, each chunk's records appended durably to the log, and chunks already in the log
    (from an interrupted run) are not scored again. ``people``: the ``data.people`` section for the people tasks,
    whose entry also gets a ``capacity`` report (recall per exposure level and attribute, chance, bits)."""
    facts_kw = facts_kw or {}
    rows, source = load_rows(spec, spec.split, limit, facts_kw, people)
    pool = rows
    if shots and spec.type != "perplexity" and spec.fewshot_split and spec.fewshot_split != spec.split:
        pool, _ = load_rows(spec, spec.fewshot_split, spec.fewshot_pool, facts_kw, people)
    t0 = time.perf_counter()
    if log is None:
        preds = _score_rows(adapter, spec, rows, pool, shots, seed)
    else:
        preds = []
        size = log.chunk
        for c, start in enumerate(range(0, len(rows), size)):
            chunk = rows[start : start + size]
            done = log.done(spec.name, c, len(chunk))
            if done is None:
                done = _score_rows(adapter, spec, chunk, pool, shots, seed)
                log.append(spec.name, c, done)
            preds.extend(done)
    seconds = time.perf_counter() - t0
    if spec.type == "perplexity":
        total = perplexity_scores(
            sum(p["loglik"] for p in preds), sum(p["tokens"] for p in preds), sum(p["bytes"] for p in preds),
            sum(p["words"] for p in preds),
        )  # fmt: skip
        metrics = {m: total[m] for m in spec.metrics}
    else:
        metrics = aggregate([{m: p[m] for m in spec.metrics} for p in preds])
    entry = {
        "type": spec.type,
        "metrics": metrics,
        "primary_metric": spec.primary_metric,
        "n": len(rows),
        "shots": shots if spec.type != "perplexity" else 0,
        "source": source,
        "split": spec.split,
        "seconds": round(seconds, 3),
        "examples_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "spec": spec.to_dict(),
    }
    if spec.dataset == "people":
        entry["capacity"] = capacity_report(rows, preds)
    if predictions:
        entry["predictions"] = preds
    return entry


class ResultsLog:
    """Per-example results of an evaluation appended durably to ``path`` (JSONL), so an interrupted run continues
    where it stopped: the first line is the run's ``fingerprint`` (checkpoint hash, tasks, limit, shots, ...), then
    one line per example tagged with its task and chunk. Only complete chunks count as done, so the re-scored part
    is batched exactly as in an uninterrupted run and the results are identical."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], chunk: int) -> None:
        from memlm.utils.atomic import JsonlLog, read_jsonl_log

        self.path, self.chunk = Path(path), max(1, int(chunk))
        fingerprint = {**fingerprint, "chunk": self.chunk}
        try:
            records = read_jsonl_log(self.path)
        except ValueError as e:
            raise DataError(str(e)) from None
        if records and records[0].get("fingerprint") != fingerprint:
            old = records[0].get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise DataError(
                f"{self.path} holds partial results of a different evaluation (differs in: {', '.join(diff)}); "
                "delete it to start over, or pass another --out"
            )
        self._chunks: dict[tuple[str, int], list[dict]] = {}
        for r in records[1:]:
            self._chunks.setdefault((r["task"], r["chunk"]), []).append(r["record"])
        self.resumed = sum(len(v) for v in self._chunks.values())
        self._log = JsonlLog(self.path)
        if not records:
            self._log.append({"fingerprint": fingerprint})

    def done(self, task: str, chunk: int, n: int) -> list[dict] | None:
        got = self._chunks.get((task, chunk))
        return got if got is not None and len(got) == n else None

    def append(self, task: str, chunk: int, records: list[dict]) -> None:
        self._log.append(*({"task": task, "chunk": chunk, "record": r} for r in records))
        self._chunks[(task, chunk)] = records

    def close(self) -> None:
        self._log.close()


def evaluate(
    model,
    tokenizer,
    tasks: str | list,
    limit: int | None = None,
    shots: int = 0,
    batch_size: int = 16,
    *,
    predictions: bool = False,
    progress: bool = True,
    use_cache: bool = True,
    seed: int = 1234,
    run_config: dict | None = None,
    task_dirs: list[str | Path] | None = None,
    log: ResultsLog | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` (names, YAML paths, data-file shorthands, dicts or TaskSpecs).

    Args:
        limit: at most this many examples per task (the first ones, for reproducibility).
        shots: few-shot examples per prompt (generate and multiple-choice tasks).
        run_config: the model's training config (an export's config.yaml): its ``data.facts`` picks the worldfacts
            split the model was trained on.
        log: a :class:`ResultsLog`: per-example results are appended to it and chunks already there are reused.
    Returns:
        ``{"config": {...}, "tasks": {name: entry}}``.
    """
    if tokenizer is None:
        raise TaskError("evaluation needs a tokenizer (this checkpoint has none; pass one explicitly)")
    specs = resolve_tasks(tasks, task_dirs)
    people = _people_cfg(run_config) if any(s.dataset == "people" for s in specs) else None
    adapter = MemLMAdapter(model, tokenizer, batch_size=batch_size, use_cache=use_cache, progress=progress)
    facts_kw = _facts_kw(run_config)
    results: dict[str, Any] = {
        "config": {"tasks": [s.name for s in specs], "limit": limit, "shots": shots, "batch_size": batch_size,
                   "seed": seed, "use_cache": use_cache, "add_bos": adapter.add_bos},
        "tasks": {},
    }  # fmt: skip
    for spec in specs:
        results["tasks"][spec.name] = run_task(adapter, spec, limit, shots, seed, predictions, facts_kw, log, people)
    return results


def format_table(results: dict[str, Any]) -> str:
    """A plain-text (markdown) table: one row per task and metric."""
    lines = ["| task | metric | value | ± stderr | n | shots |", "|---|---|---:|---:|---:|---:|"]
    for name, entry in results["tasks"].items():
        for m in entry["spec"]["metrics"]:
            v = entry["metrics"].get(m)
            se = entry["metrics"].get(f"{m}_stderr")
            lines.append(
                f"| {name} | {m} | {v:.4f} | {'' if se is None else f'{se:.4f}'} | {entry['n']} | {entry['shots']} |"
            )
    for name, entry in results["tasks"].items():
        if "capacity" in entry:  # people tasks: recall per exposure level, chance and bits
            lines += ["", format_capacity(name, entry["capacity"])]
    return "\n".join(lines)
