"""Strategy checks and collectives shared by the callbacks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import MisconfigurationException


def refuse_fsdp(trainer: L.Trainer, message: str) -> None:
    """Raise ``message`` when the trainer shards weights with FSDP (the callback needs whole matrices)."""
    if "FSDP" in type(trainer.strategy).__name__:
        raise MisconfigurationException(message)


def log_directory(trainer: L.Trainer) -> Path:
    """The run's log folder. ``Trainer.log_dir`` broadcasts from rank 0, so every rank must call this
    (not only the one that writes), or a multi-process run waits forever."""
    return Path(trainer.log_dir or trainer.default_root_dir)
