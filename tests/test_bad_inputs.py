"""Inputs users get wrong: each is one clear ``error: ...`` line and exit code 2 (train.py / eval/run.py entry points,
called in-process), no traceback, and nothing half-written left behind (no temp files, checkpoints and exports at
their final paths unchanged). One tiny trained run (2 steps) is shared by every case."""

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from memlm.evaluation.cli import run_main
from memlm.training.launcher import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/fixtures/train/tiny.yaml"
FAST = ["--trainer.max_steps=2", "--train.checkpoint_every=2", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-step run (checkpoint + export) and a tokenizer of another vocabulary."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setenv("MEMLM_CACHE", str(root / "cache"))
        assert main(["--config", TINY, *FAST, f"--train.run_dir={root}", "--train.name=good"]) == 0
        from memlm.data.tokenizer import Tokenizer

        text = (ROOT / "tests/fixtures/train/corpus.txt").read_text(encoding="utf-8").splitlines()
        Tokenizer.train(text, 384, cache_dir=root / "cache").save(root / "tok384")
    return root


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _write(tmp: Path, name: str, data: str | bytes) -> str:
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def _disk_full(obj, f, *a, **k):
    f.write(b"\0" * 4096)  # a few bytes land, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


LATIN1 = "café ok".encode("latin-1")

# each case: (tmp, run) -> (argv for train.py, needle); `run` is a private copy of the good run (to resume / overwrite)
CASES = {
    "malformed_yaml": lambda t, r: (["--config", _write(t, "bad.yaml", "model: {dim: [64,\n")], "bad.yaml"),
    "unknown_key": lambda t, r: (["--config", TINY, "--config", _write(t, "k.yaml", "model: {dimm: 3}\n")],
                                 "model.dimm"),
    "wrong_type": lambda t, r: (["--config", TINY, "--train.batch_size=four"], "train.batch_size"),
    "missing_data_file": lambda t, r: (["--config", TINY, f"--data.sources=[{{kind: text, path: {t}/no.txt}}]"],
                                       "no.txt"),
    "empty_corpus": lambda t, r: (["--config", TINY,
                                   f"--data.sources=[{{kind: text, path: {_write(t, 'e.txt', '')}}}]"], "no documents"),
    "non_utf8_text": lambda t, r: (["--config", TINY,
                                    f"--data.sources=[{{kind: text, path: {_write(t, 'l1.txt', LATIN1)}}}]"],
                                   "not valid UTF-8"),
    "truncated_checkpoint": lambda t, r: (["--config", TINY, "--ckpt_path",
                                           _write(t, "t.ckpt", (r / "checkpoints/last.ckpt").read_bytes()[:100_000])],
                                          "truncated"),
    "corrupted_checkpoint": lambda t, r: (["--config", TINY, "--ckpt_path", _corrupt(t, r)], "corrupted"),
    "other_architecture": lambda t, r: (["--config", TINY, "--model.dim=48", "--ckpt_path=last"],
                                        "different architecture"),
    "other_tokenizer": lambda t, r: (["--config", TINY, "--data.tokenizer.vocab_size=384", "--ckpt_path=last"],
                                     "another tokenizer (data.tokenizer.vocab_size: 512 in the checkpoint, 384 now)"),
    # issue 17: nothing of the finished run may be touched before the trainer section is known to be valid
    "bad_trainer_value": lambda t, r: (["--config", TINY, "--trainer.max_steps=abc", "--ckpt_path=last"],
                                       "trainer.max_steps"),
    "bad_trainer_option": lambda t, r: (["--config", TINY, "--trainer.precision=bogus", "--ckpt_path=last"],
                                        "trainer.precision"),
    "fresh_run_into_existing_dir": lambda t, r: (["--config", TINY, "--train.name=good"], "already exists"),
    "run_name_dotdot": lambda t, r: (["--config", TINY, "--train.name=.."], "plain directory name"),
    "run_name_is_a_file": lambda t, r: (["--config", TINY, "--train.name=" + Path(_write(r.parent, "f", "x")).name],
                                        "is a file"),
    "run_dir_is_a_file": lambda t, r: (["--config", TINY, f"--train.run_dir={_write(t, 'rd', 'x')}"], "is a file"),
    "disk_full_in_zip_writer": lambda t, r: (["--config", TINY, "--trainer.max_steps=4", "--ckpt_path=last"],
                                             "is intact — free space and resume with --ckpt_path last"),
    "one_huge_line": lambda t, r: (["--config", TINY,
                                    f"--data.sources=[{{kind: text, path: {_write(t, 'h.txt', 'ab ' * 7000)}}}]"],
                                   "longer than 16384 bytes"),
    "disk_full_checkpoint": lambda t, r: (["--config", TINY, "--trainer.max_steps=4", "--ckpt_path=last"],
                                          "disk full while writing checkpoint"),
    "disk_full_export": lambda t, r: (["--config", TINY, "--ckpt_path=last"], "disk full while writing the export"),
}  # fmt: skip


def _corrupt(tmp: Path, run: Path) -> str:
    data = bytearray((run / "checkpoints/last.ckpt").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2000] = bytes(2000)  # zero a stretch of tensor bytes
    return _write(tmp, "c.ckpt", bytes(data))


@pytest.mark.parametrize("case", list(CASES))
def test_train_bad_input_is_one_clear_error(case, base, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "good"
    shutil.copytree(base / "good", run)
    ckpt, export = run / "checkpoints" / "last.ckpt", run / "export" / "model.safetensors"
    before = {p: _sha(p) for p in (ckpt, export, run / "config.yaml", run / "tokenizer" / "tokenizer.model",
                                   run / "summary.yaml")}  # fmt: skip
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(base / "cache"))
    if case == "disk_full_checkpoint":
        monkeypatch.setattr(torch, "save", _disk_full)
    if case == "disk_full_export":
        monkeypatch.setattr("memlm.export.save_model", lambda model, path: _disk_full(None, open(path, "wb")))
    if case == "disk_full_in_zip_writer":  # the real torch.save; its zip writer turns the ENOSPC into a RuntimeError
        monkeypatch.setenv("MEMLM_FAULT", "enospc_in_save@4")
    argv, needle = CASES[case](tmp_path, run)
    resume = any(a.startswith("--ckpt_path") for a in argv)
    name = "good" if resume else "fresh"  # a fresh run into the good run's directory is refused (its own case)
    capsys.readouterr()
    code = main([*FAST[1:], f"--train.run_dir={tmp_path / 'runs'}", f"--train.name={name}", *argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and needle in errors[0], err[-3000:]
    assert "Traceback" not in err
    # nothing half-written: no temp files anywhere, the last checkpoint and the export untouched
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name], list(tmp_path.rglob("*.tmp-*"))
    if case.startswith("disk_full"):  # the resumed run's config.yaml is its own (more steps)
        before.pop(run / "config.yaml")
    if case == "disk_full_export":  # the resumed run trained 4 more steps: its checkpoint moved on, the export not
        before.pop(ckpt)
    assert {p: _sha(p) for p in before} == before
    assert not (tmp_path / "runs" / "fresh").exists(), "a failed fresh run leaves no directory behind"


def test_eval_export_with_a_tokenizer_of_another_vocabulary(base, tmp_path, capsys):
    bad = tmp_path / "export"
    shutil.copytree(base / "good" / "export", bad)
    shutil.rmtree(bad / "tokenizer")
    shutil.copytree(base / "tok384", bad / "tokenizer")
    assert run_main(["--ckpt", str(bad), "--tasks", "triviaqa", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "384 tokens" in err and "vocab_size is 512" in err, err
    # the same through --tokenizer on a good export
    assert run_main(["--ckpt", str(base / "good" / "export"), "--tokenizer", str(base / "tok384"), "--tasks",
                     "triviaqa", "--limit", "1"]) == 2  # fmt: skip
    assert "384 tokens" in capsys.readouterr().err
