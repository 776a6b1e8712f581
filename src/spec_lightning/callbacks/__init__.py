"""Callbacks that work on any LightningModule through the public hook API."""

from spec_lightning.callbacks.dynamic_spectral_clustering import DynamicSpectralClustering
from spec_lightning.callbacks.module_search import ModuleSearch, Probeable
from spec_lightning.callbacks.preemption import PreemptionCheckpoint
from spec_lightning.callbacks.spectral_gradient_filter import SpectralGradientFilter
from spec_lightning.callbacks.spectral_importance import SpectralComponents, SpectralImportance
from spec_lightning.callbacks.spectrum_monitor import SpectrumMonitor

__all__ = [
    "PreemptionCheckpoint",
    "DynamicSpectralClustering",
    "ModuleSearch",
    "Probeable",
    "SpectralComponents",
    "SpectralGradientFilter",
    "SpectralImportance",
    "SpectrumMonitor",
]
