"""The standard metric of each task: GLUE collections, and MMLU's per-subject accuracy."""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef, Precision, Recall
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.utilities import dim_zero_cat


def task_metrics(task: str, num_labels: int) -> MetricCollection:
    """Accuracy, precision and recall (of class 1; macro over classes for multi-class tasks), + F1 for
    MRPC/QQP, Matthews correlation for CoLA; Pearson/Spearman for STS-B."""
    if num_labels == 1:
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    kind: Literal["binary", "multiclass"] = "binary" if num_labels == 2 else "multiclass"
    average: Literal["macro"] = "macro"  # multi-class only: the binary metrics score class 1
    metrics: dict[str, Metric | MetricCollection] = {
        "accuracy": Accuracy(task=kind, num_classes=num_labels),
        "precision": Precision(task=kind, num_classes=num_labels, average=average),
        "recall": Recall(task=kind, num_classes=num_labels, average=average),
    }
    if task in ("mrpc", "qqp"):
        metrics["f1"] = F1Score(task=kind, num_classes=num_labels)
    if task == "cola":
        metrics["matthews"] = MatthewsCorrCoef(task=kind, num_classes=num_labels)
    return MetricCollection(metrics)


class GroupedAccuracy(Metric):
    """Accuracy per group, acc_g = Σ_{i∈g} 1(ŷ_i = y_i) / |g| (MMLU's per-subject accuracy).

    ``compute`` returns ``accuracy`` (over all examples), ``group_average`` (the mean of acc_g over the
    groups seen) and ``per_group`` (acc_g, NaN for groups not seen). States are concatenated across
    processes, so the groups need not be known in advance.
    """

    groups: list[torch.Tensor]
    hits: list[torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        self.groups.append(groups.long())
        self.hits.append((preds == target).float())

    def compute(self) -> dict[str, torch.Tensor]:
        groups, hits = dim_zero_cat(self.groups), dim_zero_cat(self.hits)
        count = torch.bincount(groups).float()
        per_group = torch.bincount(groups, weights=hits) / count
        return {"accuracy": hits.mean(), "group_average": per_group[count > 0].mean(), "per_group": per_group}
