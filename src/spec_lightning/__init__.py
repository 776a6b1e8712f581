"""spec_lightning: spectral fine-tuning of pretrained language models with PyTorch Lightning."""

from spec_lightning.callbacks import (
    DynamicSpectralClustering,
    ModuleSearch,
    PreemptionCheckpoint,
    SpectralGradientFilter,
    SpectralImportance,
    SpectrumMonitor,
)
from spec_lightning.data import (
    GLUEDataModule,
    InstructionDataModule,
    LanguageModelingDataModule,
    MMLUDataModule,
)
from spec_lightning.methods import (
    AdaLoRA,
    BitFit,
    DoRA,
    FineTuningMethod,
    FullFineTuning,
    GraphSpectral,
    HoulsbyAdapter,
    LoRA,
    LoRSA,
    PiSSA,
    SpecLoRA,
)
from spec_lightning.modules import CausalLMModule, FineTuningModule, SequenceClassificationModule
from spec_lightning.spectral import GraphConfig
from spec_lightning.spectral.blocks import BlockRule, bert_blocks

__version__ = "0.1.0"
__all__ = [
    "AdaLoRA",
    "BitFit",
    "BlockRule",
    "CausalLMModule",
    "DoRA",
    "DynamicSpectralClustering",
    "FineTuningMethod",
    "FineTuningModule",
    "FullFineTuning",
    "GraphSpectral",
    "GLUEDataModule",
    "GraphConfig",
    "HoulsbyAdapter",
    "InstructionDataModule",
    "LanguageModelingDataModule",
    "LoRA",
    "LoRSA",
    "MMLUDataModule",
    "ModuleSearch",
    "PiSSA",
    "PreemptionCheckpoint",
    "SpecLoRA",
    "SequenceClassificationModule",
    "SpectralGradientFilter",
    "SpectralImportance",
    "SpectrumMonitor",
    "bert_blocks",
]
