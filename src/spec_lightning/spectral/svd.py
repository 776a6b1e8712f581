"""Truncated SVD of frozen weight matrices by randomized SVD (Halko, Martinsson and Tropp, 2011)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TopKSVD(NamedTuple):
    """W ≈ U diag(S) Vᵀ with U (m, k), S (k,) descending, V (n, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


@torch.no_grad()
def top_k_svd(matrix: torch.Tensor, k: int, seed: int = 0, oversample: int = 10, niter: int = 4) -> TopKSVD:
    """The top-k singular triplets of ``matrix`` (m x n) by ``torch.svd_lowrank``, in float32.

    The sketch draws from a generator forked and seeded with ``seed``, so the result is reproducible
    and the caller's RNG stream is untouched. With ``k + oversample >= min(m, n)`` the sketch spans
    the whole range and the result is exact to float precision.

    Raises:
        ValueError: when k is not in [1, min(m, n)].
    """
    if matrix.ndim != 2:
        raise ValueError(f"top_k_svd expects a matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k={k} does not fit a {m} x {n} matrix: k must lie in [1, {min(m, n)}]")
    q = min(k + oversample, m, n)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix.float(), q=q, niter=niter)
    return TopKSVD(u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous())
