"""Graph Laplacians, their eigendecomposition L = U Λ Uᵀ, and the smoothness of node signals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

Eigensolver = Literal["auto", "dense", "eigsh", "lobpcg"]

#: Graphs up to this many nodes are decomposed densely by ``auto``.
DENSE_NODES = 1024


@dataclass(frozen=True)
class LaplacianSpectrum:
    """The lowest eigenpairs of a Laplacian, ascending: ``values`` (k,), ``vectors`` (m, k), float64."""

    values: torch.Tensor
    vectors: torch.Tensor

    @property
    def complete(self) -> bool:
        """Whether every eigenpair is present (k = m)."""
        return self.vectors.shape[0] == self.vectors.shape[1]


def laplacian(weights: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """L = D − W, or L = I − D^{-1/2} W D^{-1/2} (isolated nodes get L_ii = 0), for symmetric W ≥ 0."""
    degree = weights.sum(dim=1)
    if not normalized:
        return torch.diag(degree) - weights
    scale = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    return torch.diag((degree > 0).to(weights.dtype)) - scale[:, None] * weights * scale[None, :]


def eigendecompose(
    lap: torch.Tensor, num_pairs: int | None = None, solver: Eigensolver = "auto", seed: int = 0
) -> LaplacianSpectrum:
    """The ``num_pairs`` smallest eigenpairs of a symmetric Laplacian (all of them for None).

    ``dense`` is ``torch.linalg.eigh``; ``eigsh`` (Lanczos) and ``lobpcg`` are SciPy's sparse solvers
    for large graphs, started from a seeded vector so that every process gets the same basis. ``auto``
    is dense up to :data:`DENSE_NODES` nodes or when every pair is wanted, else ``eigsh``.
    """
    m = lap.shape[0]
    k = m if num_pairs is None else num_pairs
    if not 1 <= k <= m:
        raise ValueError(f"cannot compute {k} eigenpairs of a graph with {m} nodes")
    if solver == "auto":
        solver = "dense" if m <= DENSE_NODES or k >= m - 1 else "eigsh"
    if solver == "dense":
        values, vectors = torch.linalg.eigh(lap.double().cpu())
        return LaplacianSpectrum(_non_negative(values[:k], lap), vectors[:, :k])
    if k >= m - 1:
        raise ValueError(
            f"the sparse eigensolver {solver} computes fewer than m - 1 = {m - 1} pairs; use dense"
        )
    sparse = scipy.sparse.csr_matrix(lap.double().cpu().numpy())
    start = np.random.default_rng(seed).standard_normal((m, k) if solver == "lobpcg" else m)
    if solver == "eigsh":
        values, vectors = scipy.sparse.linalg.eigsh(sparse, k=k, which="SA", v0=start, tol=1e-10)
    elif solver == "lobpcg":
        values, vectors = scipy.sparse.linalg.lobpcg(sparse, start, largest=False, tol=1e-9, maxiter=2000)
    else:
        raise ValueError(f"eigensolver must be auto, dense, eigsh or lobpcg, got {solver!r}")
    order = np.argsort(values)
    return LaplacianSpectrum(
        _non_negative(torch.from_numpy(values[order]), lap),
        torch.from_numpy(np.ascontiguousarray(vectors[:, order])),
    )


def _non_negative(values: torch.Tensor, lap: torch.Tensor) -> torch.Tensor:
    """Round-off negatives (|λ| ≤ 1e-9 · ||L||_max · m) to 0; a clearly negative eigenvalue means L is
    not a Laplacian of symmetric non-negative weights, and raises."""
    tolerance = 1e-9 * max(float(lap.abs().max()), 1e-300) * lap.shape[0]
    if values.numel() and float(values.min()) < -tolerance:
        raise ValueError(
            f"the Laplacian has the eigenvalue {float(values.min()):.3e} < 0: a graph Laplacian is positive "
            "semi-definite, so its weights W are not symmetric and non-negative (check the edge weights)"
        )
    return values.clamp_min(0.0)


def spectral_smoothness(nodes: torch.Tensor, spectrum: LaplacianSpectrum) -> torch.Tensor:
    """L_spec = Σ_ij W_ij ||θ_i − θ_j||² = 2 tr(θᵀ L θ) = 2 Σ_k λ_k ||(Uᵀ θ)_k||², in the spectral domain.

    ``nodes`` is the m x d node matrix (differentiable); the spectrum must be complete.
    """
    if not spectrum.complete:
        raise ValueError("the smoothness term needs every eigenpair; decompose with num_pairs=None")
    with torch.autocast(nodes.device.type, enabled=False):  # Δθ is small: bf16 would round it away
        basis = spectrum.vectors.to(nodes.device, nodes.dtype)
        coefficients = basis.T @ nodes  # (m, d): θ' = Uᵀ θ
        values = spectrum.values.to(nodes.device, nodes.dtype)
        return 2.0 * (values * coefficients.pow(2).sum(dim=1)).sum()
