"""The learning / forgetting frontier sweep (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"):
every method over a grid of its hyper-parameters, from one base checkpoint, on the same facts and tasks, the frontier
points repeated over seeds, and forgetting compared at matched learning.

    python -m memlm.continual.sweep --ckpt runs/tiny_cl/export --config configs/finetune/frontier_tiny.yaml \
        [--name frontier] [--out_dir runs/sweeps] [--methods sparse_memory,full] [--results results/smf_frontier] \
        [--section.key=value ...]

The sweep YAML has a ``sweep:`` section and, beside it, finetune settings shared by every method (``stream``, ``train``,
``eval``, ...)::

    sweep:
      seeds: 1                 # seeds of every grid point
      frontier_seeds: 3        # the frontier points are rerun until they have this many
      forgetting: forgetting_f1   # the frontier's forgetting axis (memlm.continual.frontier.METRICS)
      methods:
        sparse_memory: {grid: {smf.top_t: [25, 500], optim.lr: [2.0, 20.0]}, set: {smf.df_unit: sequence}}
        full: {grid: {optim.lr: [1.0e-5, 1.0e-4]}}

A point's config: ``configs/finetune/<method>.yaml`` < the shared settings < ``set`` < the grid point < the seed. Seed
``s`` trains on a different block of facts (``stream.offset += s * stages * facts_per_stage``) with ``train.seed = s``.
Runs go to ``<out_dir>/<name>/<method>/<point>/seed<s>/`` (:mod:`memlm.continual.script`); a finished run (its
``summary.json`` exists) is reused, an unfinished one is left as it is and the point is rerun beside it. The report —
``frontier.json``, ``frontier.md``, ``frontier.png`` — goes to the sweep directory (and ``--results``). Every config
and every point is checked before the first run; a user error prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm.config import ConfigError, deep_merge, load_finetune_config, parse_overrides, read_yaml, to_dict
from memlm.config.finetune import METHODS
from memlm.continual import frontier
from memlm.data.cache import atomic_write_json, sha256_json

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("stream", "eval")  # identical for every method and point (same facts, same tasks)


@dataclass
class Point:
    """One grid point of one method: its label, its overrides, and the resolved config per seed."""

    method: str
    label: str
    overrides: dict[str, Any]
    cfgs: dict[int, Any] = field(default_factory=dict)  # seed -> FinetuneConfig


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 2.0}`` -> ``{"optim": {"lr": 2.0}}``."""
    out: dict[str, Any] = {}
    for key, v in dotted.items():
        *head, last = str(key).split(".")
        d = out
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def _label(values: dict[str, Any]) -> str:
    """A directory-safe name of a grid point: ``top_t=500,lr=2.0``."""
    if not values:
        return "default"
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()).replace("/", "_")


def parse_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate the ``sweep:`` section; returns ``{"seeds", "frontier_seeds", "methods": {m: {"grid", "set"}}}``."""
    if not isinstance(spec, dict):
        raise ConfigError("the sweep config needs a 'sweep:' section (seeds, frontier_seeds, methods)")
    unknown = sorted(set(spec) - {"seeds", "frontier_seeds", "methods", "forgetting"})
    if unknown:
        raise ConfigError(f"sweep: unknown key(s) {unknown} (known: seeds, frontier_seeds, forgetting, methods)")
    forgetting = spec.get("forgetting", frontier.FORGET)
    if forgetting not in frontier.METRICS or forgetting.startswith("learning"):
        known = [m for m in frontier.METRICS if not m.startswith("learning")]
        raise ConfigError(f"sweep.forgetting: {forgetting!r} is not a forgetting metric (choose from {known})")
    seeds, fseeds = spec.get("seeds", 1), spec.get("frontier_seeds", 3)
    for key, v in (("seeds", seeds), ("frontier_seeds", fseeds)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"sweep.{key} must be an integer >= 1, got {v!r}")
    methods = spec.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("sweep.methods is empty: name at least one method with its grid")
    out = {}
    for m, entry in methods.items():
        if m not in METHODS:
            raise ConfigError(f"sweep.methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
        entry = entry or {}
        bad = sorted(set(entry) - {"grid", "set"})
        if bad:
            raise ConfigError(f"sweep.methods.{m}: unknown key(s) {bad} (known: grid, set)")
        grid = entry.get("grid") or {}
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"sweep.methods.{m}.grid is empty: give at least one key with a list of values")
        for k, vals in grid.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"sweep.methods.{m}.grid.{k} must be a non-empty list of values, got {vals!r}")
        out[m] = {"grid": grid, "set": entry.get("set") or {}}
    return {"seeds": seeds, "frontier_seeds": max(fseeds, seeds), "forgetting": forgetting, "methods": out}


def seed_overrides(shared_cfg, seed: int) -> dict[str, Any]:
    """What seed ``s`` changes: the block of facts and the finetuning seed."""
    n = shared_cfg.stream.stages * shared_cfg.stream.facts_per_stage
    return {"stream": {"offset": shared_cfg.stream.offset + seed * n, "seed": seed}, "train": {"seed": seed}}


def build_points(spec: dict[str, Any], shared: dict[str, Any], configs_dir: Path, out: Path, seeds: int) -> list[Point]:
    """Every grid point of every method, with its config resolved (and so validated) for seeds 0 .. seeds-1."""
    points = []
    for m, entry in spec["methods"].items():
        keys = list(entry["grid"])
        for combo in itertools.product(*(entry["grid"][k] for k in keys)):
            values = dict(zip(keys, combo))
            p = Point(m, _label(values), deep_merge(_nest(entry["set"]), _nest(values)))
            for s in range(seeds):
                point_cfg(p, s, shared, configs_dir, out)
            points.append(p)
    first = points[0].cfgs[0]
    for p in points:
        for sec in SHARED:
            if to_dict(getattr(p.cfgs[0], sec)) != to_dict(getattr(first, sec)):
                raise ConfigError(
                    f"sweep: the '{sec}' section of {p.method} {p.label} differs from {points[0].method}'s: a frontier "
                    f"needs the same facts and tasks for every point (set {sec} once, outside the grid)"
                )
    return points


def point_cfg(p: Point, seed: int, shared: dict[str, Any], configs_dir: Path, out: Path):
    """The FinetuneConfig of ``p`` at ``seed`` (cached on the point)."""
    if seed in p.cfgs:
        return p.cfgs[seed]
    path = configs_dir / f"{p.method}.yaml"
    data = deep_merge(read_yaml(path) if path.is_file() else {}, {k: v for k, v in shared.items() if k != "method"})
    data = deep_merge(data, p.overrides)
    base = load_finetune_config(overrides=deep_merge(data, {"method": p.method}))
    data = deep_merge(data, seed_overrides(base, seed))
    where = {"method": p.method, "out_dir": str(out / p.method / p.label), "name": f"seed{seed}"}
    data = deep_merge({"save_model": False}, deep_merge(data, where))
    try:
        p.cfgs[seed] = load_finetune_config(overrides=data)
    except ConfigError as e:
        raise ConfigError(f"sweep point {p.method} {p.label}: {e}") from None
    return p.cfgs[seed]


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """A run config without where it was written (out_dir, name) and the checkpoint path key."""
    return {k: v for k, v in cfg_dict.items() if k not in ("out_dir", "name", "ckpt")}


def finished(run_dir_parent: Path, seed: int, cfg=None) -> Path | None:
    """The summary.json of a finished run of ``seed`` under a point's directory (any attempt) whose saved config is
    ``cfg`` (when given), else None: a run made with other settings (an edited method YAML or ``set:``) is not
    reused."""
    import yaml

    want = None if cfg is None else _comparable(to_dict(cfg))
    for d in sorted(run_dir_parent.glob(f"seed{seed}*")):
        if d.name.split(".")[0] != f"seed{seed}" or not (d / "summary.json").is_file():
            continue
        if want is not None:
            saved = (
                yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) if (d / "config.yaml").is_file() else {}
            )
            if _comparable(saved or {}) != want:
                continue
        return d / "summary.json"
    return None


def fresh_name(run_dir_parent: Path, seed: int) -> str:
    """A run name under the point's directory that does not exist yet (an unfinished attempt is never touched)."""
    name, k = f"seed{seed}", 2
    while (run_dir_parent / name).exists():
        name, k = f"seed{seed}.r{k}", k + 1
    return name


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{dev}; {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


class Sweep:
    """Runs the grid, then the frontier seeds, and writes the report. ``run_fn(ckpt, cfg, base_results, progress)``
    is :func:`memlm.continual.script.run` (a parameter so tests can count calls)."""

    def __init__(self, ckpt, spec, shared, out: Path, configs_dir: Path, progress: bool, command: str, run_fn=None):
        from memlm.continual.script import run

        self.ckpt, self.spec, self.shared, self.out = ckpt, spec, shared, out
        self.configs_dir, self.progress, self.command = configs_dir, progress, command
        self.run_fn = run_fn or run
        self.points = build_points(spec, shared, configs_dir, out, spec["seeds"])
        self.base_results: dict[int, dict] = {}  # seed -> the base model's evaluation (same facts for every method)
        self.t_runs: list[float] = []
        self.done = self.ran = 0

    # -------------------------------------------------------------------------------------------- checks before work
    def check(self) -> None:
        """Every point's method applies to the checkpoint (SMF needs memory, top_t fits the table); the stream has
        enough facts for every seed. Loads the model once; writes nothing."""
        import memlm
        from memlm.continual import stream
        from memlm.continual.methods import check_method_applies

        model, _ = memlm.load_pretrained(self.ckpt, with_tokenizer=False)
        for p in self.points:
            check_method_applies(model, p.cfgs[0])
        for s in range(self.spec["frontier_seeds"]):
            cfg = point_cfg(self.points[0], s, self.shared, self.configs_dir, self.out)
            stream.load_facts(cfg.stream)

    def _check_dir(self) -> None:
        """A sweep directory holds one sweep: refuse to mix runs made with other shared settings."""
        key = {"ckpt": str(Path(self.ckpt).resolve()), "shared": self.shared}
        meta = self.out / "sweep_settings.json"
        if meta.is_file():
            old = json.loads(meta.read_text(encoding="utf-8"))
            if old.get("hash") != sha256_json(key):
                raise ConfigError(
                    f"{self.out} holds a sweep with another checkpoint or other shared settings (see {meta}): choose "
                    "another --name or --out_dir"
                )
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta, {"hash": sha256_json(key), **key})

    # -------------------------------------------------------------------------------------------- running
    def run_point(self, p: Point, seed: int, total: int) -> dict[str, Any]:
        cfg = point_cfg(p, seed, self.shared, self.configs_dir, self.out)
        parent = Path(cfg.out_dir)
        done = finished(parent, seed, cfg)
        self.done += 1
        if done is not None:
            return json.loads(done.read_text(encoding="utf-8"))
        cfg.name = fresh_name(parent, seed)
        t0 = time.perf_counter()
        result = self.run_fn(self.ckpt, cfg, self.base_results.get(seed), progress=self.progress)
        if result.get("base_results") is not None:
            self.base_results.setdefault(seed, result["base_results"])
        self.t_runs.append(time.perf_counter() - t0)
        self.ran += 1
        m = frontier.run_metrics(result)
        left = (total - self.done) * (sum(self.t_runs) / len(self.t_runs))
        fg = m["forgetting_f1"]
        print(f"[sweep {self.done}/{total}] {p.method} {p.label} seed {seed}: learning F1 {m['learning_f1']:.1%}, "
              f"forgetting {'n/a' if fg is None else f'{fg:.1%}'} ({self.t_runs[-1]:.0f} s, ETA {left / 60:.0f} min)",
              flush=True)  # fmt: skip
        return result

    def point_entry(self, p: Point, summaries: dict[int, dict]) -> dict[str, Any]:
        per_seed = {s: frontier.run_metrics(r) for s, r in sorted(summaries.items())}
        return {"method": p.method, "label": p.label, "overrides": p.overrides, "seeds": sorted(per_seed),
                "per_seed": per_seed, "agg": frontier.aggregate(list(per_seed.values()))}  # fmt: skip

    def run(self) -> dict[str, Any]:
        self.check()
        self._check_dir()
        seeds, fseeds = self.spec["seeds"], self.spec["frontier_seeds"]
        total = len(self.points) * seeds
        summaries: dict[tuple[str, str], dict[int, dict]] = {}
        for s in range(seeds):  # seed-major: every method sees seed 0's facts first (their base eval is shared)
            for p in self.points:
                summaries.setdefault((p.method, p.label), {})[s] = self.run_point(p, s, total)
        entries = [self.point_entry(p, summaries[(p.method, p.label)]) for p in self.points]
        fronts = self._fronts(entries)
        extra = [(p, s) for p in self.points for s in range(seeds, fseeds) if self._on_front(p, fronts)]
        total += len(extra)
        for p, s in sorted(extra, key=lambda ps: ps[1]):
            summaries[(p.method, p.label)][s] = self.run_point(p, s, total)
        entries = [self.point_entry(p, summaries[(p.method, p.label)]) for p in self.points]
        return self.report(entries)

    def _fronts(self, entries: list[dict], full_seeds: int | None = None) -> dict[str, list[dict]]:
        """Per method, the Pareto frontier over its points (with ``full_seeds``: only points run on that many seeds,
        so a point is never on the final frontier on the strength of one lucky seed)."""
        methods = dict.fromkeys(e["method"] for e in entries)
        fg = self.spec["forgetting"]
        origin = self._origin(entries)
        ok = [e for e in entries if full_seeds is None or len(e["seeds"]) >= full_seeds]
        return {m: frontier.pareto([e for e in ok if e["method"] == m], forget=fg, origin=origin) for m in methods}

    @staticmethod
    def _origin(entries: list[dict]) -> float | None:
        """The base model's learning level (mean over the seeds' fact blocks, each seed counted once)."""
        per_seed = {}
        for e in entries:
            for s, m in e["per_seed"].items():
                if m.get("base_learning_f1") is not None:
                    per_seed[s] = m["base_learning_f1"]
        return frontier.mean_se(list(per_seed.values()))[0]

    @staticmethod
    def _on_front(p: Point, fronts: dict[str, list[dict]]) -> bool:
        return any(e["label"] == p.label for e in fronts.get(p.method, []))

    # -------------------------------------------------------------------------------------------- the report
    def report(self, entries: list[dict]) -> dict[str, Any]:
        fronts = self._fronts(entries, self.spec["frontier_seeds"])
        for e in entries:
            e["frontier"] = any(f is e for f in fronts[e["method"]])
        # the matched level over the paper's comparison (SMF, full, LoRA): an auxiliary method never lowers it
        main = {m: f for m, f in fronts.items() if m in ("sparse_memory", "full", "lora")} or fronts
        level = frontier.matched_level(main)
        origin = self._origin(entries)
        matched = {"level": level, "origin": origin, "methods": sorted(main), "forgetting": {}}
        if level is not None:
            for m, f in fronts.items():
                v, se = frontier.forgetting_at(f, level, forget=self.spec["forgetting"], origin=origin)
                matched["forgetting"][m] = {"mean": v, "se": se}
        # pairwise against SMF: each method at the highest level both it and SMF reach (the common level above is set
        # by the weakest learner; this compares SMF with each method as far as that method learns)
        pairwise = {}
        smf_front = fronts.get("sparse_memory")
        for m, f in fronts.items():
            if m == "sparse_memory" or not f or not smf_front:
                continue
            lv = frontier.matched_level({"sparse_memory": smf_front, m: f})
            if lv is None or (origin is not None and lv <= origin):
                continue
            fs, ss = frontier.forgetting_at(smf_front, lv, forget=self.spec["forgetting"], origin=origin)
            fm, sm = frontier.forgetting_at(f, lv, forget=self.spec["forgetting"], origin=origin)
            pairwise[m] = {"level": lv, "sparse_memory": {"mean": fs, "se": ss}, m: {"mean": fm, "se": sm}}
        matched["pairwise"] = pairwise
        rep = {
            "command": self.command,
            "machine": machine(),
            "date": datetime.date.today().isoformat(),
            "ckpt": str(self.ckpt),
            "spec": self.spec,
            "forgetting": self.spec["forgetting"],
            "shared": self.shared,
            "points": entries,
            "matched": matched,
            "runs_this_invocation": self.ran,
        }
        atomic_write_json(self.out / "frontier.json", rep)
        (self.out / "frontier.md").write_text(header(rep) + frontier.markdown(rep), encoding="utf-8")
        frontier.plot(rep, self.out / "frontier.png")
        return rep


def header(rep: dict[str, Any]) -> str:
    return (f"# Learning / forgetting frontier\n\nRegenerate: `{rep['command']}`\n\nMachine: {rep['machine']}. "
            f"Date: {rep['date']}. Base checkpoint: `{rep['ckpt']}`.\n\n")  # fmt: skip


RESULT_FILES = {"frontier.json": "frontier.json", "frontier.md": "README.md", "frontier.png": "frontier.png"}


def write_results(rep: dict[str, Any], out: Path, results: Path) -> None:
    """Copy the report into ``results`` (the markdown as its README.md), refusing files that exist: they were not
    written by this run."""
    busy = [n for n in RESULT_FILES.values() if (results / n).exists()]
    if busy:
        raise ConfigError(f"--results {results} already holds {busy}: remove them or choose another --results dir")
    results.mkdir(parents=True, exist_ok=True)
    for src, dst in RESULT_FILES.items():
        (results / dst).write_bytes((out / src).read_bytes())


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m memlm.continual.sweep",
        description="Learning/forgetting frontier: every finetuning method over a grid from one base checkpoint, "
        "frontier points over seeds, forgetting at matched learning. Shared settings: --section.key=value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="base model: export directory or Lightning .ckpt")
    p.add_argument("--config", required=True, help="sweep YAML (a sweep: section + shared finetune settings)")
    p.add_argument("--name", default=None, help="sweep directory name (default: the config file's stem)")
    p.add_argument("--out_dir", default="runs/sweeps", help="parent of the sweep directory")
    p.add_argument("--methods", default=None, help="comma-separated subset of the config's methods")
    p.add_argument("--results", default=None, help="also copy frontier.{json,md,png} into this directory")
    p.add_argument("--configs_dir", default=str(ROOT / "configs" / "finetune"),
                   help="where each method's base YAML (<method>.yaml) lives")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars inside the runs")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from memlm.continual.script import USER_ERRORS
    from memlm.utils.malloc import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        raw = read_yaml(args.config)
        spec = parse_spec(raw.pop("sweep", None))
        if args.methods:
            keep = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in keep if m not in spec["methods"]]
            if bad:
                raise ConfigError(f"--methods: {bad} not in the sweep config's methods {list(spec['methods'])}")
            spec["methods"] = {m: spec["methods"][m] for m in keep}
        shared = deep_merge(raw, parse_overrides(overrides))
        out = Path(args.out_dir) / (args.name or Path(args.config).stem)
        results = Path(args.results) if args.results else None
        if results is not None and any((results / n).exists() for n in RESULT_FILES.values()):
            raise ConfigError(f"--results {results} already holds a frontier report: remove it or choose another dir")
        command = "python -m memlm.continual.sweep " + " ".join(shlex.quote(a) for a in argv)
        sweep = Sweep(args.ckpt, spec, shared, out, Path(args.configs_dir), not args.quiet, command)
        rep = sweep.run()
        if results is not None:
            write_results(rep, out, results)
        print(frontier.markdown(rep), end="")
        print(f"wrote {out} (frontier.json, frontier.md, frontier.png)" + (f" and {results}" if results else ""))
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
