"""The Houlsby bottleneck adapter's formula, written out against torch's functional ops."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from spec_lightning.methods.houlsby.layer import BottleneckAdapter


def test_adapter_is_h_plus_the_bottleneck() -> None:
    """h ↦ h + W_up GELU(W_down h + b_down) + b_up, with random (non-zero) up-projection weights."""
    torch.manual_seed(0)
    adapter = BottleneckAdapter(features=6, bottleneck=3)
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
    h = torch.randn(2, 4, 6)
    down = h @ adapter.down.weight.T + adapter.down.bias
    expected = h + F.gelu(down) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(h), expected)
    fresh = BottleneckAdapter(features=6, bottleneck=3)
    torch.testing.assert_close(fresh(h), h)  # W_up = 0 and b_up = 0 at init: the identity
