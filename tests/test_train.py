"""The training launcher end to end, through the same command a user types (tiny config, CPU, offline)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memlm
from memlm.config import ConfigError, OptimConfig, load_run_config
from memlm.training.schedule import group_lambdas, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/fixtures/train/tiny.yaml"


def run_train(*args: str, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "train.py", "--config", TINY, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def assert_same_curve(run_a: Path, run_b: Path, steps: range, tol: float = 1e-4) -> None:
    """The two runs' ``train_losses.json`` hold exactly ``steps`` and agree within ``tol`` at each of them."""
    import json

    a = json.loads((run_a / "train_losses.json").read_text())
    b = json.loads((run_b / "train_losses.json").read_text())
    assert list(a) == list(b) == [str(i) for i in steps], (list(a), list(b))
    for k in a:
        assert abs(a[k] - b[k]) < tol, (k, a[k], b[k])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (6 steps) shared by the tests below."""
    base = tmp_path_factory.mktemp("train")
    r = run_train(f"--train.run_dir={base}/runs", "--train.name=t", cache=base / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    return base, r


def test_train_export_load(trained):
    base, r = trained
    run = base / "runs" / "t"
    assert "memlm training summary" in r.stdout
    # progress (the fixture disables the bar: progress.log only): step/max_steps, loss, tokens/s, ETA; no noise
    progress = (run / "progress.log").read_text()
    assert "done: step 6/6 (100%) | loss " in progress and "tok/s | elapsed" in progress, progress
    assert "validation at step 3: val/loss" in progress
    assert "FLOPs     " in r.stdout and "Total FLOPs: 0" not in r.stdout + r.stderr
    assert "litlogger" not in r.stdout + r.stderr and "LeafSpec" not in r.stderr
    for f in ("config.yaml", "checkpoints/last.ckpt", "export/model.safetensors", "export/tokenizer", "summary.yaml"):
        assert (run / f).exists(), f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    model, tok = memlm.load_pretrained(run / "export")
    assert tok is not None and model.cfg.vocab_size == tok.vocab_size
    ids = tok.encode("The capital of France is", bos=True)
    out = model.generate([ids], max_new_tokens=4)
    assert len(out[0]) <= 4
    # the Lightning checkpoint loads to the same weights
    m2, _ = memlm.load_pretrained(run / "checkpoints" / "last.ckpt")
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_continues(trained):
    base, _ = trained
    r = run_train(f"--train.run_dir={base}/runs", "--train.name=t", "--trainer.max_steps=9", "--ckpt_path=last",
                  "--trainer.enable_progress_bar=true", "--train.progress_every=3", cache=base / "cache")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps            9" in r.stdout
    # stdout is not a terminal: plain progress lines, counted over the whole run
    assert "resumed at step 6/9" in r.stdout and "step 9/9 (100%) | loss " in r.stdout, r.stdout
    assert "| ETA " in r.stdout


def test_resume_wrong_architecture_is_one_clear_error(trained):
    base, _ = trained
    r = run_train(f"--train.run_dir={base}/runs", "--train.name=t", "--model.dim=48", "--ckpt_path=last",
                  cache=base / "cache")  # fmt: skip
    assert r.returncode == 2
    assert "different architecture" in r.stderr and "dim" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model.dimm=3"], "model.dimm"),
        (["--optim.lr=fast"], "optim.lr"),
        (["--trainer.max_stepz=3"], "trainer.max_stepz"),
        (["--config", "does/not/exist.yaml"], "not found"),
        (["--ckpt_path=nope.ckpt"], "nope.ckpt"),
    ],
)
def test_bad_input_exit_2(tmp_path, args, needle):
    r = run_train(*args, f"--train.run_dir={tmp_path}", cache=tmp_path / "cache", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_print_config_applies_overrides_in_order(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model: {dim: 48}\noptim: {lr: 0.5}\n")
    r = subprocess.run(
        [sys.executable, "train.py", "--config", TINY, "--config", str(extra), "--optim.lr=0.25", "--print_config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = load_run_config([TINY, str(extra)], ["--optim.lr=0.25"])
    assert cfg.model.dim == 48 and cfg.optim.lr == 0.25 and cfg.trainer["max_steps"] == 6
    assert "dim: 48" in r.stdout and "lr: 0.25" in r.stdout


def test_every_pretrain_config_parses():
    for path in sorted((ROOT / "configs" / "pretrain").glob("*.yaml")):
        cfg = load_run_config([path])
        assert cfg.model.n_layers > 0, path


def test_schedules():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    groups = [{"name": "decay"}, {"name": "memory_values"}]
    fixed = group_lambdas(groups, OptimConfig(warmup_steps=0, value_lr=1e-3), 100)
    assert fixed[1](90) == 1.0 and fixed[0](90) < 0.2
    # UltraMem: value lr multiplier lambda=4 decays linearly to 1 (on top of a constant schedule here)
    ultra = group_lambdas(groups, OptimConfig(warmup_steps=0, value_lr_mult=4.0, value_lr_decay_to=1.0,
                                              value_schedule="constant"), 100)  # fmt: skip
    assert ultra[1](0) == pytest.approx(1.0) and ultra[1](100) == pytest.approx(0.25)
    assert ultra[1](50) == pytest.approx(2.5 / 4)
    # a fixed value lr would silently drop the multiplier (the group's initial lr): refused with the fix named
    with pytest.raises(ConfigError, match="--optim.value_lr=null"):
        OptimConfig(value_lr=1e-3, value_lr_mult=4.0, value_lr_decay_to=1.0)


def test_ddp_two_processes_match_single_process(tmp_path):
    """2-process DDP on CPU (gloo) with the same global batch as one process gives the same loss curve."""
    common = ["--data.shuffle=false", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
              "--train.export=false", "--trainer.accelerator=cpu"]  # fmt: skip
    single = run_train(*common, f"--train.run_dir={tmp_path}", "--train.name=single", "--train.batch_size=4",
                       cache=tmp_path / "cache")  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_train(*common, f"--train.run_dir={tmp_path}", "--train.name=ddp", "--train.batch_size=2",
                    "--trainer.devices=2", "--trainer.strategy=ddp", cache=tmp_path / "cache")  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same_curve(tmp_path / "single", tmp_path / "ddp", range(1, 5))


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """``train.compile: true`` (torch.compile, CPU inductor here) trains the same curve as eager, up to fusion
    rounding. Opt-in (``pytest -m slow``): compiling takes ~40 s on 2 cores."""
    import json

    common = ["--data.shuffle=false", "--trainer.max_steps=5", "--trainer.val_check_interval=5", "--train.export=false",
              "--train.probe_facts=0", f"--train.run_dir={tmp_path}"]  # fmt: skip
    eager = run_train(*common, "--train.name=eager", cache=tmp_path / "cache")
    assert eager.returncode == 0, eager.stderr[-3000:]
    comp = run_train(*common, "--train.name=compiled", "--train.compile=true", cache=tmp_path / "cache", timeout=600)
    assert comp.returncode == 0, comp.stderr[-3000:]
    assert "Graph break" not in comp.stderr  # e.g. the rope lookup once broke the graph with a host sync
    a = json.loads((tmp_path / "eager" / "train_losses.json").read_text())
    b = json.loads((tmp_path / "compiled" / "train_losses.json").read_text())
    assert list(a) == list(b) == ["1", "2", "3", "4", "5"]
    for k in a:
        assert abs(a[k] - b[k]) < 2e-3, (k, a[k], b[k])
