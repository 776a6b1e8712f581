"""The LoRSA layer, pure torch: singular-value shifts and singular-vector rotations on a subset S."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spec_lightning.methods.lorsa.function import LoRSADelta
from spec_lightning.methods.targets import base_weight, weight_matrix
from spec_lightning.spectral import TopKSVD, top_k_svd


def projections(
    out_features: int, in_features: int, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random P (m x r), entries N(0, 1/m), and Q (n x r), entries N(0, 1/n), from ``seed``.

    Drawn on the CPU from their own generator, so every device and every reload gets the same P, Q.
    """
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(out_features, rank, generator=generator, device="cpu") / out_features**0.5
    q = torch.randn(in_features, rank, generator=generator, device="cpu") / in_features**0.5
    return p, q


class LoRSALinear(nn.Module):
    """Low-rank spectral adaptation of a frozen linear map y = x Wᵀ + b (METHODS.md §2).

    With the top-k SVD W ≈ Σ_i σ_i u_i v_iᵀ and the adapted set S (s components):
        W' = Σ_{i∉S} σ_i u_i v_iᵀ + Σ_{i∈S} (σ_i + Δσ_i) u_i' v_i'ᵀ,
        u_i' = u_i + P p_i,  v_i' = v_i + Q q_i,
    i.e. W' = W + U_S' diag(σ_S + Δσ) V_S'ᵀ − U_S diag(σ_S) V_Sᵀ. P, Q are fixed and shared by the
    layer's components; Δσ (s), p = [p_1 … p_s] (r x s) and q (r x s) train and start at zero, so
    W' = W at init exactly. The forward pass never forms W':
        h = x [V_S | Q]                          (…, s + r),  a = h[:s],  b = h[s:]
        z = (a + b q) ⊙ (σ_S + Δσ)               = (x V_S') ⊙ (σ_S + Δσ)
        y = base(x) + [z − a ⊙ σ_S | z pᵀ] [U_S | P]ᵀ
    two matmuls of width s + r for all components at once, in one autograd function with a
    hand-written backward (:class:`~spec_lightning.methods.lorsa.function.LoRSADelta`).

    The state keeps the selected factors U_S, σ_S, V_S (not a seed to recompute them): a randomized
    SVD is not bit-identical across devices and BLAS builds, and u_i' = u_i + P p_i depends on the
    sign of u_i, which an SVD leaves free. P and Q are regenerated from ``projection_seed``.

    Args:
        base: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``).
        spectrum: its top-k SVD (candidates for S).
        index: the components to adapt, indices into ``spectrum``.
        rank: r, the width of the rotation projections.
        seed: seed of P and Q, and of the randomized SVD behind :meth:`candidate_spectrum`.
    """

    # Buffers and parameters, registered in _set_state and _refresh_bases.
    projection_seed: torch.Tensor
    index: torch.Tensor
    u_s: torch.Tensor  # (m, s)
    sigma_s: torch.Tensor  # (s,)
    v_s: torch.Tensor  # (n, s)
    in_basis: torch.Tensor  # (n, s + r)
    out_basis: torch.Tensor  # (m, s + r)
    delta_sigma: nn.Parameter  # (s,)
    p: nn.Parameter  # (r, s)
    q: nn.Parameter  # (r, s)

    def __init__(self, base: nn.Module, spectrum: TopKSVD, index: torch.Tensor, rank: int, seed: int) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.top_k = spectrum.S.numel()
        self.register_buffer("projection_seed", torch.tensor(seed))
        self.select_components(index, spectrum)

    @property
    def num_components(self) -> int:
        """s = |S|."""
        return self.index.numel()

    def candidate_spectrum(self) -> TopKSVD:
        """The top-k SVD of the frozen weight, recomputed (same seed, so the same as at construction)."""
        return top_k_svd(weight_matrix(self.base).detach(), self.top_k, int(self.projection_seed))

    def select_components(self, index: torch.Tensor, spectrum: TopKSVD) -> None:
        """Adapt the components ``index`` of ``spectrum``; Δσ, p, q restart at zero (W' = W)."""
        index = index.to(spectrum.S.device, torch.long)
        self._set_state(index, spectrum.U[:, index], spectrum.S[index], spectrum.V[:, index])

    def _set_state(self, index: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> None:
        device = base_weight(self.base).device
        s = index.numel()
        self.register_buffer("index", index.to(device))
        self.register_buffer("u_s", u.to(device, torch.float32).contiguous())  # (m, s)
        self.register_buffer("sigma_s", sigma.to(device, torch.float32).contiguous())  # (s,)
        self.register_buffer("v_s", v.to(device, torch.float32).contiguous())  # (n, s)
        for name, shape in (("delta_sigma", (s,)), ("p", (self.rank, s)), ("q", (self.rank, s))):
            current = getattr(self, name, None)
            if isinstance(current, nn.Parameter) and current.shape == shape:
                with torch.no_grad():  # the same parameter (FSDP2 may have sharded it), restarted at zero
                    current.zero_()
            else:
                setattr(self, name, nn.Parameter(torch.zeros(shape, device=device)))
        self._refresh_bases()

    def _refresh_bases(self) -> None:
        """Rebuild the fused, non-persistent bases [V_S | Q] and [U_S | P] from the state."""
        out_features, in_features = self.u_s.shape[0], self.v_s.shape[0]
        p, q = projections(out_features, in_features, self.rank, int(self.projection_seed))
        self.register_buffer("in_basis", torch.cat([self.v_s, q.to(self.v_s)], 1), persistent=False)
        self.register_buffer("out_basis", torch.cat([self.u_s, p.to(self.u_s)], 1), persistent=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        index = state_dict.get(prefix + "index")
        if index is not None and index.shape != self.index.shape:  # a different |S| (global budget)
            s, m, n = index.numel(), self.u_s.shape[0], self.v_s.shape[0]
            self._set_state(index, torch.zeros(m, s), torch.zeros(s), torch.zeros(n, s))
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._refresh_bases()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.in_basis.dtype)
        delta = LoRSADelta.apply(
            flat, self.in_basis, self.out_basis, self.sigma_s, self.delta_sigma, self.p, self.q
        )  # exactly 0 at init
        return out + delta.view(out.shape).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' − W = U_S' diag(σ_S + Δσ) V_S'ᵀ − U_S diag(σ_S) V_Sᵀ, (out, in)."""
        s = self.num_components
        u_new = self.u_s + self.out_basis[:, s:] @ self.p
        v_new = self.v_s + self.in_basis[:, s:] @ self.q
        return (u_new * (self.sigma_s + self.delta_sigma)) @ v_new.T - (self.u_s * self.sigma_s) @ self.v_s.T

    def effective_weight(self) -> torch.Tensor:
        """W' as an (out, in) matrix (for analysis and merging; the forward pass never forms it)."""
        return weight_matrix(self.base) + self.delta_weight().to(base_weight(self.base).dtype)

    def adapter_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Δσ, p, q and the selected factors, keyed as in the model's state_dict."""
        return {
            prefix + k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("base.")
        }
