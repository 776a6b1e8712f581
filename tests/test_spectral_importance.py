"""Fisher-weighted spectral importance: the maths against finite differences, and the callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spec_lightning import GLUEDataModule, LoRSA, SequenceClassificationModule, SpectralImportance
from spec_lightning.analysis.specialisation import read_rows
from spec_lightning.methods.lorsa.method import lorsa_layers
from spec_lightning.methods.targets import weight_matrix
from spec_lightning.spectral import allocate_components
from spec_lightning.spectral.importance import SigmaFisher

SENTENCES = [
    "the movie was good",
    "the plot was very bad not fine",
    "awful",
    "great fine movie",
    "poor",
    "not bad",
]
LABELS = torch.tensor([1, 0, 0, 1, 0, 1])


def lorsa_bert(path: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    LoRSA(target_modules=["query", "value"], num_components=4, rank=2).apply(model, head=["classifier"])
    return model.double().eval()


def per_sample_losses(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits, LABELS, reduction="none")


def test_fisher_scores_match_finite_differences(tiny_bert: str) -> None:
    """I_i = σ_i² · mean_b (∂ℓ_b/∂σ_i)², with ∂ℓ_b/∂σ_i from central differences of W + ε u_i v_iᵀ."""
    model = lorsa_bert(tiny_bert)
    inputs = AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES, padding=True, return_tensors="pt")
    layers = lorsa_layers(model)
    spectra = {name: layer.candidate_spectrum() for name, layer in layers.items()}
    fisher = SigmaFisher(layers, spectra, loss_reduction="mean")
    with fisher.recording():
        for part in (slice(0, 4), slice(4, 6)):  # two batches of different sizes
            batch = {k: v[part] for k, v in inputs.items()}
            logits = model(**batch).logits
            torch.nn.functional.cross_entropy(logits, LABELS[part]).backward()
    scores = fisher.scores()

    name = "bert.encoder.layer.1.attention.self.value"
    weight, (u, s, v), eps = weight_matrix(layers[name].base), spectra[name], 1e-5
    for i in (0, 3, 17):
        step = eps * torch.outer(u[:, i], v[:, i]).double()
        with torch.no_grad():
            weight += step
            up = per_sample_losses(model, inputs)
            weight -= 2 * step
            down = per_sample_losses(model, inputs)
            weight += step
        expected = s[i].double() ** 2 * ((up - down) / (2 * eps)).pow(2).mean()
        torch.testing.assert_close(scores[name][i].double(), expected, rtol=2e-3, atol=1e-10)


def test_fisher_sums_added_over_processes_give_the_scores_of_all_their_batches(tiny_bert: str) -> None:
    """Two ranks each score their own batch; ``add`` with the sum over both (here: this rank's plus
    the other's) gives the scores of one process that saw both batches."""
    model = lorsa_bert(tiny_bert)
    inputs = AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES, padding=True, return_tensors="pt")
    layers = lorsa_layers(model)
    spectra = {name: layer.candidate_spectrum() for name, layer in layers.items()}

    def scored(parts: list[slice]) -> SigmaFisher:
        fisher = SigmaFisher(layers, spectra, loss_reduction="mean")
        with fisher.recording():
            for part in parts:
                logits = model(**{k: v[part] for k, v in inputs.items()}).logits
                torch.nn.functional.cross_entropy(logits, LABELS[part]).backward()
        return fisher

    first, second, both = scored([slice(0, 4)]), scored([slice(4, 6)]), scored([slice(0, 4), slice(4, 6)])
    names = list(second.sum_sq)
    other = torch.cat(
        [
            *(second.sum_sq[n].double() for n in names),
            torch.tensor([float(second.samples[n]) for n in names], dtype=torch.float64),
        ]
    )
    first.add(lambda flat: flat + other)
    assert first.samples == both.samples == dict.fromkeys(names, 6)
    for name, value in both.scores().items():
        torch.testing.assert_close(first.scores()[name], value, rtol=1e-5, atol=1e-12)


def test_allocation_per_layer_and_global() -> None:
    scores = {"a": torch.tensor([5.0, 1.0, 4.0, 0.1]), "b": torch.tensor([0.2, 0.3, 0.01, 9.0])}
    per_layer = allocate_components(scores, {"a": 2, "b": 2}, "per_layer")
    assert per_layer["a"].tolist() == [0, 2] and per_layer["b"].tolist() == [1, 3]
    spent = allocate_components(scores, {"a": 2, "b": 2}, "global")
    assert spent["a"].tolist() == [0, 1, 2] and spent["b"].tolist() == [3]  # 9, 5, 4, then 1 > 0.3
    lopsided = {"a": torch.tensor([9.0, 8.0, 7.0]), "b": torch.tensor([0.1, 0.2, 0.3])}
    assert allocate_components(lopsided, {"a": 2, "b": 2}, "global")["b"].tolist() == [2]  # at least one each


def fit(
    module: L.LightningModule,
    root: Path,
    callback: SpectralImportance,
    data: L.LightningDataModule | None,
    **kw,
) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(root),
        enable_progress_bar=False,
        callbacks=[callback, ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)],
    )
    trainer.fit(module, datamodule=data, **kw)
    return trainer


def test_callback_selects_saves_and_resumes(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    def module() -> SequenceClassificationModule:
        return SequenceClassificationModule(tiny_bert, LoRSA(num_components=3, rank=2), learning_rate=1e-2)

    def data() -> GLUEDataModule:
        return GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)

    first = module()
    callback = SpectralImportance(num_samples=32, batch_size=8, budget="global")
    trainer = fit(first, tmp_path / "a", callback, data())
    layers = lorsa_layers(first)
    assert sum(len(ix) for ix in callback.selected.values()) == 3 * len(layers)
    assert {n: layer.index.tolist() for n, layer in layers.items()} == {
        n: ix.tolist() for n, ix in callback.selected.items()
    }
    assert any(len(ix) != 3 for ix in callback.selected.values()), (
        "a global budget should differ per layer here"
    )
    for name, index in callback.selected.items():
        assert set(index.tolist()) <= set(callback.scores[name].topk(len(index)).indices.tolist())

    log_dir = Path(trainer.log_dir)
    rows = read_rows(log_dir / "spectral_importance.csv")
    assert len(rows) == 32 * len(layers) and sum(int(r["selected"]) for r in rows) == 3 * len(layers)
    assert rows[0]["task"] == "sst2" and (log_dir / "spectral_importance.png").stat().st_size > 0
    ckpt = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("SpectralImportance"))
    assert all(torch.equal(saved["selected"][n], ix) for n, ix in callback.selected.items())

    resumed = module()
    other = SpectralImportance(num_samples=16, batch_size=8, budget="global", seed=99)  # another S afresh
    fit(resumed, tmp_path / "b", other, data(), ckpt_path=str(tmp_path / "a" / "ckpt" / "last.ckpt"))
    assert {n: layer.index.tolist() for n, layer in lorsa_layers(resumed).items()} == {
        n: ix.tolist() for n, ix in callback.selected.items()
    }
    assert all(torch.equal(other.selected[n], ix) for n, ix in callback.selected.items())


class UserModule(L.LightningModule):
    """A plain, user-written module: not spec_lightning's, with its own loop and logging."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.net = lorsa_bert(path).float().train()
        enc = AutoTokenizer.from_pretrained(path)(SENTENCES * 4, padding=True, return_tensors="pt")
        self.rows = [
            {"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], LABELS.repeat(4), strict=True)
        ]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss = self.net(**batch).loss
        self.log("loss", loss)
        return {"loss": loss}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_callback_works_on_a_user_module_and_names_a_short_calibration_set(
    tiny_bert: str, tmp_path: Path
) -> None:
    user = UserModule(tiny_bert)
    callback = SpectralImportance(num_samples=12, batch_size=5, task="toy")
    fit(user, tmp_path, callback, None)
    assert {n: layer.index.tolist() for n, layer in lorsa_layers(user).items()} == {
        n: ix.tolist() for n, ix in callback.selected.items()
    }
    with pytest.raises(
        ValueError, match=r"calibration set is smaller than requested: .* 24 examples, num_samples=25"
    ):
        fit(UserModule(tiny_bert), tmp_path / "short", SpectralImportance(num_samples=25), None)


def test_callback_needs_adaptable_layers(tmp_path: Path, tiny_bert: str) -> None:
    user = UserModule(tiny_bert)
    user.net = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    with pytest.raises(
        L.pytorch.utilities.exceptions.MisconfigurationException, match="use it with a method"
    ):
        fit(user, tmp_path, SpectralImportance(num_samples=4), None)


def test_calibration_batches_follow_the_training_loader_unless_set() -> None:
    """By default the scoring pass batches as training does (a larger calibration batch raised a 1B
    decoder's peak memory by 3.5 GiB over training's); an explicit batch_size wins; a loader without a
    batch size gives 16."""
    rows = list(range(24))
    loader = DataLoader(rows, batch_size=4)

    def sizes(callback: SpectralImportance) -> list[int]:
        return [len(batch) for batch in callback._calibration_batches(None, None)]  # type: ignore[arg-type]

    assert sizes(SpectralImportance(num_samples=12, calibration_dataloader=loader)) == [4, 4, 4]
    assert sizes(SpectralImportance(num_samples=12, calibration_dataloader=lambda: loader)) == [4, 4, 4]
    assert sizes(SpectralImportance(num_samples=12, batch_size=5, calibration_dataloader=loader)) == [5, 5, 2]
    unbatched = DataLoader(rows, batch_size=None)
    assert sizes(SpectralImportance(num_samples=20, calibration_dataloader=unbatched)) == [16, 4]
    with pytest.raises(L.pytorch.utilities.exceptions.MisconfigurationException, match="batch_size"):
        SpectralImportance(batch_size=0)
