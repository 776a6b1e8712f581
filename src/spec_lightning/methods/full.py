"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from spec_lightning.methods.base import FineTuningMethod


class FullFineTuning(FineTuningMethod):
    """Update all parameters: θ ← θ − η ∇θ L. The reference every method is compared with."""

    parameter_efficient = False

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        model.requires_grad_(True)
        return model
