"""The bottleneck adapter module, pure torch."""

from __future__ import annotations

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """h ↦ h + W_up σ(W_down h + b_down) + b_up, with W_up = 0 and b_up = 0 at init (identity).

    Args:
        features: width d of the hidden state h.
        bottleneck: width of the bottleneck (d → bottleneck → d).
    """

    def __init__(self, features: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, bottleneck)
        self.up = nn.Linear(bottleneck, features)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class HoulsbyWrapped(nn.Module):
    """A frozen projection followed by an adapter: y = adapter(base(x))."""

    def __init__(self, base: nn.Module, features: int, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.adapter = BottleneckAdapter(features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))
