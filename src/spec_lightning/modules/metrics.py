"""The standard GLUE metric of each task, as torchmetrics collections."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef, Precision, Recall
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef


def task_metrics(task: str, num_labels: int) -> MetricCollection:
    """Accuracy, precision and recall (of class 1; macro over classes for multi-class tasks), + F1 for
    MRPC/QQP, Matthews correlation for CoLA; Pearson/Spearman for STS-B."""
    if num_labels == 1:
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    kind = "binary" if num_labels == 2 else "multiclass"
    average = "binary" if num_labels == 2 else "macro"
    metrics = {
        "accuracy": Accuracy(task=kind, num_classes=num_labels),
        "precision": Precision(task=kind, num_classes=num_labels, average=average),
        "recall": Recall(task=kind, num_classes=num_labels, average=average),
    }
    if task in ("mrpc", "qqp"):
        metrics["f1"] = F1Score(task=kind, num_classes=num_labels)
    if task == "cola":
        metrics["matthews"] = MatthewsCorrCoef(task=kind, num_classes=num_labels)
    return MetricCollection(metrics)
