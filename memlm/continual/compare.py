"""One command, four methods, one table: sparse memory finetuning vs full finetuning vs LoRA vs memory-only
(the comparison of Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"), all from the same base
checkpoint, on the same fact stream, evaluated on the same tasks (the base model is evaluated once).

    python -m memlm.continual.compare --ckpt runs/tiny/export [--config configs/finetune/tiny_compare.yaml] \
        [--methods sparse_memory,full] [--out_dir runs/continual_compare] [--stream.stages=2] [--full.optim.lr=3e-5]

``--section.key=value`` applies to every method; ``--<method>.section.key=value`` to one. Each method starts from
``configs/finetune/<method>.yaml`` (``--configs_dir`` to change). Writes ``<out_dir>/<method>/`` per method (see
:mod:`memlm.continual.script`), ``compare.md`` (the table), ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from memlm.config import ConfigError, deep_merge, load_finetune_config, parse_overrides, read_yaml, to_dict
from memlm.continual.report import format_table, plot_stages, table_rows
from memlm.continual.script import USER_ERRORS, run
from memlm.data.cache import atomic_write_json

METHODS = ("sparse_memory", "full", "lora", "memory_only")
ROOT = Path(__file__).resolve().parents[2]
SHARED = ("stream", "eval")  # sections that must be identical across methods (same facts, same tasks)


def method_configs(
    methods: list[str], configs_dir: Path, overrides: dict[str, Any], out_dir: str, shared_yaml: list[str] = ()
):
    """Resolved FinetuneConfig per method: its YAML < shared YAMLs (``--config``) < shared overrides < its own."""
    shared: dict[str, Any] = {}
    for p in shared_yaml:
        shared = deep_merge(shared, read_yaml(p))
    shared = deep_merge(shared, {k: v for k, v in overrides.items() if k not in METHODS})
    cfgs = {}
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
        path = configs_dir / f"{m}.yaml"
        data = deep_merge(read_yaml(path), {k: v for k, v in shared.items() if k != "method"})
        data = deep_merge(data, overrides.get(m) or {})
        data = deep_merge(data, {"method": m, "out_dir": out_dir, "name": m})
        cfgs[m] = load_finetune_config(overrides=data)
    first = next(iter(cfgs.values()))
    for m, c in cfgs.items():
        for sec in SHARED:
            if to_dict(getattr(c, sec)) != to_dict(getattr(first, sec)):
                raise ConfigError(
                    f"the '{sec}' section of {m} differs from {methods[0]}'s: a comparison needs the same facts and "
                    "tasks for every method (set it once with --{sec}.key=value)"
                )
    return cfgs


def compare(ckpt: str | Path, cfgs: dict, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every method from ``ckpt``; returns ``{"runs": {method: summary}, "table": markdown}``."""
    out_dir = Path(out_dir)
    runs: dict[str, dict] = {}
    base = None
    for m, cfg in cfgs.items():
        r = run(ckpt, cfg, base_results=base, progress=progress)
        base = r.pop("base_results")
        runs[m] = r
    table = format_table(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(table + "\n", encoding="utf-8")
    atomic_write_json(
        out_dir / "compare.json",
        {
            "ckpt": str(ckpt),
            "rows": table_rows(runs),
            "runs": {m: {k: v for k, v in r.items()} for m, r in runs.items()},
        },
    )
    plot_stages(runs, out_dir / "compare.png")
    return {"runs": runs, "table": table}


def main(argv: list[str] | None = None) -> int:
    from memlm.utils.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m memlm.continual.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--ckpt", required=True, help="the base checkpoint (export directory or .ckpt)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--configs_dir", default=str(ROOT / "configs" / "finetune"),
                   help="where each method's <method>.yaml lives")  # fmt: skip
    p.add_argument("--config", action="append", default=[], help="shared YAML for every method (e.g. the stream)")
    p.add_argument("--out_dir", default="runs/continual_compare", help="one run per method + the comparison table")
    p.add_argument("--quiet", action="store_true", help="no progress bars inside the runs")
    try:
        args, rest = p.parse_known_args(argv)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        cfgs = method_configs(methods, Path(args.configs_dir), parse_overrides(rest), args.out_dir, args.config)
        if not args.quiet:
            for m, c in cfgs.items():
                print(f"{m}: optim {yaml.safe_dump(to_dict(c.optim), default_flow_style=True).strip()}")
        result = compare(args.ckpt, cfgs, args.out_dir, progress=not args.quiet)
        print(result["table"])
        print(f"wrote {args.out_dir}/compare.md, compare.json, compare.png")
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
