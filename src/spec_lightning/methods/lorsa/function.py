"""LoRSA's adapter path as one autograd function: the forward of :class:`LoRSALinear` in three matmuls and
a hand-written backward, instead of the dozen autograd nodes (and the zero-filled gradients of two
slices) that the composed operations record."""

from __future__ import annotations

from typing import Any

import torch

from spec_lightning.methods.fused import AutocastReplayFunction


class LoRSADelta(AutocastReplayFunction):
    """y_Δ = [z − a ⊙ σ | z pᵀ] [U_S | P]ᵀ with h = x [V_S | Q] = [a | b], t = a + b q, z = t ⊙ (σ + Δσ).

    Backward, with G = ∂L/∂y_Δ (N x m) and C = [C₁ | C₂] = G [U_S | P] (N x (s + r)):
        ∂z = C₁ + C₂ p,  ∂p = C₂ᵀ z,  ∂Δσ = Σ_N ∂z ⊙ t,  ∂t = ∂z ⊙ (σ + Δσ),
        ∂a = ∂t − C₁ ⊙ σ,  ∂b = ∂t qᵀ,  ∂q = bᵀ ∂t,  ∂x = [∂a | ∂b] [V_S | Q]ᵀ.
    The bases and σ are buffers: no gradient. The backward replays the forward's autocast state
    (:class:`~spec_lightning.methods.fused.AutocastReplayFunction`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        in_basis: torch.Tensor,
        out_basis: torch.Tensor,
        sigma: torch.Tensor,
        delta_sigma: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
    ) -> torch.Tensor:
        s = sigma.numel()
        h = x @ in_basis  # (N, s + r)
        a, b = h[:, :s], h[:, s:]
        t = torch.addmm(a, b, q)  # (N, s): x V_S'
        scale = sigma + delta_sigma
        z = t * scale
        coeff = torch.cat([z - a * sigma, z @ p.T], 1)  # (N, s + r)
        ctx.save_for_backward(x, in_basis, out_basis, sigma, scale, p, q, b, t, z)
        AutocastReplayFunction.save_autocast(ctx, x)
        return coeff @ out_basis.T

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, in_basis, out_basis, sigma, scale, p, q, b, t, z = ctx.saved_tensors
        s = sigma.numel()
        c = grad @ out_basis  # (N, s + r)
        c1, c2 = c[:, :s], c[:, s:]
        grad_p = c2.T @ z
        grad_z = torch.addmm(c1, c2, p)
        grad_delta_sigma = (grad_z * t).sum(0)
        grad_t = grad_z * scale
        grad_h = torch.cat([grad_t - c1 * sigma, grad_t @ q.T], 1)
        grad_q = b.T @ grad_t
        grad_x = grad_h @ in_basis.T if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, grad_delta_sigma, grad_p, grad_q
