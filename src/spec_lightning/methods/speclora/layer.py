"""The SpecLoRA layer, pure torch: LoRA plus a learnable mask on the top-k singular directions."""

from __future__ import annotations

import math

import torch
from torch import nn

from spec_lightning.methods.speclora.function import SpecLoRADelta
from spec_lightning.methods.targets import base_weight, weight_matrix
from spec_lightning.spectral import TopKSVD


class SpecLoRALinear(nn.Module):
    """W' = W + U_k diag(m ⊙ σ_k) V_kᵀ + (α/r) B A  (METHODS.md §3, Si et al., 2025).

    The spectral mask m ∈ R^k (init 0) rescales the top-k singular directions of the frozen W; the
    forward pass applies it with Hadamard products on the k-dimensional projection,
        y = base(x) + ((x V_k) ⊙ (m ⊙ σ_k)) U_kᵀ + (α/r) · dropout(x) Aᵀ Bᵀ,
    never forming an m x n update, both paths in one autograd function (:class:`SpecLoRADelta`). A is
    Kaiming-uniform and B zero at init (peft's LoRA init), so
    W' = W at init exactly.

    U_k, σ_k, V_k are persistent buffers and part of the adapter state: a randomized SVD is not
    bit-identical across devices, random streams and BLAS builds, and the learned mask is tied to
    the directions it was trained on, so an adapter loaded elsewhere must bring them along rather
    than recompute them (that would merge another update).

    Args:
        base: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``).
        spectrum: its top-k SVD.
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: dropout on the LoRA input (not on the spectral path).
    """

    u_k: torch.Tensor  # (m, k)
    sigma_k: torch.Tensor  # (k,)
    v_k: torch.Tensor  # (n, k)

    def __init__(self, base: nn.Module, spectrum: TopKSVD, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        device = base_weight(base).device
        out_features, in_features = weight_matrix(base).shape
        self.register_buffer("u_k", spectrum.U.to(device).contiguous())  # (m, k)
        self.register_buffer("sigma_k", spectrum.S.to(device).contiguous())  # (k,)
        self.register_buffer("v_k", spectrum.V.to(device).contiguous())  # (n, k)
        self.mask = nn.Parameter(torch.zeros(spectrum.S.numel(), device=device))
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The basis U_k, σ_k, V_k, keyed as in the model's state_dict."""
        return {prefix + name: getattr(self, name).detach().clone() for name in ("u_k", "sigma_k", "v_k")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        x = x.reshape(-1, x.shape[-1]).to(self.v_k.dtype)
        delta = SpecLoRADelta.apply(
            x,
            self.dropout(x),
            self.v_k,
            self.u_k,
            self.sigma_k,
            self.mask,
            self.lora_A,
            self.lora_B,
            self.scaling,
        )
        return out + delta.view(out.shape).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' − W = U_k diag(m ⊙ σ_k) V_kᵀ + (α/r) B A, (out, in)."""
        return (self.u_k * (self.mask * self.sigma_k)) @ self.v_k.T + self.scaling * self.lora_B @ self.lora_A

    def effective_weight(self) -> torch.Tensor:
        """W' as an (out, in) matrix (for analysis and merging; the forward pass never forms it)."""
        return weight_matrix(self.base) + self.delta_weight().to(base_weight(self.base).dtype)
