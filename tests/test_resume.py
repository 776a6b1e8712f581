"""Resuming and recovering: ``--ckpt_path last``, limits reached, schedule changes, kill -9 and SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from spec_lightning import GLUEDataModule, LoRA, SequenceClassificationModule
from spec_lightning.cli import build_cli
from tests.conftest import composed_args

#: Tiny models fitted a few steps answer one class; the warning that says so is asserted in
#: tests/test_regression.py, and is expected, not checked, here.
pytestmark = pytest.mark.filterwarnings("ignore:the run ended predicting:UserWarning")

EPOCHS, BATCHES = 12, 12  # 144 optimiser steps of the tiny model: long enough to stop it midway


def cli_args(tiny_bert: str, sst2_dir: str, root: Path, epochs: int = EPOCHS) -> list[str]:
    return [
        *composed_args(tiny_bert, sst2_dir),
        "--data.init_args.batch_size=8",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.limit_train_batches={BATCHES}",
        "--trainer.limit_val_batches=0",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
    ]


def trainer(root: Path, **kwargs: object) -> L.Trainer:
    callback = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    options = {"limit_train_batches": 3, "limit_val_batches": 1, "max_epochs": 1, **kwargs}
    return L.Trainer(
        accelerator="cpu",
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        callbacks=[callback],
        **options,  # type: ignore[arg-type]
    )


def test_a_resume_that_trains_nothing_says_so_and_higher_limits_train_on(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    trainer(tmp_path, max_steps=3).fit(SequenceClassificationModule(tiny_bert, LoRA(r=4)), data)
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    same_limits = trainer(tmp_path, max_steps=6)
    with pytest.warns(UserWarning, match=r"trains nothing: it already reached max_epochs=1"):
        same_limits.fit(SequenceClassificationModule(tiny_bert, LoRA(r=4)), data, ckpt_path=ckpt)
    assert same_limits.global_step == 3
    longer = trainer(tmp_path, max_steps=6, max_epochs=2)
    with pytest.warns(
        UserWarning, match=r"schedule of .* was planned for 3 optimiser steps, this run plans 6"
    ):
        longer.fit(SequenceClassificationModule(tiny_bert, LoRA(r=4)), data, ckpt_path=ckpt)
    assert longer.global_step == 6


def test_ckpt_path_last_resumes_the_newest_run_of_the_name(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    args = cli_args(tiny_bert, sst2_dir, tmp_path, epochs=1)
    with pytest.raises(
        FileNotFoundError, match=r"--ckpt_path last: no last.ckpt of this run under .*nothing to resume"
    ):
        build_cli(["fit", *args, "--ckpt_path=last"])
    first = build_cli(["fit", *args])
    assert first.trainer.global_step == BATCHES
    longer = cli_args(tiny_bert, sst2_dir, tmp_path, epochs=2)
    with pytest.warns(
        UserWarning, match=f"planned for {BATCHES} optimiser steps, this run plans {2 * BATCHES}"
    ):
        resumed = build_cli(["fit", *longer, "--ckpt_path=last"])
    assert Path(resumed.trainer.ckpt_path) == Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert resumed.trainer.log_dir == first.trainer.log_dir  # the same run folder, not a new version
    assert resumed.trainer.global_step == 2 * BATCHES


def test_runs_without_a_logger_get_folders_of_their_own(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one process in the same second (the clock frozen) still get two folders."""
    monkeypatch.setattr("spec_lightning.io.runs.time.strftime", lambda _: "20260101-000000")
    args = [*cli_args(tiny_bert, sst2_dir, tmp_path, epochs=1), "--trainer.logger=false"]
    args += [f"--trainer.default_root_dir={tmp_path / 'root'}"]
    first, second = build_cli(["fit", *args]), build_cli(["fit", *args])
    assert first.trainer.default_root_dir != second.trainer.default_root_dir
    for run in (first, second):
        assert (Path(run.trainer.default_root_dir) / "checkpoints" / "last.ckpt").is_file()
    resumed = build_cli(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.default_root_dir == second.trainer.default_root_dir


def start_fit(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "spec_lightning", "fit", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_checkpoint(process: subprocess.Popen[bytes], folder: Path) -> int:
    """Poll until the run has written a last.ckpt past its first epoch; its global step."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = sorted(folder.glob("*/checkpoints/last.ckpt"))
        if found:
            step = int(torch.load(found[0], weights_only=True)["global_step"])
            if step >= 2 * BATCHES:
                return step
        assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
        time.sleep(0.02)
    raise TimeoutError("no checkpoint within 240 s")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_stopped_fit_continues_with_ckpt_path_last(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, stop: signal.Signals
) -> None:
    args = cli_args(tiny_bert, sst2_dir, tmp_path)
    process = start_fit(args, tmp_path)
    saved = wait_for_checkpoint(process, tmp_path / "logs" / "run")
    process.send_signal(stop)
    process.wait(timeout=120)
    checkpoint = tmp_path / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    if stop == signal.SIGTERM:  # a checkpoint at the step it stopped, and a failure status
        assert process.returncode == 128 + signal.SIGTERM, process.stderr.read().decode()[-2000:]
    else:
        assert process.returncode == -signal.SIGKILL
    at_stop = int(torch.load(checkpoint, weights_only=True)["global_step"])
    assert saved <= at_stop < EPOCHS * BATCHES
    resumed = subprocess.run(
        [sys.executable, "-m", "spec_lightning", "fit", *args, "--ckpt_path=last"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Restoring states from the checkpoint path at {checkpoint}" in resumed.stderr + resumed.stdout
    assert sorted(p.name for p in (tmp_path / "logs" / "run").iterdir()) == ["version_0"]
    assert int(torch.load(checkpoint, weights_only=True)["global_step"]) == EPOCHS * BATCHES


def test_a_run_that_fails_before_a_checkpoint_says_so(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "train.tsv").write_text("sentence\tlabel\ngood\t7\n")
    (tmp_path / "glue" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with (
        pytest.warns(UserWarning, match=r"the failed run leaves .*version_0 without a checkpoint"),
        pytest.raises(ValueError, match=r"train.tsv, line 2: label '7'"),
    ):
        build_cli(["fit", *cli_args(tiny_bert, str(tmp_path / "glue"), tmp_path, epochs=1)])
    diverging = [*cli_args(tiny_bert, sst2_dir, tmp_path, epochs=1), "--model.init_args.learning_rate=1e30"]
    with (
        pytest.warns(UserWarning, match=r"the failed run leaves .*version_1 without a checkpoint"),
        pytest.raises(FloatingPointError, match="lower model.init_args.learning_rate"),
    ):
        build_cli(["fit", *diverging])


class StopAtStep(L.Callback):
    """SIGTERM as Lightning raises it, at one step of the first epoch (before any epoch checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()


def test_a_first_epoch_interruption_resumes_into_last_ckpt_not_last_v1(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    """The checkpoint PreemptionCheckpoint writes records that the ModelCheckpoint wrote it, so the resumed
    run overwrites last.ckpt (it used to write last-v1.ckpt and leave the stale last.ckpt for the next
    --ckpt_path last)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from spec_lightning.callbacks.preemption import PreemptionCheckpoint

    def run(*extra: L.Callback, ckpt_path: str | None = None) -> L.Trainer:
        L.seed_everything(0)
        fit = trainer(tmp_path, limit_train_batches=6, max_epochs=2)
        fit.callbacks.extend([PreemptionCheckpoint(), *extra])
        module = SequenceClassificationModule(tiny_bert, LoRA(r=4))
        fit.fit(
            module,
            GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8),
            ckpt_path=ckpt_path,
        )
        return fit

    with pytest.raises(SIGTERMException):
        run(StopAtStep(2))
    last = tmp_path / "ckpt" / "last.ckpt"
    assert int(torch.load(last, weights_only=True)["global_step"]) == 2
    run(ckpt_path=str(last))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    assert int(torch.load(last, weights_only=True)["global_step"]) == 12


def test_two_fresh_fits_into_one_folder_are_refused(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    """The same name and a fixed version: the second fit is refused (two started together used to mix
    their event files, checkpoints and config.yaml in one folder); resuming it is allowed."""
    args = [*cli_args(tiny_bert, sst2_dir, tmp_path, epochs=1), "--trainer.logger.init_args.version=0"]
    args.append("--trainer.max_steps=2")
    build_cli(["fit", *args])
    folder = tmp_path / "logs" / "run" / "version_0"
    assert (folder / ".spec-lightning-run").is_file() and (folder / "config.yaml").is_file()
    with pytest.raises(FileExistsError, match=r"version_0 already holds another run .* version"):
        build_cli(["fit", *args])
    build_cli(["fit", *args[:-1], "--trainer.max_steps=3", "--ckpt_path=last"])  # resuming continues there
    assert sorted(p.name for p in (tmp_path / "logs" / "run").iterdir()) == ["version_0"]


def test_validate_without_a_logger_writes_no_config_into_the_working_folder(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [*composed_args(tiny_bert, sst2_dir), "--trainer.logger=false", "--trainer.limit_val_batches=1"]
    build_cli(["validate", *args])
    assert not (tmp_path / "config.yaml").exists()
    assert not list(tmp_path.rglob("config.yaml"))


def test_a_checkpoint_file_of_another_method_is_refused_not_run(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    """LightningCLI used to replace the config's model with the checkpoint's hyper-parameters: a DoRA
    config given a LoRA checkpoint file trained LoRA and exited 0. The config decides, and the run-facts
    check refuses the other method's checkpoint, as through --ckpt_path last."""
    args = [*cli_args(tiny_bert, sst2_dir, tmp_path, epochs=1), "--trainer.max_steps=2"]
    build_cli(["fit", *args])
    checkpoint = tmp_path / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    dora = [
        *composed_args(tiny_bert, sst2_dir, "dora"),
        f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}",
    ]
    with pytest.raises(
        ValueError, match=r"written by another run: method: checkpoint .*LoRA.*this run .*DoRA"
    ):
        build_cli(["fit", *dora, "--trainer.max_steps=3", f"--ckpt_path={checkpoint}"])


class Rates(L.Callback):
    """The learning rates and schedule base rates at the first batch the fit trains."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if not hasattr(self, "lr"):
            self.lr = [g["lr"] for g in trainer.optimizers[0].param_groups]
            self.base = list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)  # type: ignore[attr-defined]
            self.decay = [g["weight_decay"] for g in trainer.optimizers[0].param_groups]


def test_a_resume_with_a_changed_learning_rate_uses_it_and_says_so(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning restores the optimiser's and schedule's states after the module is built, which used to
    put the checkpoint's rate back silently; the new rate scales the restored schedule."""
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    trainer(tmp_path, max_epochs=2).fit(
        SequenceClassificationModule(tiny_bert, LoRA(r=4), learning_rate=1e-3), data
    )
    first = Rates()
    same = trainer(tmp_path / "same", max_epochs=3)
    same.callbacks.append(first)
    same.fit(
        SequenceClassificationModule(tiny_bert, LoRA(r=4), learning_rate=1e-3),
        data,
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    changed = Rates()
    resumed = trainer(tmp_path / "changed", max_epochs=3)
    resumed.callbacks.append(changed)
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4), learning_rate=4e-3, weight_decay=0.1)
    with caplog.at_level("INFO"):
        resumed.fit(module, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert changed.base == pytest.approx([4 * b for b in first.base])
    assert changed.lr == pytest.approx([4 * r for r in first.lr])
    assert changed.decay == [0.1, 0.0]  # matrices, then biases and norms
    assert "with this run's learning_rate 0.004 (the checkpoint's: 0.001), weight_decay 0.1" in caplog.text
