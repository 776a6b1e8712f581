"""Finding SpecLoRA's target matrices, wrapping them, and merging the update back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spec_lightning.methods.base import FineTuningMethod, freeze_except_head
from spec_lightning.methods.speclora.layer import SpecLoRALinear
from spec_lightning.methods.targets import (
    check_rank,
    find_linear_targets,
    merge_wrapped,
    name_list,
    replace_module,
    resolve_top_k,
    weight_matrix,
)
from spec_lightning.spectral import top_k_svd

#: Default number of masked singular directions per matrix (capped by the matrix).
DEFAULT_TOP_K = 32


class SpecLoRA(FineTuningMethod):
    """LoRA plus a learnable spectral mask over the top-k singular directions (METHODS.md §3).

    Trainable parameters per matrix: r · (m + n) for LoRA plus k for the mask, plus the task head.

    Args:
        target_modules: names (dotted suffixes) of the linear layers to adapt.
        r: LoRA rank.
        alpha: LoRA scaling numerator; the LoRA update is (alpha / r) · B A.
        dropout: dropout on the LoRA input.
        top_k: k, the singular directions the mask rescales; default min(32, min(m, n)).
        seed: base seed of the randomized SVD (layer i uses seed + i). The basis is saved with the
            adapter, so loading it under another seed or device gives the same update.
    """

    def __init__(
        self,
        target_modules: Sequence[str] = ("query", "value"),
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.1,
        top_k: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"method.init_args.dropout must be in [0, 1), got {dropout}")
        self.target_modules = name_list(target_modules, "method.init_args.target_modules")
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.top_k = top_k
        self.seed = seed

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        targets = find_linear_targets(model, self.target_modules, "method.init_args.target_modules", head)
        freeze_except_head(model, head)
        for i, (name, module) in enumerate(sorted(targets.items())):
            check_rank(self.r, module, name, "method.init_args.r")
            k = resolve_top_k(self.top_k, DEFAULT_TOP_K, module, name)
            spectrum = top_k_svd(weight_matrix(module).detach(), k, self.seed + i)
            replace_module(model, name, SpecLoRALinear(module, spectrum, self.r, self.alpha, self.dropout))
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """LoRA factors, masks and head, plus each layer's basis U_k, σ_k, V_k (so the adapter means
        the same update wherever it is loaded)."""
        state = super().adapter_state_dict(model)
        for name, module in model.named_modules():
            if isinstance(module, SpecLoRALinear):
                state.update(module.adapter_state(name + "."))
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not any(key.endswith(".u_k") for key in state):
            raise KeyError(
                "SpecLoRA: this adapter state has no singular basis (u_k, sigma_k, v_k): it was saved by an "
                "earlier spec_lightning that recomputed the basis by a randomized SVD on load, so its mask "
                "is not tied to the directions it was trained on. Train it again, or export a merged model "
                "with the spec_lightning version that trained it."
            )
        super().load_adapter_state_dict(model, state)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_wrapped(model, SpecLoRALinear)
