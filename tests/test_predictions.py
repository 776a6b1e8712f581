"""ValidationPredictions on a module that knows nothing of spec_lightning."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from spec_lightning import ValidationPredictions


class Classifier(L.LightningModule):
    """Three classes from 4 features, dict batches with ``labels``; ``validation_step`` returns the argmax."""

    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.returns = returns
        generator = torch.Generator().manual_seed(2)
        self.x = torch.randn(40, 4, generator=generator)
        self.y = self.x[:, :3].argmax(1)

    def loader(self) -> DataLoader:
        rows = [{"x": x, "labels": y} for x, y in zip(self.x, self.y, strict=True)]
        return DataLoader(rows, batch_size=6)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch["x"]), batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        predictions = self.net(batch["x"]).argmax(-1)
        return None if self.returns == "nothing" else predictions

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        return self.loader()

    def val_dataloader(self) -> DataLoader:
        return self.loader()


def fit(module: L.LightningModule, folder: Path, epochs: int = 2) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[ValidationPredictions(dirpath=str(folder))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.fit(module)


def test_the_file_holds_the_last_validations_prediction_of_every_example(tmp_path: Path) -> None:
    module = Classifier()
    fit(module, tmp_path)
    with np.load(tmp_path / "predictions.npz") as saved:
        predictions, labels = saved["predictions"], saved["labels"]
    with torch.no_grad():
        expected = module.net(module.x).argmax(-1).numpy()  # the trained model, all 40 examples in order
    np.testing.assert_array_equal(predictions, expected)
    np.testing.assert_array_equal(labels, module.y.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.npz"]  # no staging file left


def test_a_module_that_returns_no_predictions_is_named_once(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Classifier(returns="nothing"), tmp_path)
    said = [str(w.message) for w in caught if "ValidationPredictions" in str(w.message)]
    assert len(said) == 1 and "Classifier.validation_step returns no predictions tensor" in said[0]
    assert not (tmp_path / "predictions.npz").exists()
