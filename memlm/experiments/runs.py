"""Whether an existing launcher run dir is a run of a given recipe, finished or not: what lets the multi-run
experiments (``eval/compare.py``, ``eval/capacity.py``) reuse or resume their own runs and refuse anything else."""

from __future__ import annotations

from pathlib import Path


def covers(want, saved) -> bool:
    """``saved`` agrees with ``want`` on every key it has (config fields added since the run was saved are skipped)."""
    if isinstance(want, dict) and isinstance(saved, dict):
        return all(k in want and covers(want[k], v) for k, v in saved.items())
    return want == saved


def same_recipe(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir`` was trained with ``cfg`` (model, data, optim, train sections and the step budget)."""
    import yaml

    from memlm.config import to_dict

    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    saved, want = yaml.safe_load(path.read_text(encoding="utf-8")) or {}, to_dict(cfg)
    want["model"]["vocab_size"] = saved.get("model", {}).get("vocab_size")  # the launcher takes it from the tokenizer
    same = all(covers(want[k], saved.get(k)) for k in ("model", "data", "optim", "train"))
    return same and (saved.get("trainer") or {}).get("max_steps") == cfg.trainer["max_steps"]


def finished_summary(run_dir: Path, cfg) -> dict | None:
    """The summary of a finished run of this very recipe (with its export), else None."""
    import yaml

    path = run_dir / "summary.yaml"
    if not path.is_file() or not (run_dir / "export" / "model.safetensors").is_file() or not same_recipe(run_dir, cfg):
        return None
    summary = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return summary if summary.get("steps") == cfg.trainer["max_steps"] else None
