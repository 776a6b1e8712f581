"""The project's own model: a small pre-norm transformer classifier, and its LightningModule.

Nothing here imports spec_lightning: its layers have their own names (``layers.<i>.attn.q_proj``,
``layers.<i>.mlp.fc1``, an output layer ``head``), its batches are ``(tokens, labels)`` tuples, and its
optimiser takes whatever requires a gradient when ``configure_optimizers`` runs.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = Attention(width, heads), MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token embeddings, ``depth`` blocks, mean pooling and a linear ``head``."""

    def __init__(
        self, vocab: int = 16, width: int = 32, heads: int = 4, depth: int = 3, classes: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


class TextClassifier(L.LightningModule):
    """Cross-entropy training of ``self.net``; accuracy on validation batches."""

    def __init__(self, lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = TinyTransformer()
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self.net(tokens), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        tokens, labels = batch
        self.log("val_acc", (self.net(tokens).argmax(-1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def probe(
    module: TextClassifier, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """ModuleSearch's probe for this project: (mean loss, a score where higher is better)."""
    tokens, labels = batch
    logits = module.net(tokens)
    return F.cross_entropy(logits, labels), logits.detach().softmax(-1).gather(-1, labels[:, None]).mean()
