"""Command lines behind ``eval/run.py`` and ``eval/forgetting.py`` (kept here so the scripts stay thin).

Errors a user causes (unknown task, bad task YAML, a path that is not a memlm checkpoint, bad QA data) print one
line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from memlm.config import ConfigError
from memlm.data.errors import DataError
from memlm.evaluation.forgetting import forgetting_report, format_report, plot_forgetting, run_labels
from memlm.evaluation.runner import evaluate, format_table
from memlm.evaluation.tasks import TaskError, known_tasks, resolve_tasks
from memlm.export import CheckpointError
from memlm.utils.cli import HelpFormatter
from memlm.utils.malloc import keep_freed_memory_in_heap
from memlm.utils.rundir import check_new_file, ensure_writable_dir

USER_ERRORS = (ConfigError, CheckpointError, DataError, TaskError)


def checkpoint_hash(path: str | Path) -> str | None:
    """sha256 of an export's model.safetensors (or of a .ckpt file)."""
    p = Path(path)
    f = p / "model.safetensors" if p.is_dir() else p
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path, tokenizer: str | None = None, device: str = "cpu"):
    """(model, tokenizer, run_config, meta) of an export dir or a Lightning .ckpt."""
    from memlm.export import MARKER, check_tokenizer, load_pretrained, read_export_config

    model, tok = load_pretrained(path, device=device)
    p = Path(path)
    run_config, meta = {}, {}
    if p.is_dir():
        run_config = read_export_config(p)
        try:
            meta = json.loads((p / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
    if tokenizer:
        from memlm.data.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
        check_tokenizer(model, tok, tokenizer)
    if tok is None:
        raise CheckpointError(f"{path} has no tokenizer; pass --tokenizer DIR")
    return model, tok, run_config, meta


def read_results_json(path: str | Path) -> dict[str, Any]:
    """The results of ``eval/run.py --out`` or of a continual stage (``stage_<k>.json`` / ``base.json``: their
    evaluation is used); anything else is one clear error naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a results JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("results"), dict) and "tasks" in data["results"]:
        data = data["results"]  # a continual stage_<k>.json: {summary..., "results": {"tasks": ...}}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(e, dict) and "metrics" in e for e in tasks.values()):
        raise DataError(f"{path} is not a results JSON of eval/run.py or a continual stage (no tasks with metrics)")
    return data


def check_same_examples(base: dict[str, Any], after: dict[str, Any], base_name: str, after_name: str) -> None:
    """A drop means something only over the same examples: refuse results whose shared tasks were scored on other
    example sets (another --limit, --shots, split or source)."""
    for task, b in base["tasks"].items():
        a = after["tasks"].get(task)
        if a is None:
            continue
        for key in ("n", "shots", "split", "source"):
            if key in b and key in a and b[key] != a[key]:
                limits = [r.get("config", {}).get("limit") for r in (base, after)]
                raise DataError(
                    f"{after_name} and {base_name} scored task {task} on different examples ({key}: {a[key]} vs "
                    f"{b[key]}; --limit {limits[1]} vs {limits[0]}): evaluate both with the same --limit and --shots"
                )


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        default="triviaqa,nq_open,worldfacts",
        help="comma-separated task names, task .yaml files, QA .jsonl files, mc:FILE or ppl:FILE",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir, if the checkpoint has none")
    p.add_argument("--device", default="cpu", help="torch device to evaluate on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--task_dir", action="append", default=None, help="extra directory of task YAMLs")
    p.add_argument("--no_cache", action="store_true", help="decode without the KV cache (slow; for comparisons)")
    p.add_argument("--list_tasks", action="store_true", help="print the known task names and exit")


def _run(args, ckpt: str, partial: Path | None = None) -> dict[str, Any]:
    """Evaluate ``ckpt``; with ``partial`` per-example results are appended there and an interrupted run with the
    same checkpoint and settings continues from it (see :class:`memlm.evaluation.runner.ResultsLog`)."""
    specs = resolve_tasks(args.tasks, args.task_dir)  # fail on a bad task before loading anything
    model, tok, run_config, meta = load_checkpoint(ckpt, args.tokenizer, args.device)
    log = None
    if partial is not None:
        from memlm.evaluation.runner import ResultsLog

        fingerprint = {"checkpoint_sha256": checkpoint_hash(ckpt), "tokenizer_sha256": getattr(tok, "hash", None),
                       "tasks": [s.to_dict() for s in specs], "limit": args.limit, "shots": args.shots,
                       "batch_size": args.batch_size, "use_cache": not args.no_cache}  # fmt: skip
        log = ResultsLog(partial, fingerprint, chunk=args.chunk or 32 * args.batch_size)
        if log.resumed:
            print(f"resuming: {log.resumed} examples already scored in {partial}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        res = evaluate(
            model, tok, specs, limit=args.limit, shots=args.shots, batch_size=args.batch_size,
            predictions=getattr(args, "predictions", False), use_cache=not args.no_cache, run_config=run_config,
            task_dirs=args.task_dir, log=log,
        )  # fmt: skip
    finally:
        if log is not None:
            log.close()
    res["config"].update(
        checkpoint=str(ckpt), checkpoint_sha256=checkpoint_hash(ckpt), step=meta.get("step"),
        num_params=model.num_params(), device=args.device, seconds=round(time.perf_counter() - t0, 2),
        tokenizer_sha256=getattr(tok, "hash", None),
    )  # fmt: skip
    return res


def _check_limit(args) -> None:
    """``--limit -1`` would slice off the last example and ``--limit 0`` mean "no rows": refuse both."""
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of examples, got {args.limit} (leave it out for all)")


def _guard(main):
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # read-only or full disk, a file where a directory belongs: one line
            from memlm.utils.rundir import describe_os_error

            msg = describe_os_error(e)
            if msg is None:
                raise
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped


@_guard
def run_main(argv: list[str] | None = None) -> int:
    keep_freed_memory_in_heap()
    p = argparse.ArgumentParser(
        prog="eval/run.py",
        description="Evaluate a memlm checkpoint on QA / multiple-choice / perplexity tasks.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", help="export directory or Lightning .ckpt")
    _common_args(p)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--predictions", action="store_true", help="include per-example predictions in the JSON")
    p.add_argument("--tensorboard", default=None, help="also log the metrics to this TensorBoard directory")
    p.add_argument("--chunk", type=int, default=None,
                   help="with --out: examples scored between appends to OUT.partial.jsonl (default 32 x batch_size); "
                   "a re-run with the same --out continues after the last complete chunk")  # fmt: skip
    args = p.parse_args(argv)
    if args.list_tasks:
        print("\n".join(known_tasks(args.task_dir)))
        return 0
    if not args.ckpt:
        p.error("--ckpt is required")
    _check_limit(args)
    out = Path(args.out) if args.out else None
    partial = out.with_name(out.name + ".partial.jsonl") if out else None
    if out:  # before the work: an --out that is a directory, exists or cannot be written fails now, not at the end
        check_new_file(out, "--out")
    if args.tensorboard:
        ensure_writable_dir(args.tensorboard, "--tensorboard directory")
    res = _run(args, args.ckpt, partial)
    print(format_table(res))
    if out:
        from memlm.utils.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        partial.unlink(missing_ok=True)  # the results are complete and in place
        print(f"wrote {out}")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        step = res["config"].get("step") or 0
        with SummaryWriter(args.tensorboard) as w:
            for task, e in res["tasks"].items():
                for m in e["spec"]["metrics"]:
                    w.add_scalar(f"eval/{task}/{m}", e["metrics"][m], step)
        print(f"logged to TensorBoard at {args.tensorboard}")
    return 0


@_guard
def forgetting_main(argv: list[str] | None = None) -> int:
    keep_freed_memory_in_heap()
    p = argparse.ArgumentParser(
        prog="eval/forgetting.py",
        description="Relative drops per task from a base checkpoint to finetuned ones (columns named by run).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--base", help="base checkpoint (export dir or .ckpt), or a results JSON of eval/run.py")
    p.add_argument("--after", nargs="+", help="finetuned checkpoints (or results JSONs)")
    p.add_argument("--out", default="runs/forgetting", help="output directory (forgetting.json, forgetting.png)")
    _common_args(p)
    args = p.parse_args(argv)
    if args.list_tasks:
        print("\n".join(known_tasks(args.task_dir)))
        return 0
    if not args.base or not args.after:
        p.error("--base and --after are required")
    _check_limit(args)
    out = Path(args.out)
    for name in ("forgetting.json", "forgetting.png"):  # before the work; never overwritten
        check_new_file(out / name, f"--out {out}:")

    def results_of(path: str) -> dict[str, Any]:
        if path.endswith(".json") and Path(path).is_file():
            return read_results_json(path)
        return _run(args, path)

    base = results_of(args.base)
    afters = [results_of(a) for a in args.after]
    for a, res in zip(args.after, afters):
        check_same_examples(base, res, args.base, a)
    labels = run_labels(args.after)  # by run (runs/smf/export -> smf), not by the last path component
    report = forgetting_report(base, afters, labels=labels, base_label=run_labels([args.base])[0])
    report["results"] = {"base": base, "after": afters}
    out.mkdir(parents=True, exist_ok=True)
    (out / "forgetting.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    png = plot_forgetting(report, out / "forgetting.png")
    print(format_report(report))
    print(f"wrote {out / 'forgetting.json'} and {png}")
    return 0
