"""LightningModules per task family; each takes the fine-tuning method as an argument."""

from spec_lightning.modules.sequence_classification import SequenceClassificationModule

__all__ = ["SequenceClassificationModule"]
