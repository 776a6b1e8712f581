"""Fisher-weighted spectral importance (LoRSA): I_i = σ_i² · E_x[(∂ℓ(x)/∂σ_i)²].

For a linear map y = x Wᵀ with W = Σ_i σ_i u_i v_iᵀ, ∂W/∂σ_i = u_i v_iᵀ, so for one sample
    ∂ℓ/∂σ_i = Σ_t (g_t · u_i)(x_t · v_i),   g_t = ∂ℓ/∂y_t,
summed over the sample's positions t. :class:`SigmaFisher` gets x and g from forward and tensor
hooks and computes these per-sample derivatives for every component and every sample of a batch at
once; nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from spec_lightning.spectral.svd import TopKSVD


def per_sample_sigma_gradients(
    inputs: torch.Tensor, grad_outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """∂ℓ_b/∂σ_i for every sample b and component i: (B, k) from x (B, ..., n) and g (B, ..., m)."""
    batch, k = inputs.shape[0], u.shape[1]
    a = (inputs.float() @ v).reshape(batch, -1, k)  # (B, T, k): x_t · v_i
    b = (grad_outputs.float() @ u).reshape(batch, -1, k)  # (B, T, k): g_t · u_i
    return (a * b).sum(1)


class SigmaFisher:
    """Accumulates Σ_x (∂ℓ(x)/∂σ_i)² for the given modules over calibration batches.

    Args:
        modules: name -> module whose output is x Wᵀ (+ terms independent of W).
        spectra: name -> the top-k SVD of that module's W (out x in).
        loss_reduction: ``"mean"`` when a batch's loss is the mean of its per-sample losses (then each
            captured gradient is multiplied by the batch size), ``"sum"`` when it is their sum.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        spectra: dict[str, TopKSVD],
        loss_reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        self.modules = modules
        self.spectra = spectra
        self.loss_reduction = loss_reduction
        self.sum_sq = {name: torch.zeros_like(s.S) for name, s in spectra.items()}
        self.samples = dict.fromkeys(spectra, 0)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks installed for the duration of the block: run forward and backward passes inside it."""
        handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, name: str):  # noqa: ANN202 - a torch hook signature
        spectrum = self.spectra[name]

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self._accumulate(name, x, g, spectrum))

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor, spectrum: TopKSVD) -> None:
        grads = per_sample_sigma_gradients(x, g, spectrum.U.to(x.device), spectrum.V.to(x.device))
        if self.loss_reduction == "mean":
            grads = grads * x.shape[0]
        self.sum_sq[name] += grads.pow(2).sum(0).to(self.sum_sq[name].device)
        self.samples[name] += x.shape[0]

    def add(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the sums and sample counts by their totals over processes: ``all_reduce`` returns the
        sum of a tensor over them (one call for everything)."""
        names = list(self.sum_sq)
        flat = torch.cat([self.sum_sq[n].double().flatten() for n in names])
        counts = torch.tensor([self.samples[n] for n in names], dtype=torch.float64, device=flat.device)
        total = all_reduce(torch.cat([flat, counts])).cpu()
        sizes = [self.sum_sq[n].numel() for n in names]
        for name, part in zip(names, total[: flat.numel()].split(sizes), strict=True):
            self.sum_sq[name] = part.view_as(self.sum_sq[name]).to(self.sum_sq[name])
        self.samples = {n: int(c) for n, c in zip(names, total[flat.numel() :].tolist(), strict=True)}

    def scores(self) -> dict[str, torch.Tensor]:
        """I_i = σ_i² · mean over samples of (∂ℓ/∂σ_i)², per module."""
        missing = [name for name, count in self.samples.items() if count == 0]
        if missing:
            raise RuntimeError(
                f"no gradient reached {missing[:3]}: run forward and backward inside recording(), "
                "with the loss depending on these modules"
            )
        return {
            name: s.S.to(self.sum_sq[name].device).pow(2) * self.sum_sq[name] / self.samples[name]
            for name, s in self.spectra.items()
        }


def allocate_components(
    scores: dict[str, torch.Tensor], sizes: dict[str, int], budget: Literal["per_layer", "global"]
) -> dict[str, torch.Tensor]:
    """Choose the adapted set S per layer from importance scores (indices ascending).

    ``per_layer``: the top-``sizes[name]`` components of each layer. ``global``: the same total
    Σ sizes, spent on the highest scores across all layers, with at least one component per layer.
    """
    if budget == "per_layer":
        return {name: s.topk(sizes[name]).indices.sort().values for name, s in scores.items()}
    names = list(scores)
    counts = dict.fromkeys(names, 1)
    remaining = sum(sizes.values()) - len(names)
    flat = torch.cat([scores[n].float().cpu() for n in names])
    owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
    position = torch.cat([torch.arange(len(scores[n])) for n in names])
    firsts = {(i, int(scores[n].argmax())) for i, n in enumerate(names)}
    for j in flat.argsort(descending=True).tolist():
        if remaining == 0:
            break
        if (int(owner[j]), int(position[j])) not in firsts:
            counts[names[int(owner[j])]] += 1
            remaining -= 1
    return {n: scores[n].topk(counts[n]).indices.sort().values for n in names}
