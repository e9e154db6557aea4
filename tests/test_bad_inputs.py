"""Inputs users get wrong: each is one clear ``error: ...`` line and exit code 2 (train.py / eval/run.py entry points,
called in-process), no traceback, and nothing half-written left behind (no temp files, checkpoints and exports at
their final paths unchanged). One tiny trained run (2 steps) is shared by every case."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

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


# ---------------------------------------------------------------------------------------------- issue 17


def _one_error(err: str, needle: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err[-3000:]
    return errors[0]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def readonly():
    """Make a directory read-only: chmod for a normal user; root ignores modes, so ``chattr +i`` (skip without it)."""
    made: list[Path] = []

    def make(p: Path) -> Path:
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode != 0:
                pytest.skip("cannot make a directory read-only here (root, no chattr)")
        else:
            os.chmod(p, 0o555)
        made.append(p)
        return p

    yield make
    for p in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        else:
            os.chmod(p, 0o755)


def _runs(base: Path, tmp: Path) -> Path:
    """A private copy of the good run under ``tmp/runs``; returns the run dir."""
    run = tmp / "runs" / "good"
    shutil.copytree(base / "good", run)
    return run


def test_a_locked_run_dir_is_refused(base, tmp_path, monkeypatch, capsys):
    """Issue 17.2: a run that owns its directory holds a lock; a second run with the name (here resuming) is refused
    before it writes anything, and a resumed run never writes last-v1.ckpt beside last.ckpt."""
    import sys
    import threading

    run = _runs(base, tmp_path)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(base / "cache"))
    before = _tree(run)
    hold = (
        "import sys; from memlm.utils.rundir import RunDir; RunDir.claim(sys.argv[1], resume=True, what='run', "
        "hint=''); print('locked', flush=True); sys.stdin.read()"
    )  # another job running in this directory
    other = subprocess.Popen([sys.executable, "-c", hold, str(run)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(180, other.kill)  # never hang the suite, whatever happens to the holder
    watchdog.start()
    try:
        assert other.stdout.readline().strip() == "locked"
        code = main(["--config", TINY, *FAST[1:], f"--train.run_dir={run.parent}", "--train.name=good",
                     "--ckpt_path=last"])  # fmt: skip
    finally:
        other.stdin.close()  # the holder exits, and its lock with it
        other.wait(timeout=60)
        watchdog.cancel()
    assert code == 2
    _one_error(capsys.readouterr().err, "in use by another running job (pid")
    assert _tree(run) == before
    # unlocked, the resume goes on (2 more steps) and keeps one last.ckpt
    assert main(["--config", TINY, *FAST[1:], f"--train.run_dir={run.parent}", "--train.name=good",
                 "--ckpt_path=last", "--train.export=false", "--trainer.max_steps=4"]) == 0  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4


def test_resume_after_the_tokenizer_cache_is_rebuilt(base, tmp_path, monkeypatch, capsys):
    """Issue 17.5: identical settings retrain a byte-identical tokenizer, so a resume after the cache was wiped is
    accepted. Issue 17.10: temp files a killed run left in the run dir are removed; a finished run resumed keeps its
    summary.yaml."""
    from memlm.data.tokenizer import Tokenizer

    run = _runs(base, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(base / "cache", cache)
    shutil.rmtree(cache / "tokenizers")
    text = (ROOT / "tests/fixtures/train/corpus.txt").read_text(encoding="utf-8").splitlines()
    a, b = (Tokenizer.train(text, 384, cache_dir=tmp_path / f"c{i}") for i in (1, 2))
    assert a.proto == b.proto and a.hash == b.hash  # deterministic byte for byte
    (run / ".train_losses.json.tmp-k1ll3d").write_text("{")  # what a SIGKILL while writing leaves
    (run / ".export.tmp-k1ll3d").mkdir()
    (run / ".export.tmp-k1ll3d" / "model.safetensors").write_bytes(b"\0" * 10)
    summary = (run / "summary.yaml").read_bytes()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(cache))
    args = ["--config", TINY, *FAST, f"--train.run_dir={run.parent}", "--train.name=good", "--ckpt_path=last"]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    assert "already finished at step 2" in capsys.readouterr().out
    assert (run / "summary.yaml").read_bytes() == summary  # not train_loss .nan, tokens_per_s 0.0
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def test_export_files_are_readable_by_others(base):
    """Issue 17.10: exports get the modes the umask gives any new file (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in (base / "good" / "export").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


def test_read_only_and_misplaced_outputs_are_one_line(base, tmp_path, monkeypatch, capsys, readonly):
    """Issue 17.7: a read-only run dir, parent dir, export dir or MEMLM_CACHE is one error line, exit 2."""
    run = _runs(base, tmp_path)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(base / "cache"))
    common = ["--config", TINY, *FAST[1:], "--trainer.max_steps=3"]
    # resuming into a read-only run dir
    readonly(run)
    assert main([*common, f"--train.run_dir={run.parent}", "--train.name=good", "--ckpt_path=last"]) == 2
    _one_error(capsys.readouterr().err, "is not writable")
    # a fresh run whose parent directory is read-only
    (tmp_path / "ro_parent").mkdir()
    ro_parent = readonly(tmp_path / "ro_parent")
    assert main([*common, f"--train.run_dir={ro_parent}", "--train.name=x"]) == 2
    _one_error(capsys.readouterr().err, "not writable")
    # the export dir is read-only: training goes on, the export is one line naming it
    run2 = tmp_path / "runs2" / "good"
    shutil.copytree(base / "good", run2)
    readonly(run2 / "export")
    before = _tree(run2 / "export")
    assert main([*common, f"--train.run_dir={run2.parent}", "--train.name=good", "--ckpt_path=last"]) == 2
    _one_error(capsys.readouterr().err, "export")
    assert _tree(run2 / "export") == before
    # an unwritable MEMLM_CACHE
    monkeypatch.setenv("MEMLM_CACHE", str(ro_parent / "cache"))
    assert main([*common, f"--train.run_dir={tmp_path / 'runs3'}", "--train.name=y"]) == 2
    _one_error(capsys.readouterr().err, "MEMLM_CACHE")
    assert not (tmp_path / "runs3").exists()


def _facts(tmp: Path) -> Path:
    from memlm.data.qa import parse_topics

    rows, _ = parse_topics(ROOT / "tests/fixtures/triviaqa_validation_sample.txt", "tqa")
    facts = tmp / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return facts


def test_continual_never_deletes_an_existing_out_dir(base, tmp_path, monkeypatch, capsys):
    """Issue 17.1: ``--out_dir=runs --name=<the pretraining run>`` and ``--name=..`` are refused (the run being
    finetuned and its siblings survive); a finished continual run of the same config is reused, not redone."""
    from memlm.config import load_finetune_config, to_dict
    from memlm.continual.script import main as continual

    run = _runs(base, tmp_path)
    (tmp_path / "runs" / "sibling").mkdir()
    (tmp_path / "runs" / "sibling" / "keep.txt").write_text("x")
    before = _tree(tmp_path / "runs")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(base / "cache"))
    over = [f"--stream.dataset={_facts(tmp_path)}", "--stream.stages=1", "--stream.facts_per_stage=2",
            "--eval.heldin_limit=2", "--eval.ppl_docs=2", f"--out_dir={run.parent}"]  # fmt: skip
    common = ["--ckpt", str(run / "export"), "--config", "configs/finetune/full.yaml", "--quiet", *over]
    for name, needle in (("good", "already exists"), ("..", "plain directory name")):
        capsys.readouterr()
        assert continual([*common, f"--name={name}"]) == 2
        _one_error(capsys.readouterr().err, needle)
        assert _tree(tmp_path / "runs") == before
    # a finished run of this very config: reused (nothing recomputed, nothing rewritten)
    cfg = load_finetune_config(["configs/finetune/full.yaml"], [*over, "--name=done"])
    done = run.parent / "done"
    done.mkdir()
    (done / "config.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "ckpt": str(run / "export")}, sort_keys=False))
    (done / "summary.json").write_text(json.dumps({"out_dir": str(done), "stages": []}))
    snapshot = _tree(done)
    assert continual([*common, "--name=done"]) == 0
    assert "its results are reused" in capsys.readouterr().out and _tree(done) == snapshot


def test_eval_checks_its_inputs_and_outputs_before_the_work(base, tmp_path, monkeypatch, capsys, readonly):
    """Issue 17.7 / 17.8: an --out that is a directory, exists or is unwritable, and --limit -1 / 0, fail at once in
    one line (the evaluation never starts); an export whose config.yaml disagrees with its weights names the tensor
    and the config key."""
    import memlm.evaluation.cli as cli

    def no_work(*a, **k):
        raise AssertionError("the evaluation ran before its outputs were checked")

    monkeypatch.setattr(cli, "evaluate", no_work)
    export = str(base / "good" / "export")
    task = str(ROOT / "tests/fixtures/eval/task_local.yaml")
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "ro").mkdir()
    readonly(tmp_path / "ro")
    for extra, needle in ((["--out", str(tmp_path)], "is a directory"),
                          (["--out", str(tmp_path / "exists.json")], "already exists"),
                          (["--out", str(tmp_path / "ro" / "r.json")], "not writable"),
                          (["--limit", "-1"], "--limit must be a positive"),
                          (["--limit", "0"], "--limit must be")):  # fmt: skip
        capsys.readouterr()
        assert run_main(["--ckpt", export, "--tasks", task, *extra]) == 2, extra
        _one_error(capsys.readouterr().err, needle)
    assert (tmp_path / "exists.json").read_text() == "{}"
    # config.yaml of another width beside the weights
    bad = tmp_path / "bad_export"
    shutil.copytree(export, bad)
    raw = yaml.safe_load((bad / "config.yaml").read_text())
    raw["model"]["dim"] = 48
    (bad / "config.yaml").write_text(yaml.safe_dump(raw))
    assert run_main(["--ckpt", str(bad), "--tasks", task]) == 2
    line = _one_error(capsys.readouterr().err, "does not match model.safetensors")
    assert "tensor " in line and "model.dim = 48" in line and "corrupted" not in line, line


def test_forgetting_refuses_other_example_sets_and_reads_stage_files(base, tmp_path, capsys):
    """Issue 17.9: results scored with another --limit are refused (no made-up drop). Issue 17.7: a continual
    stage_<k>.json is read as results (was a KeyError); a file that is not results is one line."""
    from memlm.evaluation.cli import forgetting_main

    export = str(base / "good" / "export")
    task = str(ROOT / "tests/fixtures/eval/task_local.yaml")
    for n in (2, 3):
        out = str(tmp_path / f"r{n}.json")
        assert run_main(["--ckpt", export, "--tasks", task, "--limit", str(n), "--out", out]) == 0
    capsys.readouterr()
    args = ["--base", str(tmp_path / "r2.json"), "--tasks", task]
    assert forgetting_main([*args, "--after", str(tmp_path / "r3.json"), "--out", str(tmp_path / "f1")]) == 2
    _one_error(capsys.readouterr().err, "different examples (n: 3 vs 2; --limit 3 vs 2)")
    stage = tmp_path / "stage_2.json"
    stage.write_text(
        json.dumps({"stage": 2, "learning": {}, "results": json.loads((tmp_path / "r2.json").read_text())})
    )
    assert forgetting_main([*args, "--after", str(stage), "--out", str(tmp_path / "f2")]) == 0
    assert (tmp_path / "f2" / "forgetting.json").is_file()
    # its outputs are never overwritten
    assert forgetting_main([*args, "--after", str(stage), "--out", str(tmp_path / "f2")]) == 2
    _one_error(capsys.readouterr().err, "already exists")
    (tmp_path / "x.json").write_text(json.dumps({"stage": 2}))
    assert forgetting_main([*args, "--after", str(tmp_path / "x.json"), "--out", str(tmp_path / "f3")]) == 2
    _one_error(capsys.readouterr().err, "is not a results JSON")


def test_smf_background_falls_back_when_the_checkpoint_dir_is_read_only(base, tmp_path, monkeypatch, capsys, readonly):
    """Issue 17.7 / 17.10: SMF's background statistics beside a read-only export go to the cache (with a note)
    instead of a traceback after the counting; its temp file follows the cleanup's naming."""
    import memlm
    from memlm.config import load_finetune_config
    from memlm.continual import background as bg
    from memlm.export import read_export_config

    export = tmp_path / "export"
    shutil.copytree(base / "good" / "export", export)
    readonly(export)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    shutil.copytree(base / "cache", tmp_path / "cache")
    names = []
    real_save = torch.save

    def save(obj, f):  # the name of the file torch.save writes into (the atomic writer's temp file)
        names.append(Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name)
        return real_save(obj, f)

    monkeypatch.setattr(bg.torch, "save", save)
    model, tok = memlm.load_pretrained(export)
    over = {"method": "sparse_memory", "smf": {"background_batches": 2, "background_batch_size": 2}}
    smf = load_finetune_config(overrides=over).smf
    stats, path, new = bg.load_or_compute(model, tok, export, read_export_config(export), smf, progress=False)
    assert new and path.is_relative_to(tmp_path / "cache") and path.is_file()
    assert "cannot write SMF background statistics beside the checkpoint" in capsys.readouterr().err
    assert names and all(n.startswith(f".{path.name}.tmp-") for n in names), names  # ".<final name>.tmp-*"
    # a second run finds them there
    _, path2, new2 = bg.load_or_compute(model, tok, export, read_export_config(export), smf, progress=False)
    assert path2 == path and not new2


def test_failure_messages_offer_a_resume_only_when_a_checkpoint_exists(base, tmp_path, monkeypatch, capsys):
    """Issue 17.6: a disk that fills up at the first checkpoint (ENOSPC inside torch.save's zip writer), or a NaN
    before it, does not say "previous checkpoint intact / resume with --ckpt_path last"."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEMLM_CACHE", str(base / "cache"))
    common = ["--config", TINY, *FAST, f"--train.run_dir={tmp_path}", "--train.export=false"]
    monkeypatch.setenv("MEMLM_FAULT", "enospc_in_save@2")
    assert main([*common, "--train.name=full"]) == 2
    line = _one_error(capsys.readouterr().err, "disk full while writing checkpoint")
    assert "no checkpoint has been saved yet" in line and "--ckpt_path last" not in line, line
    monkeypatch.delenv("MEMLM_FAULT")
    assert main([*common, "--train.name=nan", "--optim.lr=1e30", "--train.checkpoint_every=5"]) == 2
    line = _one_error(capsys.readouterr().err, "non-finite")
    assert "no checkpoint has been saved yet" in line and "--ckpt_path last" not in line, line
