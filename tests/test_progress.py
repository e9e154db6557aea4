"""Training progress: plain lines off a terminal (step/max_steps, loss, tokens/s, ETA) and the run's progress.log."""

import logging

import lightning as L
import torch

from memlm.training.progress import TrainProgress, progress_callbacks, setup_console
from memlm.utils.progress import LoopProgress, fmt_duration, fmt_rate


class _Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x.float()), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, callbacks, **kw):
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, callbacks=callbacks,
                        default_root_dir=tmp_path, enable_model_summary=False, **kw)  # fmt: skip
    trainer.fit(_Toy(), torch.utils.data.DataLoader(data, batch_size=4))


def test_plain_lines_and_log_file(tmp_path, capsys):
    log = tmp_path / "run" / "progress.log"
    _fit(tmp_path, [TrainProgress(log, every_steps=3, every_s=1e9, terminal=False)])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split("|")[0].split()[1] for ln in lines] == ["3/7", "6/7"], out
    for field in ("loss ", "tok/s", "elapsed ", "ETA "):
        assert all(field in ln for ln in lines), (field, lines)
    assert "loss nan" not in out and "done: step 7/7" in out
    text = log.read_text()
    assert "step 3/7" in text and "step 6/7" in text and "done: step 7/7" in text


def test_gradient_accumulation_prints_each_step_once(tmp_path, capsys):
    _fit(tmp_path, [TrainProgress(None, every_steps=2, every_s=1e9, terminal=False)], accumulate_grad_batches=2)
    lines = [ln.split("|")[0].split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert lines == ["2/7", "4/7", "6/7"], lines


def test_progress_bar_disabled_writes_the_log_only(tmp_path, capsys):
    cbs = progress_callbacks(tmp_path, {"enable_progress_bar": False, "enable_model_summary": False}, every_steps=2)
    _fit(tmp_path, cbs, enable_progress_bar=False)
    assert "step " not in capsys.readouterr().out
    assert "step 6/7" in (tmp_path / "progress.log").read_text()


def test_loop_progress_and_formatting(caplog):
    setup_console()
    with caplog.at_level(logging.INFO, logger="memlm"), LoopProgress(10, "tokenizing", unit="doc", every_s=0) as p:
        p.update(4)
        p.update(6)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("tokenizing: 4/10 doc") and "ETA" in m for m in msgs), msgs
    assert fmt_duration(75) == "1m15s" and fmt_duration(4000) == "1h06m" and fmt_duration(float("nan")) == "?"
    assert fmt_rate(10_600) == "10.6k tok/s"
