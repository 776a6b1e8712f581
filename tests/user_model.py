"""A LightningModule written the way a user would, knowing nothing of spec_lightning."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class LayerStack(L.LightningModule):
    """Four blocks of two linear layers (``blocks.{i}.fc1``, ``blocks.{i}.fc2``) and a regression head."""

    def __init__(self, width: int = 6, depth: int = 4, batch_size: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(width, width), "fc2": nn.Linear(width, width)})
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)
        self.batch_size, self.lr = batch_size, lr
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, width, generator=generator)
        self.y = self.x.sum(1).sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block["fc2"](torch.tanh(block["fc1"](x))))
        return self.head(x).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


def probe_step(
    self: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's answer to ModuleSearch's Probeable: (mean loss, a score where higher is better)."""
    x, y = batch
    loss = F.mse_loss(self(x), y)
    return loss, -loss.detach()


class BackboneClassifier(L.LightningModule):
    """A user's own module for the CLI's protocol: ``backbone``, ``task`` and ``num_labels`` arguments,
    dict batches with ``labels``; the rest is plain Lightning."""

    def __init__(self, backbone: str, task: str = "sst2", num_labels: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.save_hyperparameters()
        self.net = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=num_labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.net(**batch).loss
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.net(**batch)
        self.log("val_accuracy", (out.logits.argmax(-1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
