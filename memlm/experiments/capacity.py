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

from memlm.experiments.seeds import aggregate, difference, fmt_pm, ratio
from memlm.utils.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LADDER = "configs/experiments/capacity_tiny.yaml"
# per-run numbers aggregated over seeds (from the eval's capacity report and the launcher summary)
METRICS = ("exact_match_seen", "lift_seen", "bits", "bits_control", "control_em", "k50", "val_loss")


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
                    raise RuntimeError(f"{plan['name']}: training did not finish (no summary at "
                                       f"{plan['cfg'].trainer['max_steps']} steps with an export); see {plan['log']}")


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


SLOT_READS_NOTE = (
    "Memory reads of the fact prompts (first memory layer; memlm/inspection/fact_slots.py): at the answer position "
    "(end of the cloze prompt) and at the subject position (last token of the name). coverage = distinct slots read "
    "by all prompts / table slots; shared / conflict = share of a fact's slots that another person's fact reads too / "
    "another person's fact with another answer."
)
SLOT_KEYS = ("coverage", "distinct_slots", "shared_frac", "conflict_frac", "top1_weight")


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
    ax.set_xscale("log", base=2)
    ax.set_xlabel("exposure level k (appearances in the corpus; 0.5 = never seen)")
    ax.set_ylabel("exact match (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("recall vs exposure (mean ± SE over seeds)")
    fig.tight_layout()
    paths.append(out_dir / "recall_vs_exposure.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

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
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory slots")
        ax.set_ylabel("pooled lift over chance, k >= 1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("recall vs memory size (mean ± SE over seeds)")
        fig.tight_layout()
        paths.append(out_dir / "recall_vs_memory_size.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


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
