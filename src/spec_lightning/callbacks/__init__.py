"""Callbacks that work on any LightningModule through the public hook API."""

from typing import TYPE_CHECKING

from spec_lightning._lazy import lazy_exports

_EXPORTS = {
    "ApplyMethod": "spec_lightning.callbacks.apply_method",
    "DynamicSpectralClustering": "spec_lightning.callbacks.dynamic_spectral_clustering",
    "ModuleSearch": "spec_lightning.callbacks.module_search",
    "PreemptionCheckpoint": "spec_lightning.callbacks.preemption",
    "Probeable": "spec_lightning.callbacks.probe",
    "SpectralComponents": "spec_lightning.callbacks.spectral_importance",
    "SpectralGradientFilter": "spec_lightning.callbacks.spectral_gradient_filter",
    "SpectralImportance": "spec_lightning.callbacks.spectral_importance",
    "SpectrumMonitor": "spec_lightning.callbacks.spectrum_monitor",
    "ValidationPredictions": "spec_lightning.callbacks.predictions",
}
__all__ = [
    "ApplyMethod",
    "DynamicSpectralClustering",
    "ModuleSearch",
    "PreemptionCheckpoint",
    "Probeable",
    "SpectralComponents",
    "SpectralGradientFilter",
    "SpectralImportance",
    "SpectrumMonitor",
    "ValidationPredictions",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from spec_lightning.callbacks.apply_method import ApplyMethod
    from spec_lightning.callbacks.dynamic_spectral_clustering import DynamicSpectralClustering
    from spec_lightning.callbacks.module_search import ModuleSearch
    from spec_lightning.callbacks.predictions import ValidationPredictions
    from spec_lightning.callbacks.preemption import PreemptionCheckpoint
    from spec_lightning.callbacks.probe import Probeable
    from spec_lightning.callbacks.spectral_gradient_filter import SpectralGradientFilter
    from spec_lightning.callbacks.spectral_importance import SpectralComponents, SpectralImportance
    from spec_lightning.callbacks.spectrum_monitor import SpectrumMonitor
