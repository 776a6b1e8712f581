"""The base of the adapters' fused autograd functions (LoRSA's and SpecLoRA's): a hand-written backward
that runs under the autocast state its forward saw."""

from __future__ import annotations

from typing import Any

import torch


class AutocastReplayFunction(torch.autograd.Function):
    """An autograd function whose ``_backward(ctx, grad)`` runs under its forward's autocast state, as
    ``torch.amp.custom_bwd`` does but for the device of the input instead of one fixed where the class is
    defined, so the backward's matmuls take the forward's dtypes. ``forward`` calls
    :meth:`save_autocast`."""

    @staticmethod
    def save_autocast(ctx: Any, x: torch.Tensor) -> None:
        """Record the autocast state of ``x``'s device type for the backward."""
        ctx.device_type = x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)

    @classmethod
    def backward(cls, ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            return cls._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError
