"""Graph-spectral parameter coordination (METHODS.md §1): the joint spectral loss around any method."""

from spec_lightning.methods.graph_spectral.method import GraphSpectral

__all__ = ["GraphSpectral"]
