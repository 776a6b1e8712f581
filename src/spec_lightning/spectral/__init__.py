"""Shared spectral maths (pure torch/SciPy, no Lightning): SVD helpers, spectral importance, parameter
graphs with their Laplacian spectra, and spectral filters."""

from spec_lightning.spectral.coordination import ParameterGraphs
from spec_lightning.spectral.filters import FilterName, NodeFilter, filter_node_gradients, filter_response
from spec_lightning.spectral.graph import GraphConfig, NodeGroup, group_nodes
from spec_lightning.spectral.importance import allocate_components, per_sample_sigma_gradients
from spec_lightning.spectral.laplacian import (
    LaplacianSpectrum,
    eigendecompose,
    laplacian,
    spectral_smoothness,
)
from spec_lightning.spectral.svd import TopKSVD, top_k_svd

__all__ = [
    "FilterName",
    "GraphConfig",
    "LaplacianSpectrum",
    "NodeFilter",
    "NodeGroup",
    "ParameterGraphs",
    "TopKSVD",
    "allocate_components",
    "eigendecompose",
    "filter_node_gradients",
    "filter_response",
    "group_nodes",
    "laplacian",
    "per_sample_sigma_gradients",
    "spectral_smoothness",
    "top_k_svd",
]
