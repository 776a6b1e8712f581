"""Strategy checks shared by the callbacks."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities.exceptions import MisconfigurationException


def refuse_fsdp(trainer: L.Trainer, message: str) -> None:
    """Raise ``message`` when the trainer shards weights with FSDP (the callback needs whole matrices)."""
    if "FSDP" in type(trainer.strategy).__name__:
        raise MisconfigurationException(message)
