"""Finding LoRSA's target matrices, wrapping them, and merging the update back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spec_lightning.methods.base import FineTuningMethod, freeze_except_head
from spec_lightning.methods.lorsa.layer import LoRSALinear
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

#: Default number of singular triplets computed per matrix (capped by the matrix).
DEFAULT_TOP_K = 256


class LoRSA(FineTuningMethod):
    """Low-Rank Spectral Adaptation (METHODS.md §2): adapt σ_i, u_i, v_i of a subset S of the top-k.

    Each target matrix gets a :class:`LoRSALinear`; at first S is the ``num_components`` largest
    singular values. The :class:`~spec_lightning.callbacks.SpectralImportance` callback replaces S by
    the components with the highest Fisher-weighted importance before training starts. Trainable
    parameters per matrix: s · (1 + 2r), plus the task head.

    Args:
        target_modules: names (dotted suffixes) of the linear layers to adapt.
        num_components: s = |S|, components adapted per matrix.
        rank: r, width of the fixed random projections P, Q that rotate u_i and v_i.
        top_k: singular triplets computed per matrix, the candidates for S; default
            min(256, min(m, n)).
        seed: base seed of P, Q and of the randomized SVD (layer i uses seed + i).
    """

    def __init__(
        self,
        target_modules: Sequence[str] = ("query", "value"),
        num_components: int = 32,
        rank: int = 16,
        top_k: int | None = None,
        seed: int = 0,
    ) -> None:
        self.target_modules = name_list(target_modules, "method.init_args.target_modules")
        self.num_components = num_components
        self.rank = rank
        self.top_k = top_k
        self.seed = seed

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        targets = find_linear_targets(model, self.target_modules, "method.init_args.target_modules", head)
        freeze_except_head(model, head)
        for i, (name, module) in enumerate(sorted(targets.items())):
            k = resolve_top_k(self.top_k, DEFAULT_TOP_K, module, name)
            check_rank(self.rank, module, name, "method.init_args.rank")
            if not 1 <= self.num_components <= k:
                raise ValueError(
                    f"method.init_args.num_components={self.num_components} does not fit {name}: it must lie "
                    f"in [1, top_k={k}]. Lower num_components or raise top_k."
                )
            spectrum = top_k_svd(weight_matrix(module).detach(), k, self.seed + i)
            index = torch.arange(self.num_components)
            replace_module(model, name, LoRSALinear(module, spectrum, index, self.rank, self.seed + i))
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors plus each layer's S, U_S, σ_S, V_S and projection seed."""
        state = super().adapter_state_dict(model)
        for name, module in lorsa_layers(model).items():
            state.update(module.adapter_state(name + "."))
        return state

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_wrapped(model, LoRSALinear)


def lorsa_layers(model: nn.Module) -> dict[str, LoRSALinear]:
    """Every LoRSA layer of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRSALinear)}
