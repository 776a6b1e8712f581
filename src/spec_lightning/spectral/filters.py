"""Spectral filters on graph signals: G ← U g(Λ) Uᵀ G over the node axis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from spec_lightning.spectral.graph import NodeGroup
from spec_lightning.spectral.laplacian import LaplacianSpectrum

FilterName = Literal["ideal_lowpass", "heat", "tikhonov"]


def filter_response(
    values: torch.Tensor, name: FilterName, cutoff: int = 1, tau: float = 1.0
) -> torch.Tensor:
    """g(λ) at ascending eigenvalues: ``ideal_lowpass`` keeps the ``cutoff`` lowest frequencies,
    ``heat`` is exp(−τλ), ``tikhonov`` is 1/(1 + τλ)."""
    if name == "ideal_lowpass":
        return (torch.arange(len(values)) < cutoff).to(values.dtype)
    if name == "heat":
        return torch.exp(-tau * values)
    if name == "tikhonov":
        return 1.0 / (1.0 + tau * values)
    raise ValueError(f"filter must be ideal_lowpass, heat or tikhonov, got {name!r}")


@dataclass(frozen=True)
class NodeFilter:
    """The operator F = U g(Λ) Uᵀ of one graph, kept as the basis U (m x k) and the response g (k,).

    With k < m (an ideal low-pass from a partial spectrum) F = U_k U_kᵀ exactly.
    """

    basis: torch.Tensor
    response: torch.Tensor

    @classmethod
    def from_spectrum(
        cls, spectrum: LaplacianSpectrum, name: FilterName, cutoff: int = 1, tau: float = 1.0
    ) -> NodeFilter:
        if name != "ideal_lowpass" and not spectrum.complete:
            raise ValueError(f"the {name} filter needs every eigenpair; decompose with num_pairs=None")
        if name == "ideal_lowpass" and cutoff > spectrum.values.numel():
            raise ValueError(
                f"ideal_lowpass cutoff {cutoff} exceeds the {spectrum.values.numel()} eigenpairs"
            )
        return cls(spectrum.vectors, filter_response(spectrum.values, name, cutoff, tau))

    def to(self, device: torch.device, dtype: torch.dtype) -> NodeFilter:
        return NodeFilter(self.basis.to(device, dtype), self.response.to(device, dtype))

    def apply(self, nodes: torch.Tensor) -> torch.Tensor:
        """F θ for an m x d node matrix (two matmuls of width k)."""
        coefficients = self.basis.T @ nodes  # (k, d)
        return self.basis @ (self.response[:, None] * coefficients)


@torch.no_grad()
def filter_node_gradients(
    groups: Sequence[NodeGroup], filters: Mapping[str, NodeFilter], grads: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """G ← F G for every graph, in place in ``grads``; returns (||G||², ||G||² − ||F G||²) summed over graphs.

    The arithmetic is float32 whatever the gradient dtype; each filter must already be on the
    gradients' device.
    """
    total = removed = torch.zeros((), device=next(iter(grads.values())).device)
    for group in groups:
        nodes = group.stack(grads).float()  # (m, d)
        filtered = filters[group.name].apply(nodes)
        before, after = nodes.pow(2).sum(), filtered.pow(2).sum()
        total, removed = total + before, removed + (before - after)
        group.write(filtered, grads)
    return total, removed
