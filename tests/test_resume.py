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
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
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
