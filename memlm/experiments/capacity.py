"""The knowledge-capacity ladder (behind ``eval/capacity.py``): train every model of a ladder on the same people
recipe for several seeds, score each on the ``people`` task (recall per exposure level, chance, bits; see
``docs/capacity.md``), and report mean ± standard error over seeds, the pooled lift of each model against the
equal-FLOP dense baseline and against the ~2x-FLOP dense reference, and two plots.

A ladder is a YAML file (``configs/experiments/capacity_tiny.yaml``)::

    recipe: ../pretrain/tiny_capacity.yaml   # the pretraining recipe every model is dropped into
    out: runs/capacity/tiny                  # default --out
    seeds: 3
    baseline: dense                          # equal active FLOPs
    reference: dense_2x                      # the papers' "dense with 2x the compute"
    models:
      - {name: dense, model: ../model/tiny_dense.yaml}
      - {name: memory_plus_65k, overrides: [--model.memory.n_keys=256, ...]}

Paths in the file are relative to it. Each (model, seed) is one launcher run ``{out}/runs/{name}_s{seed}`` trained by
``train.py`` in a subprocess (``--jobs`` at a time, the CPU threads split between them) and then evaluated by
``eval/run.py`` into ``{out}/evals/{name}_s{seed}.json``; logs in ``{out}/logs/``. Nothing is deleted: a finished run
of the same recipe is reused, an interrupted one (``last.ckpt``) is resumed, any other existing run dir is refused
before work starts. The training seed changes per run (``train.seed``); the corpus and its invented people do not
(``data.people.seed``), so seeds measure training noise on one fixed set of facts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from memlm.experiments.capacity_report import markdown, plot, summarize
from memlm.utils.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LADDER = "configs/experiments/capacity_tiny.yaml"


class LadderError(ValueError):
    """A ladder file or option a user can fix."""


# ----------------------------------------------------------------------------------------------------------------------
# the ladder file


def load_ladder(path: str | Path) -> dict[str, Any]:
    """Read and check a ladder YAML; paths become absolute (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise LadderError(f"--ladder: no such file {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(data) - {"recipe", "out", "seeds", "baseline", "reference", "models", "task"}
    if unknown:
        raise LadderError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not data.get("recipe"):
        raise LadderError(f"{path}: 'recipe' (the pretraining YAML every model is dropped into) is missing")
    models = data.get("models") or []
    if not models:
        raise LadderError(f"{path}: 'models' is empty")
    here = path.parent
    names = []
    for m in models:
        if not isinstance(m, dict) or not m.get("name"):
            raise LadderError(f"{path}: every entry of 'models' needs a 'name', got {m!r}")
        extra = sorted(set(m) - {"name", "model", "overrides"})
        if extra:
            raise LadderError(f"{path}: model {m['name']}: unknown key(s) {extra}")
        if m["name"] in names:
            raise LadderError(f"{path}: model name {m['name']} appears twice")
        names.append(m["name"])
        if m.get("model"):
            m["model"] = str((here / m["model"]).resolve())
        m["overrides"] = list(m.get("overrides") or [])
        bad = [o for o in m["overrides"] if not (isinstance(o, str) and o.startswith("--") and "=" in o)]
        if bad:
            raise LadderError(f"{path}: model {m['name']}: overrides must be --section.key=value, got {bad}")
    for key in ("baseline", "reference"):
        if data.get(key) is not None and data[key] not in names:
            raise LadderError(f"{path}: {key} {data[key]!r} is not one of the models {names}")
    data["recipe"] = str((here / data["recipe"]).resolve())
    data["path"] = str(path)
    data.setdefault("seeds", 3)
    data.setdefault("task", "people")
    return data


def _finished(plan: dict) -> bool:
    from memlm.experiments.runs import finished_summary

    return finished_summary(plan["run_dir"], plan["cfg"]) is not None


def _shown(path: str | Path) -> str:
    """A path relative to the checkout when it is inside it (tables stay short and machine-independent)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_args(ladder: dict, model: dict, seed: int, out: Path) -> list[str]:
    """The launcher arguments of one (model, seed) run: the same list configures train.py and the reuse check."""
    args = ["--config", ladder["recipe"]]
    if model.get("model"):
        args.append(f"--model={model['model']}")
    # validate every val_check_interval global steps even when an epoch is shorter
    args += ["--trainer.check_val_every_n_epoch=null", *model["overrides"]]
    args += [f"--train.name={model['name']}_s{seed}", f"--train.run_dir={out / 'runs'}", f"--train.seed={seed}"]
    return args


def run_config(args: list[str]):
    from memlm.config import load_run_config

    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    rest = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    return load_run_config(configs, rest)


# ----------------------------------------------------------------------------------------------------------------------
# one run: train (or reuse / resume), then evaluate


def plan_run(ladder: dict, model: dict, seed: int, out: Path, limit: int | None = None) -> dict[str, Any]:
    """What has to happen for one run: ``train``, ``resume``, ``eval``, ``done`` or ``foreign`` (an existing run dir
    that is not a finished or resumable run of this recipe: never touched)."""
    from memlm.experiments.runs import finished_summary, same_recipe

    args = run_args(ladder, model, seed, out)
    cfg = run_config(args)
    if cfg.data.people is None or not any(s.kind == "people" for s in cfg.data.sources):
        raise LadderError(f"{ladder['recipe']}: the recipe has no people source; the capacity task needs one")
    name = f"{model['name']}_s{seed}"
    run_dir = out / "runs" / name
    step = "train"
    if finished_summary(run_dir, cfg) is not None:
        step = "eval"
    elif (run_dir / "checkpoints" / "last.ckpt").is_file() and same_recipe(run_dir, cfg):
        step = "resume"
    elif run_dir.exists():
        step = "foreign"  # not a finished or resumable run of this recipe (or one still starting): never touched
    # a quick look (--limit) never stands in for the full evaluation, nor the other way round
    eval_path = out / "evals" / (f"{name}.json" if limit is None else f"{name}.limit{limit}.json")
    if step == "eval" and eval_path.is_file():
        step = "done"
    return {"name": name, "model": model["name"], "seed": seed, "args": args, "run_dir": run_dir, "step": step,
            "eval": eval_path, "log": out / "logs" / f"{name}.log", "cfg": cfg}  # fmt: skip


def execute(plan: dict, task: str, threads: int, limit: int | None) -> None:
    """Train (or resume) and evaluate one run in subprocesses; output appended to the run's log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    plan["log"].parent.mkdir(parents=True, exist_ok=True)
    cmds = []
    if plan["step"] in ("train", "resume"):
        train = [sys.executable, str(ROOT / "train.py"), *plan["args"], "--trainer.enable_progress_bar=false"]
        cmds.append(train + (["--ckpt_path", "last"] if plan["step"] == "resume" else []))
    if plan["step"] != "done":
        ev = [sys.executable, str(ROOT / "eval" / "run.py"), "--ckpt", str(plan["run_dir"] / "export"),
              "--tasks", task, "--out", str(plan["eval"])]  # fmt: skip
        cmds.append(ev + ([] if limit is None else ["--limit", str(limit)]))
    with open(plan["log"], "a", encoding="utf-8") as log:
        for cmd in cmds:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            # the working directory stays the user's: relative paths (out, data files) mean what they mean to train.py
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                raise RuntimeError(f"{plan['name']}: {Path(cmd[1]).name} exited {rc}; see {plan['log']}")
            if cmd[1].endswith("train.py"):
                from memlm.experiments.runs import finished_summary

                if finished_summary(plan["run_dir"], plan["cfg"]) is None:  # e.g. interrupted, yet exit 0
                    raise RuntimeError(
                        f"{plan['name']}: training did not finish (no summary at "
                        f"{plan['cfg'].trainer['max_steps']} steps with an export); see {plan['log']}"
                    )


def run_row(plan: dict, task: str) -> dict[str, Any]:
    """One run's numbers: the capacity report of its eval, its val loss, parameter and FLOP counts."""
    from memlm.config import load_run_config
    from memlm.model import flops_per_token, param_counts

    summary = yaml.safe_load((plan["run_dir"] / "summary.yaml").read_text(encoding="utf-8")) or {}
    result = json.loads(plan["eval"].read_text(encoding="utf-8"))
    report = result["tasks"][task]["capacity"]
    model_cfg = load_run_config([plan["run_dir"] / "config.yaml"]).model  # the vocabulary the launcher really used
    counts = param_counts(model_cfg)
    mem = model_cfg.memory
    row = {
        "name": plan["name"], "model": plan["model"], "seed": plan["seed"],
        "val_loss": summary.get("val_loss"), "steps": summary.get("steps"),
        "exact_match_seen": report["exact_match_seen"], "lift_seen": report["lift_seen"],
        "bits": report["bits"], "bits_max": report["bits_max"], "bits_control": report["bits_control"],
        "control_em": report["levels"].get("0", {}).get("exact_match"),
        "levels": {k: {"exact_match": v["exact_match"], "lift": v["lift"], "chance": v["chance"], "n": v["n"]}
                   for k, v in report["levels"].items()},
        "attributes": {a: {"exact_match": v["exact_match"], "lift": v["lift"], "chance": v["chance"]}
                       for a, v in report["attributes"].items()},
        "active_params": counts["active"], "total_params": counts["total"],
        "memory_values": counts["memory_values"], "flops_per_token": flops_per_token(model_cfg, model_cfg.max_seq_len),
        "kind": mem.kind if mem is not None else "dense",
        "slots": None if mem is None else mem.n_slots,
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_tokens": summary.get("train_tokens") or _train_tokens(plan["run_dir"]),
    }  # fmt: skip
    row["k50"] = exposures_for(row["levels"], 0.5)
    row["epochs"] = summary.get("steps", 0) * plan["cfg"].train.batch_size * plan["cfg"].seq_len / row["train_tokens"]
    if mem is not None:
        row["slot_reads"] = slot_reads(plan)
    return row


def exposures_for(levels: dict[str, dict], target: float) -> float | None:
    """The exposure level at which recall first reaches ``target`` EM, interpolated linearly in log2(k) between the
    seen levels around the crossing (a model that needs fewer appearances per fact to recall it is the more sample-
    efficient store); None if no seen level reaches it, the first seen level if that one already does."""
    pts = sorted((int(k), v["exact_match"]) for k, v in levels.items() if int(k) > 0)
    for i, (k, em) in enumerate(pts):
        if em >= target:
            if i == 0:
                return float(k)
            k0, em0 = pts[i - 1]
            frac = (target - em0) / (em - em0)
            return float(2 ** (math.log2(k0) + frac * (math.log2(k) - math.log2(k0))))
    return None


def slot_reads(plan: dict) -> dict[str, Any]:
    """Which memory slots the people prompts read (``memlm.inspection.fact_slots``), at the answer and the subject
    position, first memory layer; cached in the run dir (``slot_reads.json``), beside the export it describes."""
    path = plan["run_dir"] / "slot_reads.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    import memlm
    from memlm.data.people import people_qa
    from memlm.inspection.fact_slots import fact_slot_report

    model, tok = memlm.load_pretrained(plan["run_dir"] / "export")
    rows = people_qa(plan["cfg"].data.people)
    out = {pos: fact_slot_report(model, tok, rows, position=pos)[0] for pos in ("answer", "subject")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def _train_tokens(run_dir: Path) -> int:
    """Training tokens in one epoch of a run whose summary predates the ``train_tokens`` field (packed-data cache)."""
    from memlm.config import load_run_config
    from memlm.data.datamodule import LMDataModule
    from memlm.data.tokenizer import Tokenizer

    cfg = load_run_config([run_dir / "config.yaml"])
    dm = LMDataModule(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.train.batch_size,
                      tokenizer=Tokenizer.load(run_dir / "tokenizer"))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return int(dm.meta["train_tokens"])


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eval/capacity.py",
        formatter_class=HelpFormatter,
        description="Train a ladder of models on invented people for several seeds; report recall per exposure "
        "level, pooled lift vs the equal-FLOP dense model and the 2x-FLOP dense reference, and plots.",
    )
    p.add_argument("--ladder", default=DEFAULT_LADDER, help="ladder YAML (models, recipe, baseline, reference)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per model, 0..N-1 (default: the ladder's)")
    p.add_argument("--models", default=None, help="comma-separated subset of the ladder's model names")
    p.add_argument("--out", default=None, help="output directory (default: the ladder's 'out')")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / jobs)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N people rows (a quick look)")
    p.add_argument("--report_only", action="store_true", help="train nothing: report the runs already evaluated")
    args = p.parse_args(argv)
    for key in ("seeds", "jobs", "limit", "threads"):
        v = getattr(args, key)
        if v is not None and v < 1:
            p.error(f"--{key} must be >= 1, got {v}")
    return args


def main(argv: list[str] | None = None) -> int:
    from memlm.config import ConfigError

    args = parse_args(argv)
    try:
        ladder = load_ladder(args.ladder if Path(args.ladder).exists() else ROOT / args.ladder)
        if args.models:
            want = [m.strip() for m in args.models.split(",") if m.strip()]
            names = [m["name"] for m in ladder["models"]]
            unknown = [m for m in want if m not in names]
            if unknown:
                raise LadderError(f"--models: unknown {unknown} (the ladder has {names})")
            ladder["models"] = [m for m in ladder["models"] if m["name"] in want]
        ladder_seeds = int(ladder["seeds"])
        seeds = args.seeds or ladder_seeds
        out = Path(args.out or ladder.get("out") or f"runs/capacity/{Path(args.ladder).stem}")
        # seed-major: every model has a first seed before any has a second (a partial ladder is still a ladder)
        plans = [plan_run(ladder, m, s, out, args.limit) for s in range(seeds) for m in ladder["models"]]
    except (LadderError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    foreign = [p for p in plans if p["step"] == "foreign"]
    if foreign and not args.report_only:
        print(f"error: {foreign[0]['run_dir']} exists and is not a finished or resumable run of this recipe: move it "
              "away or choose another --out", file=sys.stderr)  # fmt: skip
        return 2
    todo = [p for p in plans if p["step"] != "done"]
    if args.report_only:
        plans = [p for p in plans if p["step"] == "done"]
        todo = []
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"[capacity] {len(plans)} runs ({len(todo)} to do) with {args.jobs} job(s) x {threads} thread(s); "
          f"logs in {out / 'logs'}", flush=True)  # fmt: skip
    t0, done, failed = time.time(), 0, []

    def one(plan: dict) -> None:
        nonlocal done
        print(f"[capacity] {plan['name']}: {plan['step']} (log {plan['log']})", flush=True)
        try:
            execute(plan, ladder["task"], threads, args.limit)
        except RuntimeError as e:
            failed.append(str(e))
            print(f"[capacity] FAILED {e}", flush=True)
            return
        done += 1
        el = time.time() - t0
        eta = el / done * (len(todo) - done - len(failed))
        print(f"[capacity] {done}/{len(todo)} runs done | {plan['name']} | elapsed {el / 60:.1f} min | "
              f"ETA {eta / 60:.1f} min", flush=True)  # fmt: skip

    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, todo))
    except KeyboardInterrupt:
        print("[capacity] interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    # a run counts once both its training (summary at the full step count) and its evaluation are there
    rows = [run_row(p, ladder["task"]) for p in plans if p["eval"].is_file() and _finished(p)]
    if not rows:
        print("error: no evaluated runs to report", file=sys.stderr)
        return 2
    summary = summarize(ladder, rows)
    import torch

    cfg = plans[0]["cfg"]
    meta = {
        "command": shlex.join(["python", "eval/capacity.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.jobs} job(s))"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "ladder": str(Path(args.ladder)),
        "recipe": _shown(ladder["recipe"]), "seeds": seeds,
        "steps": int(cfg.trainer["max_steps"]), "batch_size": cfg.train.batch_size, "seq_len": cfg.seq_len,
    }  # fmt: skip
    meta["epochs"] = f"{sum(r['epochs'] for r in rows) / len(rows):.1f}"
    # a partial view (--models, fewer --seeds, --limit, runs still missing) never replaces the full ladder's report
    partial = args.models or args.limit or seeds < int(ladder_seeds) or len(rows) < len(plans)
    report = out / ("report_partial" if partial else "report")
    report.mkdir(parents=True, exist_ok=True)
    (report / "capacity.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2),
                                          encoding="utf-8")  # fmt: skip
    (report / "capacity.md").write_text(markdown(ladder, summary, meta), encoding="utf-8")
    pngs = plot(summary, report)
    print((report / "capacity.md").read_text(encoding="utf-8"))
    print(f"[capacity] wrote {report / 'capacity.md'}, {report / 'capacity.json'}, {', '.join(map(str, pngs))}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0
