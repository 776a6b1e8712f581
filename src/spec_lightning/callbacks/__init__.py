"""Callbacks that work on any LightningModule through the public hook API."""

from spec_lightning.callbacks.spectral_gradient_filter import SpectralGradientFilter
from spec_lightning.callbacks.spectral_importance import SpectralComponents, SpectralImportance
from spec_lightning.callbacks.spectrum_monitor import SpectrumMonitor

__all__ = ["SpectralComponents", "SpectralGradientFilter", "SpectralImportance", "SpectrumMonitor"]
