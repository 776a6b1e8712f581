"""Divergence of a run's training loss: a learning rate far too high seldom produces NaN (the loss
settles at a high finite value), so the finite-loss check never fires and a run that did not learn
would be told to *raise* its learning rate. :class:`LossTrend` compares the task loss of the fit's
first step (computed with the starting weights, before any update) with the mean over the last
:data:`WINDOW` steps, kept on the device (no host sync per step), and names a rise of more than
:data:`RISE` times as divergence. A healthy run's loss falls below its start; one that diverges
within its first few steps (the usual case at a far too high rate) stays far above it."""

from __future__ import annotations

from collections import deque

import torch

#: Steps averaged at the end of a run.
WINDOW = 10
#: A final mean loss above this multiple of the first step's is divergence.
RISE = 1.5


class LossTrend:
    """The first and the latest :data:`WINDOW` task losses of a fit (detached, on their device)."""

    def __init__(self) -> None:
        self.first: torch.Tensor | None = None
        self.last: deque[torch.Tensor] = deque(maxlen=WINDOW)
        self.steps = 0

    def record(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if self.first is None:
            self.first = loss
        self.last.append(loss)
        self.steps += 1

    def means(self) -> tuple[float, float] | None:
        """(the first step's loss, the mean of the last WINDOW); None before WINDOW + 1 steps."""
        if self.first is None or self.steps <= WINDOW:
            return None
        return float(self.first), float(torch.stack(list(self.last)).float().mean())

    def diverged(self) -> str | None:
        """A sentence saying how the loss rose, if it rose more than RISE times; else None."""
        means = self.means()
        if means is None:
            return None
        start, end = means
        if not (end > RISE * start and end > start):  # also False for NaN
            return None
        return (
            f"the training loss rose from {start:.4g} (the first step's) to {end:.4g} (mean of the last "
            f"{WINDOW} steps): the run diverged"
        )

    def warning(self, learning_rate: float) -> str | None:
        """The fit-end warning of a diverged run, with the fix; None if it did not diverge."""
        diverged = self.diverged()
        if diverged is None:
            return None
        return (
            f"{diverged}. Lower model.init_args.learning_rate (now {learning_rate:g}), e.g. to "
            f"{learning_rate / 10:g}; with the rate right, warm-up (model.init_args.warmup_ratio) or "
            "gradient clipping (trainer.gradient_clip_val) can also help."
        )
