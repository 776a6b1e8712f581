"""Calibration data: a fixed, seeded sample of the fit's training examples, for the steps that read data
before the optimiser exists (spectral importance scoring, data-driven adapter initialisation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Subset

from spec_lightning._lightning import datamodule_of


class ReadsCalibration(Protocol):
    """What :func:`apply_arguments` needs of a method: :meth:`~spec_lightning.methods.FineTuningMethod.
    calibration_sample` (every :class:`~spec_lightning.methods.FineTuningMethod` has it)."""

    def calibration_sample(self, loader: Callable[[], Iterable[Any]]) -> Iterable[Any] | None: ...


def apply_arguments(method: ReadsCalibration, trainer: L.Trainer | None) -> dict[str, Any]:
    """``{"calibration": batches}`` for ``method.apply`` when ``trainer`` is fitting and the method reads
    training data to initialise (:meth:`~spec_lightning.methods.FineTuningMethod.calibration_sample`);
    else nothing: outside a fit the trained state is loaded into the structure ``apply`` builds."""
    if trainer is None or trainer.state.fn != "fit":
        return {}
    name = type(method).__name__
    fix = f"give {name} calibration data in the fit"
    sample = method.calibration_sample(lambda: fit_train_loader(trainer, name, fix))
    return {} if sample is None else {"calibration": sample}


def fit_train_loader(trainer: L.Trainer, who: str, fix: str) -> Iterable[Any]:
    """The fit's training loader: the datamodule's, the one passed as ``trainer.fit(model,
    train_dataloaders=...)``, or the LightningModule's ``train_dataloader``.

    Raises:
        MisconfigurationException: the fit has no training loader; the message names ``who`` needs one
            and ``fix``, how to give it calibration data directly.
    """
    datamodule = datamodule_of(trainer)
    if datamodule is not None:
        return datamodule.train_dataloader()
    # Where trainer.fit(model, train_dataloaders=...) put its loaders (Lightning has no public accessor
    # before the fit loop starts, which is after the optimisers that calibration must precede).
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    raise MisconfigurationException(
        f"{who} has no calibration data: {fix}, or give the fit a training loader (a datamodule, "
        "trainer.fit(model, train_dataloaders=loader), or the LightningModule's train_dataloader)"
    )


def seeded_sample(
    loader: Iterable[Any] | Callable[[], Iterable[Any]],
    num_samples: int,
    batch_size: int,
    seed: int,
    who: str,
) -> Iterable[Any]:
    """``num_samples`` examples drawn without replacement, by a generator seeded with ``seed``, from a
    DataLoader's map-style dataset and batched by its collate function: the same sample in every run
    over the same data, whatever the global RNG state. A callable is called first; an iterable without
    a map-style dataset is used as given.

    Raises:
        ValueError: the dataset holds fewer than ``num_samples`` examples.
    """
    if callable(loader) and not isinstance(loader, DataLoader):
        loader = loader()
    if not isinstance(loader, DataLoader) or not isinstance(loader.dataset, Sized):
        return loader
    dataset = loader.dataset
    if len(dataset) < num_samples:
        raise ValueError(
            f"{who}: the calibration set is smaller than requested: the train split has {len(dataset)} "
            f"examples, num_samples={num_samples}. Lower num_samples."
        )
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator, device="cpu")[:num_samples].tolist()
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=loader.collate_fn)
