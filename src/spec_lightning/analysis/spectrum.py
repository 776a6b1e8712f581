"""Singular spectra of weight matrices before and after fine-tuning (Si et al., 2025, §3).

For a pretrained W = U Σ Vᵀ and its fine-tuned W' = U' Σ' V'ᵀ: σ_i against σ_i', the relative
change σ_i'/σ_i − 1, and |⟨u_i, u_i'⟩|, |⟨v_i, v_i'⟩| for the top-k pairs (absolute values, since an
SVD fixes each pair only up to a joint sign).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from spec_lightning.methods.targets import LINEAR_TYPES, base_weight, weight_matrix  # noqa: E402

FIELDS = ("stage", "step", "layer", "index", "sigma_ref", "sigma", "cos_u", "cos_v")


class Spectrum(NamedTuple):
    """All singular values S (descending) and the top-k singular vectors U (m, k), V (n, k)."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor


def has_weight_matrix(module: nn.Module) -> bool:
    """Whether :func:`effective_weight` knows how to read this module's (fine-tuned) weight."""
    return (
        hasattr(module, "effective_weight")
        or (hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer"))
        or isinstance(module, LINEAR_TYPES)
    )


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """The current (out, in) weight: a method layer's W', a peft LoRA-family layer's W + ΔW, or W."""
    own = getattr(module, "effective_weight", None)
    if callable(own):
        return own()
    delta, base = getattr(module, "get_delta_weight", None), getattr(module, "get_base_layer", None)
    if callable(delta) and callable(base):  # peft's LoRA-family layers
        adapters = getattr(module, "active_adapters", None)
        assert adapters is not None, "a peft tuner layer names its active adapters"
        weight = base_weight(base()) + sum(delta(name) for name in adapters)
        return weight.T if getattr(module, "fan_in_fan_out", False) else weight
    return weight_matrix(module)


@torch.no_grad()
def spectrum(weight: torch.Tensor, k: int) -> Spectrum:
    """Exact SVD (``torch.linalg.svd``) in float32, keeping all σ and the top-k vectors, on the CPU."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    k = min(k, s.numel())
    return Spectrum(s.cpu(), u[:, :k].cpu(), vh[:k].T.cpu())


def compare(stage: str, step: int, layer: str, ref: Spectrum, now: Spectrum) -> list[dict[str, Any]]:
    """Rows of σ_ref, σ and the top-k |cos| of corresponding singular vectors."""
    cos_u = (ref.U * now.U).sum(0).abs().tolist()
    cos_v = (ref.V * now.V).sum(0).abs().tolist()
    return [
        {
            "stage": stage,
            "step": step,
            "layer": layer,
            "index": i,
            "sigma_ref": float(ref.S[i]),
            "sigma": float(now.S[i]),
            "cos_u": cos_u[i] if i < len(cos_u) else "",
            "cos_v": cos_v[i] if i < len(cos_v) else "",
        }
        for i in range(ref.S.numel())
    ]


def spectrum_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """Three panels: σ (reference dashed), relative change σ/σ_ref − 1, and |cos(u_i, u_i')|."""
    fig, (ax_s, ax_d, ax_c) = plt.subplots(1, 3, figsize=(15, 4))
    layers = list(dict.fromkeys(str(r["layer"]) for r in rows))
    colours = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for layer, colour in zip(layers, colours, strict=True):
        mine = [r for r in rows if r["layer"] == layer]
        index = [int(r["index"]) for r in mine]
        ref = [float(r["sigma_ref"]) for r in mine]
        now = [float(r["sigma"]) for r in mine]
        ax_s.semilogy(index, ref, "--", color=colour, lw=0.8)
        ax_s.semilogy(index, now, color=colour, lw=0.8, label=layer.split("encoder.")[-1])
        ax_d.plot(
            index, [b / a - 1 if a > 0 else 0.0 for a, b in zip(ref, now, strict=True)], color=colour, lw=0.8
        )
        top = [r for r in mine if r["cos_u"] != ""]
        ax_c.plot([int(r["index"]) for r in top], [float(r["cos_u"]) for r in top], color=colour, lw=0.8)
    ax_s.set(title="singular values (dashed: reference)", xlabel="index i", ylabel="σ_i")
    ax_d.set(title="relative change σ_i'/σ_i − 1", xlabel="index i")
    ax_c.set(title="|cos(u_i, u_i')| of the top-k", xlabel="index i", ylim=(0, 1.05))
    if len(layers) <= 12:
        ax_s.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
