"""SpecLoRA's adapter path as one autograd function: both low-rank paths through one output matmul and a
hand-written backward that skips what autograd would compute and drop (the gradients of the frozen bases)
and adds the two input gradients in one matmul when the LoRA path sees the input itself."""

from __future__ import annotations

from typing import Any

import torch

from spec_lightning.methods.fused import AutocastReplayFunction


class SpecLoRADelta(AutocastReplayFunction):
    """y_Δ = [h₁ ⊙ w | s h₂] [U_k | B]ᵀ with h₁ = x V_k, h₂ = x_d Aᵀ, w = m ⊙ σ_k, s = α/r:
    ((x V_k) ⊙ (m ⊙ σ_k)) U_kᵀ + s x_d Aᵀ Bᵀ, x_d the LoRA path's (dropped-out) input.

    Backward, with G = ∂L/∂y_Δ (N x m) and C = [C₁ | C₂] = G [U_k | B] (N x (k + r)):
        ∂m = σ_k ⊙ Σ_N C₁ ⊙ h₁,  ∂x = (C₁ ⊙ w) V_kᵀ,  ∂x_d = s C₂ A,
        ∂A = s C₂ᵀ x_d,  ∂B = Gᵀ (s h₂);
    when x_d is x (no dropout, or evaluation) ∂x is both terms in one addmm. U_k, σ_k, V_k are buffers:
    no gradient. The backward replays the forward's autocast state
    (:class:`~spec_lightning.methods.fused.AutocastReplayFunction`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor,
        v_k: torch.Tensor,
        u_k: torch.Tensor,
        sigma_k: torch.Tensor,
        mask: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        w = mask * sigma_k
        h1 = x @ v_k  # (N, k)
        h2s = (x_lora @ lora_a.T) * scaling  # (N, r): s h₂
        out_basis = torch.cat([u_k, lora_b], 1)  # (m, k + r)
        ctx.shared = x_lora is x
        ctx.save_for_backward(x, None if ctx.shared else x_lora, v_k, sigma_k, w, lora_a, h1, h2s, out_basis)
        ctx.scaling = scaling
        AutocastReplayFunction.save_autocast(ctx, x)
        return torch.cat([h1 * w, h2s], 1) @ out_basis.T  # the (N, k + r) coefficients are not kept

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, x_lora, v_k, sigma_k, w, lora_a, h1, h2s, out_basis = ctx.saved_tensors
        x_lora = x if ctx.shared else x_lora
        k = w.numel()
        needs_x, needs_x_lora, _, _, _, needs_mask, needs_a, needs_b, _ = ctx.needs_input_grad
        c = grad @ out_basis  # (N, k + r)
        c1, c2s = c[:, :k], c[:, k:] * ctx.scaling
        grad_mask = (c1 * h1).sum(0) * sigma_k if needs_mask else None
        grad_a = c2s.T @ x_lora if needs_a else None
        grad_b = grad.T @ h2s if needs_b else None
        grad_x = grad_x_lora = None
        if ctx.shared and (needs_x or needs_x_lora):
            grad_x = torch.addmm((c1 * w) @ v_k.T, c2s, lora_a)
        else:
            grad_x = (c1 * w) @ v_k.T if needs_x else None
            grad_x_lora = c2s @ lora_a if needs_x_lora else None
        return grad_x, grad_x_lora, None, None, None, grad_mask, grad_a, grad_b, None
