"""``--trainer.strategy=fsdp`` with 2 CPU processes (gloo, ``memlm.training.fsdp``): the loss curve equals one process
on the same global batch, the full-state checkpoint resumes at world size 1 and continues identically, and the
export (gathered from the shards) holds the weights the one-process run ends with."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import assert_same_curve, run_train  # noqa: E402

T = 1800  # seconds per train.py run: generous, the CI box may be shared


def test_fsdp_two_processes_match_one_and_resume_at_one(tmp_path):
    import memlm

    common = ["--data.shuffle=false", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=1",
              "--trainer.accelerator=cpu", "--train.checkpoint_every=10", f"--train.run_dir={tmp_path}"]  # fmt: skip
    single = run_train(*common, "--train.name=single", "--train.batch_size=4", "--trainer.max_steps=10",
                       cache=tmp_path / "cache", timeout=T)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    fsdp = run_train(*common, "--train.name=fsdp", "--train.batch_size=2", "--trainer.max_steps=10",
                     "--trainer.devices=2", "--trainer.strategy=fsdp", cache=tmp_path / "cache", timeout=T)  # fmt: skip
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "trainable held by rank 0 (sharded)" in fsdp.stdout
    assert_same_curve(tmp_path / "single", tmp_path / "fsdp", range(1, 11))
    # the export was gathered from both ranks' shards: the weights of the one-process run
    m1, _ = memlm.load_pretrained(tmp_path / "single" / "export")
    m2, _ = memlm.load_pretrained(tmp_path / "fsdp" / "export")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-5), k
    # the full-state checkpoint (weights and Adam moments) resumes with one process, as the one-process run does
    for name in ("single", "fsdp"):
        r = run_train(*common, f"--train.name={name}", "--train.batch_size=4", "--trainer.max_steps=14",
                      "--ckpt_path=last", "--train.export=false", cache=tmp_path / "cache", timeout=T)  # fmt: skip
        assert r.returncode == 0, (name, r.stderr[-3000:])
    assert_same_curve(tmp_path / "single", tmp_path / "fsdp", range(1, 15))
