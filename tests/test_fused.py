"""AutocastReplayFunction: the backward sees the autocast state of its forward, wherever it is called."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from spec_lightning.methods.fused import AutocastReplayFunction


class _Recording(AutocastReplayFunction):
    """y = 2 x; the backward records the autocast state it runs under."""

    seen: list[tuple[bool, torch.dtype]] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        AutocastReplayFunction.save_autocast(ctx, x)
        return 2 * x

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _Recording.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return (2 * grad,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_backward_replays_the_forwards_autocast(dtype: torch.dtype) -> None:
    x = torch.ones(3, requires_grad=True)
    _Recording.seen.clear()
    with torch.autocast("cpu", dtype=dtype):
        y = _Recording.apply(x)
    y.sum().backward()  # called outside autocast
    assert _Recording.seen == [(True, dtype)]
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_without_autocast_the_backward_runs_without_it() -> None:
    x = torch.ones(3, requires_grad=True)
    _Recording.seen.clear()
    y = _Recording.apply(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward called inside autocast does not take it
        y.sum().backward()
    assert [enabled for enabled, _ in _Recording.seen] == [False]
