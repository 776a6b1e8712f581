"""SpectrumMonitor: spectra compared against known transformations; the callback on a user module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForSequenceClassification

from spec_lightning import SpectrumMonitor
from spec_lightning.analysis.specialisation import read_rows
from spec_lightning.analysis.spectrum import compare, effective_weight, spectrum


def test_compare_against_known_changes() -> None:
    torch.manual_seed(0)
    w = torch.randn(12, 8)
    ref = spectrum(w, 4)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    doubled = w + s[0] * torch.outer(u[:, 0], vh[0])  # σ_0 -> 2 σ_0, vectors unchanged
    rows = compare("end", 5, "w", ref, spectrum(doubled, 4))
    assert rows[0]["sigma"] == pytest.approx(2 * rows[0]["sigma_ref"], rel=1e-5)
    assert all(r["sigma"] == pytest.approx(r["sigma_ref"], rel=1e-5) for r in rows[1:])
    assert all(r["cos_u"] == pytest.approx(1.0, abs=1e-5) for r in rows[:4])
    q, _ = torch.linalg.qr(torch.randn(12, 12))  # W' = Q W: same σ, U' = Q U, V' = V
    rows = compare("end", 5, "w", ref, spectrum(q @ w, 4))
    expected_cos_u = (ref.U * (q @ ref.U)).sum(0).abs()
    torch.testing.assert_close(
        torch.tensor([r["cos_u"] for r in rows[:4]]), expected_cos_u, atol=1e-4, rtol=0
    )
    assert all(r["cos_v"] == pytest.approx(1.0, abs=1e-4) for r in rows[:4])
    assert rows[5]["cos_u"] == ""  # beyond the top-k


def test_effective_weight_of_a_peft_layer_is_the_merged_weight(tiny_bert: str) -> None:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"]))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    current = effective_weight(layer).clone()
    merged = model.merge_and_unload().bert.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(current, merged)


class Regression(L.LightningModule):
    """A user-style module with two plain linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 10)
        self.decoder = nn.Linear(10, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.decoder(self.encoder(x)).squeeze(-1), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 6, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1) * 3), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_monitor_on_a_user_module_snapshots_and_restores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = SpectrumMonitor(target_modules=["encoder"], top_k=3, every_n_epochs=1)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[monitor],
    )
    trainer.fit(Regression())
    log_dir = Path(trainer.log_dir)
    rows = read_rows(log_dir / "spectrum.csv")
    assert [r["stage"] for r in rows[::6]] == ["start", "epoch0", "epoch1", "end"]
    start, end = rows[:6], rows[-6:]
    assert all(float(r["sigma"]) == float(r["sigma_ref"]) for r in start)
    assert all(float(r["cos_u"]) == pytest.approx(1.0, abs=1e-5) for r in start[:3])
    assert any(abs(float(r["sigma"]) - float(r["sigma_ref"])) > 1e-3 for r in end)
    assert (log_dir / "spectrum_end.png").stat().st_size > 0

    restored = SpectrumMonitor(target_modules=["encoder"], top_k=3)
    restored.load_state_dict(monitor.state_dict())
    assert torch.equal(restored.reference["encoder"].U, monitor.reference["encoder"].U)
    assert restored.rows == monitor.rows


def test_monitor_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(L.pytorch.utilities.exceptions.MisconfigurationException, match="non-empty list"):
        SpectrumMonitor(target_modules="query")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[SpectrumMonitor(target_modules=["query"])],
        default_root_dir=tmp_path,
    )
    with pytest.raises(
        L.pytorch.utilities.exceptions.MisconfigurationException, match=r"match no weight matrix"
    ):
        trainer.fit(Regression())
