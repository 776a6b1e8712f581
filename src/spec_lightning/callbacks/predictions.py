"""Each validation example's prediction and label, kept for statistics over examples (a bootstrap over
dev examples and seeds needs them; a metric's mean does not)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from spec_lightning.callbacks.strategy import log_directory


class ValidationPredictions(L.Callback):
    """After every validation epoch (not the sanity check), write ``predictions.npz`` with the arrays
    ``predictions`` and ``labels`` in the validation loader's order to ``dirpath`` (default: the trainer's
    log directory), replacing the previous epoch's atomically: the file holds the last validation.

    Works with any LightningModule whose ``validation_step`` returns the batch's predictions (a tensor, or
    a dict with ``"predictions"``) and whose batches carry ``"labels"``. Where it cannot act it says so
    once and writes nothing: a module that returns no predictions, a second validation loader (only the
    first is kept), or several processes (the distributed sampler pads and interleaves the examples).

    Example::

        trainer = L.Trainer(callbacks=[ValidationPredictions()])

    Args:
        dirpath: the folder of ``predictions.npz``; None: the trainer's log directory.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._predictions: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._warned: set[str] = set()

    def _skip(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            rank_zero_warn(f"ValidationPredictions writes no predictions.npz: {reason}")

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predictions, self._labels = [], []

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or trainer.world_size > 1:
            return
        if dataloader_idx != 0:
            self._skip(f"validation loader {dataloader_idx} is not kept (only the first is)")
            return
        predictions = outputs.get("predictions") if isinstance(outputs, Mapping) else outputs
        if (
            not isinstance(predictions, torch.Tensor)
            or not isinstance(batch, Mapping)
            or "labels" not in batch
        ):
            self._skip(
                f"{type(pl_module).__name__}.validation_step returns no predictions tensor (or its batches "
                "carry no 'labels'); return the batch's predictions, or a dict with 'predictions'"
            )
            return
        self._predictions.append(predictions.detach().cpu().numpy())
        self._labels.append(batch["labels"].detach().cpu().numpy())

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.world_size > 1:
            self._skip(
                f"{trainer.world_size} processes share the validation set (padded and interleaved by the "
                "distributed sampler); run the validation on one device to keep each example's prediction"
            )
            return
        folder = Path(self.dirpath) if self.dirpath else log_directory(trainer)
        if not self._predictions:
            return
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / "predictions.tmp.npz"
        np.savez_compressed(
            staging, predictions=np.concatenate(self._predictions), labels=np.concatenate(self._labels)
        )
        staging.replace(folder / "predictions.npz")
