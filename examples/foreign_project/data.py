"""The project's own data: token sequences labelled by whether token 1 outnumbers token 2."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def loaders(
    examples: int = 512, length: int = 12, batch_size: int = 16, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """(train, validation) loaders over ``examples`` and ``examples // 4`` sequences."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (examples + examples // 4, length), generator=generator)
    labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
    train = TensorDataset(tokens[:examples], labels[:examples])
    validation = TensorDataset(tokens[examples:], labels[examples:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(validation, batch_size=batch_size),
    )
