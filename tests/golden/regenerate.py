#!/usr/bin/env python
"""Regenerate ``tests/golden/tiny_losses.json``: the first 20 training losses of the tiny test config on CPU.

    python tests/golden/regenerate.py            # rewrite the golden file (then review the diff and commit it)
    python tests/golden/regenerate.py --check    # compare only (exit 1 on a difference), like the test

Regenerate only when a change is *meant* to alter the loss curve (new init, new data order, a model change), and say
so in the commit message; a refactor must leave the curve within ``TOLERANCE``. ``tests/test_reliability.py`` runs
the same :func:`golden_losses`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("tiny_losses.json")
TOLERANCE = 1e-4  # absolute, per step: across machines / thread counts CPU reductions differ in the last bits
STEPS = 20


def golden_overrides(run_dir: str | Path, name: str = "golden") -> list[str]:
    return [f"--train.run_dir={run_dir}", f"--train.name={name}", f"--trainer.max_steps={STEPS}",
            "--trainer.val_check_interval=20", "--trainer.limit_val_batches=1", "--train.export=false",
            "--train.checkpoint_every=20", "--trainer.accelerator=cpu"]  # fmt: skip


def golden_losses(run_dir: str | Path, name: str = "golden") -> dict[str, float]:
    """Train the tiny config for 20 steps (in this process, cwd = the repository root) and return its losses."""
    import torch

    from memlm.config import load_run_config
    from memlm.training.launcher import train

    torch.set_num_threads(1)  # one thread: the same reduction order on every machine
    cfg = load_run_config([ROOT / "tests/fixtures/train/tiny.yaml"], golden_overrides(run_dir, name))
    train(cfg)
    return json.loads((Path(run_dir) / name / "train_losses.json").read_text())


def compare(losses: dict[str, float], golden: dict[str, float]) -> list[str]:
    problems = [f"steps differ: {list(losses)} vs {list(golden)}"] if list(losses) != list(golden) else []
    for k in golden:
        if k in losses and not abs(losses[k] - golden[k]) <= TOLERANCE:
            problems.append(f"step {k}: {losses[k]:.6f} vs golden {golden[k]:.6f}")
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tests/golden/regenerate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare only (exit 1 on a difference); write nothing")
    args = p.parse_args(argv)  # --help prints this and exits before anything is trained or written
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MEMLM_CACHE", str(Path(tmp) / "cache"))
        losses = golden_losses(Path(tmp) / "runs")
    if args.check:
        problems = compare(losses, json.loads(GOLDEN.read_text()))
        print("\n".join(problems) or "golden losses match")
        return 1 if problems else 0
    GOLDEN.write_text(json.dumps(losses, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(losses)} steps)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
