"""LightningModules per task family; each takes the fine-tuning method as an argument."""

from spec_lightning.modules.base import FineTuningModule
from spec_lightning.modules.causal_lm import CausalLMModule
from spec_lightning.modules.sequence_classification import SequenceClassificationModule

__all__ = ["CausalLMModule", "FineTuningModule", "SequenceClassificationModule"]
