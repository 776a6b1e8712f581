"""BitFit (Ben Zaken et al., 2022): train the bias terms only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from spec_lightning.methods.base import FineTuningMethod, freeze_except_head


class BitFit(FineTuningMethod):
    """Train only biases: W' = W, b' = b + Δb (plus the task head).

    Args:
        bias_names: parameter-name suffixes that count as biases.
    """

    def __init__(self, bias_names: Sequence[str] = ("bias",)) -> None:
        self.bias_names = tuple(bias_names)

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        freeze_except_head(model, head)
        biases = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in self.bias_names]
        if not biases:
            raise ValueError(
                f"BitFit: no parameter named {self.bias_names} in {type(model).__name__}; "
                "set method.init_args.bias_names to the model's bias parameter names."
            )
        for p in biases:
            p.requires_grad_(True)
        return model
