"""Inserting Houlsby adapters after the attention-output and FFN-output projections."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from spec_lightning.methods.base import FineTuningMethod, freeze_except_head
from spec_lightning.methods.houlsby.layer import HoulsbyWrapped
from spec_lightning.methods.targets import (
    base_weight,
    check_rank,
    find_linear_targets,
    linear_in_out,
    name_list,
    replace_module,
)


class HoulsbyAdapter(FineTuningMethod):
    """Bottleneck adapters after each sub-layer's output projection, before the residual sum.

    In BERT, ``attention.output.dense`` and ``output.dense`` are those projections; in GPT-2,
    ``attn.c_proj`` and ``mlp.c_proj``. The adapter is non-linear, so it cannot be merged.

    Args:
        bottleneck: adapter width (64 in the paper's mid-size setting).
        target_modules: output projections to follow with an adapter (suffix match).
    """

    mergeable = False

    def __init__(
        self, bottleneck: int = 64, target_modules: Sequence[str] = ("attention.output.dense", "output.dense")
    ) -> None:
        if bottleneck < 1:
            raise ValueError(f"method.init_args.bottleneck must be >= 1, got {bottleneck}")
        self.bottleneck = bottleneck
        self.target_modules = name_list(target_modules, "method.init_args.target_modules")

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        targets = find_linear_targets(model, self.target_modules, "method.init_args.target_modules", head)
        freeze_except_head(model, head)
        for name, module in targets.items():
            check_rank(self.bottleneck, module, name, "method.init_args.bottleneck")
            wrapped = HoulsbyWrapped(module, linear_in_out(module)[1], self.bottleneck)
            weight = base_weight(module)
            replace_module(model, name, wrapped.to(weight.device, weight.dtype))
        return model
