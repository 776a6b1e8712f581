"""Capturing and restoring every random generator a training step draws from.

States are kept as tensors and plain Python values so that checkpoints load with
``torch.load(weights_only=True)``, as Lightning loads them on resume.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def get_rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (where present) CUDA generators."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states taken by :func:`get_rng_states`."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # the tuple form, not a dict
    return (
        str(kind),
        torch.from_numpy(np.asarray(keys).astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )
