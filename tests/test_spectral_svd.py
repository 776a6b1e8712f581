"""Randomized truncated SVD against torch.linalg.svd on matrices with a known spectrum."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.spectral import top_k_svd


def known_spectrum(m: int, n: int, decay: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U diag(s) Vᵀ with orthonormal U, V and s_i = 5 · decay^i."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = 5.0 * decay ** torch.arange(r, dtype=torch.float32)
    return (u * s) @ v.T, s


@pytest.mark.parametrize(("m", "n", "k"), [(96, 64, 8), (64, 96, 16), (48, 48, 48)])
def test_top_k_svd_recovers_the_known_spectrum(m: int, n: int, k: int) -> None:
    a, s = known_spectrum(m, n)
    ours = top_k_svd(a, k, seed=1)
    torch.testing.assert_close(ours.S, s[:k], rtol=1e-4, atol=1e-5)
    u, s_ref, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(ours.S, s_ref[:k], rtol=1e-4, atol=1e-5)
    # singular vectors agree up to sign: |⟨u_i, u_i_ref⟩| = 1
    torch.testing.assert_close((ours.U * u[:, :k]).sum(0).abs(), torch.ones(k), atol=1e-4, rtol=0)
    torch.testing.assert_close((ours.V * vh[:k].T).sum(0).abs(), torch.ones(k), atol=1e-4, rtol=0)
    assert ours.U.shape == (m, k) and ours.V.shape == (n, k)


def test_top_k_svd_is_seeded_and_leaves_the_global_rng_alone() -> None:
    a, _ = known_spectrum(80, 60, decay=0.97)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = top_k_svd(a, 5, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = top_k_svd(a, 5, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


@pytest.mark.parametrize("k", [0, 65])
def test_top_k_svd_rejects_k_outside_the_matrix(k: int) -> None:
    with pytest.raises(ValueError, match=r"k=\d+ does not fit a 64 x 80 matrix"):
        top_k_svd(torch.randn(64, 80), k)
