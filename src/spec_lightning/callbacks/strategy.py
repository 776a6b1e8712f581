"""What the callbacks share: strategy checks, the log folder (a collective) and figure output."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from matplotlib.figure import Figure


def refuse_fsdp(trainer: L.Trainer, message: str) -> None:
    """Raise ``message`` when the trainer shards weights, with FSDP (``FSDPStrategy``) or FSDP2 / tensor
    parallelism (``ModelParallelStrategy``): the callback needs whole matrices."""
    if "FSDP" in type(trainer.strategy).__name__ or isinstance(trainer.strategy, ModelParallelStrategy):
        raise MisconfigurationException(message)


def log_directory(trainer: L.Trainer) -> Path:
    """The run's log folder. ``Trainer.log_dir`` broadcasts from rank 0, so every rank must call this
    (not only the one that writes), or a multi-process run waits forever."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def publish_figure(trainer: L.Trainer, fig: Figure, path: Path, tag: str, step: int) -> None:
    """Save ``fig`` to ``path``, add it to every logger that takes figures (TensorBoard) as ``tag`` at
    ``step``, and close it. Rank 0 only: take ``path`` from :func:`log_directory` on every rank first."""
    fig.savefig(path, dpi=120)
    for logger in trainer.loggers:
        if hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure(tag, fig, global_step=step)
    plt.close(fig)
