"""Shared spectral maths (pure torch/scipy, no Lightning): SVD helpers and spectral importance."""

from spec_lightning.spectral.importance import allocate_components, per_sample_sigma_gradients
from spec_lightning.spectral.svd import TopKSVD, top_k_svd

__all__ = ["TopKSVD", "allocate_components", "per_sample_sigma_gradients", "top_k_svd"]
