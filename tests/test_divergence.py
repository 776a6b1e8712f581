"""Divergence: a learning rate far too high whose loss stays finite is named, with the right advice."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from spec_lightning import GLUEDataModule, SequenceClassificationModule
from spec_lightning.methods import FullFineTuning
from spec_lightning.modules.divergence import RISE, WINDOW, LossTrend


def trend(losses: list[float]) -> LossTrend:
    out = LossTrend()
    for value in losses:
        out.record(torch.tensor(value))
    return out


def test_the_start_and_window_by_hand() -> None:
    losses = [1.0] + [5.0] * 5 + [2.0] * 10  # the first step's 1, the last ten's mean 2
    assert trend(losses).means() == (1.0, 2.0)
    assert trend(losses).diverged() == (
        "the training loss rose from 1 (the first step's) to 2 (mean of the last 10 steps): the run diverged"
    )
    assert trend([1.0] + [RISE] * WINDOW).diverged() is None  # RISE is strict
    assert trend([1.0] + [1.51] * WINDOW).diverged() is not None
    assert trend([1.0] * WINDOW).means() is None  # the first step would be in the window
    assert trend([2.0] + [0.5] * 10).diverged() is None  # a falling loss
    assert trend([1.0] + [float("nan")] * 10).diverged() is None  # NaN is the finite check's
    message = trend([1.0] + [9.0] * 10).warning(0.003)
    assert (
        message is not None and "Lower model.init_args.learning_rate (now 0.003), e.g. to 0.0003" in message
    )
    assert trend([1.0] * 20).warning(0.003) is None


def test_a_finite_divergence_says_lower_the_rate_not_raise_it(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    """Full fine-tuning at a learning rate of 10: the loss stays finite and far above its start, every
    prediction is one class; the warnings say the run diverged and to lower the rate."""
    L.seed_everything(0)
    module = SequenceClassificationModule(tiny_bert, FullFineTuning(), learning_rate=10.0, warmup_ratio=0.0)
    trainer = L.Trainer(
        max_steps=24,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning) as record:
        trainer.fit(module, GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8))
    messages = [str(w.message) for w in record]
    diverged = [m for m in messages if "the run diverged" in m]
    assert diverged, messages
    assert all("Raise model.init_args.learning_rate" not in m for m in messages)
    assert any("lower model.init_args.learning_rate (now 10)" in m.lower() for m in diverged)
