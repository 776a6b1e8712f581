"""spec_lightning: spectral fine-tuning of pretrained language models with PyTorch Lightning."""

from typing import TYPE_CHECKING

from spec_lightning._lazy import lazy_exports
from spec_lightning._version import __version__ as __version__

_EXPORTS = {
    "AdaLoRA": "spec_lightning.methods",
    "ApplyMethod": "spec_lightning.callbacks",
    "AtomicCheckpointIO": "spec_lightning.io.checkpoints",
    "BitFit": "spec_lightning.methods",
    "BlockRule": "spec_lightning.spectral.blocks",
    "CausalLMModule": "spec_lightning.modules",
    "DoRA": "spec_lightning.methods",
    "DynamicSpectralClustering": "spec_lightning.callbacks",
    "FineTuningMethod": "spec_lightning.methods",
    "FineTuningModule": "spec_lightning.modules",
    "FullFineTuning": "spec_lightning.methods",
    "GLUEDataModule": "spec_lightning.data",
    "GraphConfig": "spec_lightning.spectral.graph",
    "GraphSpectral": "spec_lightning.methods",
    "HoulsbyAdapter": "spec_lightning.methods",
    "InstructionDataModule": "spec_lightning.data",
    "LanguageModelingDataModule": "spec_lightning.data",
    "LoRA": "spec_lightning.methods",
    "LoRSA": "spec_lightning.methods",
    "MMLUDataModule": "spec_lightning.data",
    "ModuleSearch": "spec_lightning.callbacks",
    "PeftTuner": "spec_lightning.methods",
    "PiSSA": "spec_lightning.methods",
    "PreemptionCheckpoint": "spec_lightning.callbacks",
    "SequenceClassificationModule": "spec_lightning.modules",
    "SpecLoRA": "spec_lightning.methods",
    "SpectralGradientFilter": "spec_lightning.callbacks",
    "SpectralImportance": "spec_lightning.callbacks",
    "SpectrumMonitor": "spec_lightning.callbacks",
    "ValidationPredictions": "spec_lightning.callbacks",
    "bert_blocks": "spec_lightning.spectral.blocks",
    "default_blocks": "spec_lightning.spectral.blocks",
    "llama_blocks": "spec_lightning.spectral.blocks",
    "load_adapter": "spec_lightning.io.adapters",
    "load_slices": "spec_lightning.spectral.blocks",
    "resolve_pretrained": "spec_lightning.io.pretrained",
}
__all__ = [
    "AdaLoRA",
    "ApplyMethod",
    "AtomicCheckpointIO",
    "BitFit",
    "BlockRule",
    "CausalLMModule",
    "DoRA",
    "DynamicSpectralClustering",
    "FineTuningMethod",
    "FineTuningModule",
    "FullFineTuning",
    "GLUEDataModule",
    "GraphConfig",
    "GraphSpectral",
    "HoulsbyAdapter",
    "InstructionDataModule",
    "LanguageModelingDataModule",
    "LoRA",
    "LoRSA",
    "MMLUDataModule",
    "ModuleSearch",
    "PeftTuner",
    "PiSSA",
    "PreemptionCheckpoint",
    "SequenceClassificationModule",
    "SpecLoRA",
    "SpectralGradientFilter",
    "SpectralImportance",
    "SpectrumMonitor",
    "ValidationPredictions",
    "bert_blocks",
    "default_blocks",
    "llama_blocks",
    "load_adapter",
    "load_slices",
    "resolve_pretrained",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from spec_lightning.callbacks import (
        ApplyMethod,
        DynamicSpectralClustering,
        ModuleSearch,
        PreemptionCheckpoint,
        SpectralGradientFilter,
        SpectralImportance,
        SpectrumMonitor,
        ValidationPredictions,
    )
    from spec_lightning.data import (
        GLUEDataModule,
        InstructionDataModule,
        LanguageModelingDataModule,
        MMLUDataModule,
    )
    from spec_lightning.io.adapters import load_adapter
    from spec_lightning.io.checkpoints import AtomicCheckpointIO
    from spec_lightning.io.pretrained import resolve_pretrained
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
        PeftTuner,
        PiSSA,
        SpecLoRA,
    )
    from spec_lightning.modules import CausalLMModule, FineTuningModule, SequenceClassificationModule
    from spec_lightning.spectral.blocks import (
        BlockRule,
        bert_blocks,
        default_blocks,
        llama_blocks,
        load_slices,
    )
    from spec_lightning.spectral.graph import GraphConfig
