"""Reliability of training: crash safety (SIGKILL while saving), exact resume, determinism + golden losses, and the
non-finite guard. Subprocess runs are few and tiny (6 steps); the rest runs in-process."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from memlm.data.datamodule import EpochSampler, ResumableDataLoader
from memlm.training.launcher import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/fixtures/train/tiny.yaml"
SIX = ["--trainer.max_steps=6", "--train.checkpoint_every=2", "--train.export=false", "--trainer.accelerator=cpu"]

_spec = importlib.util.spec_from_file_location("golden_regenerate", ROOT / "tests" / "golden" / "regenerate.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def inproc(cache, monkeypatch):
    """In-process runs: repository root as cwd, the shared cache."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(cache))


def run_train(*args: str, cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MEMLM_FAULT", None)
    if fault:
        env["MEMLM_FAULT"] = fault
    return subprocess.run([sys.executable, "train.py", "--config", TINY, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def losses(run: Path) -> dict[str, float]:
    return json.loads((run / "train_losses.json").read_text())


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------------------- data order


def test_epoch_sampler_resumes_mid_epoch_and_shards_like_one_process():
    ds = TensorDataset(torch.arange(22))
    s = EpochSampler(22, shuffle=True, seed=3)
    e0, e1 = list(s), s.order(1)
    assert sorted(e0) == list(range(22)) and e0 != e1 and e0 == EpochSampler(22, seed=3).order(0)
    # a loader stopped after 2 batches of epoch 1 and restored in a fresh loader continues with batch 3
    dl = ResumableDataLoader(ds, batch_size=4, sampler=EpochSampler(22, seed=3))
    dl.sampler.set_epoch(1)
    it = iter(dl)
    seen = [next(it)[0].tolist() for _ in range(2)]
    state = dl.state_dict()
    assert state["epoch"] == 1 and state["start"] == 8
    fresh = ResumableDataLoader(ds, batch_size=4, sampler=EpochSampler(22, seed=3))
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(1)  # what Lightning does at the epoch start: same epoch, the position is kept
    rest = [b[0].tolist() for b in fresh]
    assert sum(seen + rest, []) == e1
    fresh.sampler.set_epoch(2)  # the next epoch starts from its beginning
    assert sum([b[0].tolist() for b in fresh], []) == s.order(2)
    # DDP: at every step the ranks' batches together are the single process's batch
    r0, r1 = (EpochSampler(22, seed=3, rank=r, world_size=2).order(0) for r in (0, 1))
    for step in range(5):
        assert sorted(r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]) == sorted(e0[4 * step : 4 * step + 4])


# ---------------------------------------------------------------------------------------------- crash + resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    """Run A: 6 steps, never interrupted (the reference of the resume tests)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    a = run_train(*SIX, f"--train.run_dir={root}", "--train.name=a", cache=cache)
    assert a.returncode == 0, a.stderr[-3000:]
    return root / "a"


def _same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert list(la) == list(lb) == [str(i) for i in range(1, 7)]
    diff = max(abs(la[k] - lb[k]) for k in la)
    print(f"resume equality: max |loss diff| over 6 steps = {diff:.3g}")
    assert diff <= 1e-6, (la, lb)
    wa, wb = weights(a / "checkpoints" / "last.ckpt"), weights(b / "checkpoints" / "last.ckpt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"


def test_sigkill_while_saving_then_resume_matches_uninterrupted_run(tmp_path, cache, uninterrupted):
    """Run B is SIGKILLed while writing its step-4 checkpoint (the new file complete in its temp name, not yet renamed),
    resumes from the step-2 last.ckpt with --ckpt_path last and finishes: losses and final weights equal run A's."""
    b = run_train(*SIX, f"--train.run_dir={tmp_path}", "--train.name=b", cache=cache, fault="kill_in_save@4")
    assert b.returncode == -signal.SIGKILL, b.stderr[-3000:]
    ckpts = tmp_path / "b" / "checkpoints"
    assert list(ckpts.glob(".*.tmp-*")), "the kill should have hit while the temp file existed"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)  # the last good one loads
    assert last["global_step"] == 2
    b2 = run_train(*SIX, f"--train.run_dir={tmp_path}", "--train.name=b", "--ckpt_path=last", cache=cache)
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert not list(ckpts.glob(".*.tmp-*")), "the half-written checkpoint is cleaned up"
    _same_run(uninterrupted, tmp_path / "b")


def test_sigterm_exits_nonzero_with_a_resumable_checkpoint(tmp_path, cache, uninterrupted):
    """Issue 17.4: SIGTERM (schedulers, `timeout`) after step 3: exit 143, one line naming the checkpoint, no export;
    --ckpt_path last continues from step 3 exactly like the uninterrupted run."""
    b = run_train(*SIX, "--train.export=true", f"--train.run_dir={tmp_path}", "--train.name=b", cache=cache,
                  fault="sigterm@3")  # fmt: skip
    assert b.returncode == 143, b.stderr[-3000:]
    lines = [x for x in b.stderr.splitlines() if x.startswith(("terminated:", "error:"))]
    assert len(lines) == 1 and "stopped by SIGTERM at step 3" in lines[0] and "--ckpt_path last" in lines[0], b.stderr
    assert "last.ckpt" in lines[0] and "Traceback" not in b.stderr
    assert not (tmp_path / "b" / "export").exists()
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    b2 = run_train(*SIX, f"--train.run_dir={tmp_path}", "--train.name=b", "--ckpt_path=last", cache=cache)
    assert b2.returncode == 0, b2.stderr[-3000:]
    _same_run(uninterrupted, tmp_path / "b")


def test_golden_regenerate_help_writes_nothing():
    """Issue 17.10: `regenerate.py --help` prints its usage and exits; the tracked golden file is left alone."""
    before = golden.GOLDEN.read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "tests/golden/regenerate.py"), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "--check" in r.stdout, r.stderr[-2000:]
    assert golden.GOLDEN.read_bytes() == before


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_losses_and_golden(tmp_path, inproc):
    first = golden.golden_losses(tmp_path, "one")
    second = golden.golden_losses(tmp_path, "two")
    assert first == second  # bitwise, same process and settings
    expected = json.loads(golden.GOLDEN.read_text())
    problems = golden.compare(first, expected)
    assert not problems, "loss curve of the tiny config changed (python tests/golden/regenerate.py if intended):\n" + (
        "\n".join(problems)
    )


# ---------------------------------------------------------------------------------------------- non-finite guard


def test_nonfinite_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, inproc, capsys):
    code = main(["--config", TINY, *SIX, f"--train.run_dir={tmp_path}", "--train.name=nan", "--optim.lr=1e30",
                 "--train.checkpoint_every=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: non-finite") and "at step 2" in line, err[-2000:]
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert not list((tmp_path / "nan").rglob(".*.tmp-*"))


def test_nonfinite_skip_leaves_weights_untouched(tmp_path, inproc, monkeypatch):
    args = ["--config", TINY, *SIX, f"--train.run_dir={tmp_path}", "--train.name=skip", "--train.on_nonfinite=skip"]
    assert main([*args, "--trainer.max_steps=2"]) == 0
    before = weights(tmp_path / "skip" / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("MEMLM_FAULT", "nan_grad@3")
    assert main([*args, "--trainer.max_steps=3", "--ckpt_path=last"]) == 0
    after = torch.load(tmp_path / "skip" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 3 and after["callbacks"]["NonFiniteGuard"]["skipped"] == 1
    assert all(torch.equal(before[k], after["state_dict"][k]) for k in before), "a skipped step moved a weight"
    assert all(math.isfinite(v) for v in losses(tmp_path / "skip").values())


# ---------------------------------------------------------------------------------------------- evaluation resume


def test_interrupted_eval_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    from eval_fixtures import FIXTURES, tiny_export

    import memlm.evaluation.runner as runner
    from memlm.evaluation.cli import run_main

    export = tiny_export(tmp_path / "export", tmp_path / "cache")
    tasks = f"{FIXTURES / 'task_local.yaml'},mc:{FIXTURES / 'mc.jsonl'},ppl:{FIXTURES / 'heldout.txt'}"
    common = ["--ckpt", str(export), "--tasks", tasks, "--limit", "4", "--batch_size", "2", "--chunk", "2",
              "--predictions"]  # fmt: skip
    assert run_main([*common, "--out", str(tmp_path / "clean.json")]) == 0
    real, calls = runner._score_rows, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # dies in the middle of the second task
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_score_rows", flaky)
    out = tmp_path / "res.json"
    assert run_main([*common, "--out", str(out)]) == 130
    assert not out.exists() and (tmp_path / "res.json.partial.jsonl").is_file()
    calls.clear()
    capsys.readouterr()
    assert run_main([*common, "--out", str(out)]) == 0
    assert "resuming: 6 examples already scored" in capsys.readouterr().err
    assert len(calls) == 3  # only the chunks that were not done: 1 of mc + 2 of heldout
    assert not (tmp_path / "res.json.partial.jsonl").exists()
    a, b = json.loads((tmp_path / "clean.json").read_text()), json.loads(out.read_text())
    for t in a["tasks"]:
        assert a["tasks"][t]["metrics"] == b["tasks"][t]["metrics"], t
        assert a["tasks"][t]["predictions"] == b["tasks"][t]["predictions"], t
    # an existing --out is never overwritten
    assert run_main([*common, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    out.unlink()
    # a re-run with other settings refuses the partial file of this one instead of mixing results
    (tmp_path / "res.json.partial.jsonl").write_text(json.dumps({"fingerprint": {"limit": 9}}) + "\n")
    assert run_main([*common, "--out", str(out)]) == 2
    assert "partial results of a different evaluation" in capsys.readouterr().err
