"""Reading checkpoint files safely: tensors and plain values only, never code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU: a file that holds anything but tensors and
    plain Python values (a pickled object, which could run code on load) is refused.

    Raises:
        FileNotFoundError: no file at ``path``.
        pickle.UnpicklingError: the file holds objects that ``weights_only`` loading refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the .ckpt file that fit wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run "
            f"code when unpickled (torch.load weights_only=True said: {str(error).splitlines()[0]}). "
            "spec_lightning's checkpoints never do; load only checkpoints you trust."
        ) from error
