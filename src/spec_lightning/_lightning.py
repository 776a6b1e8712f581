"""Typed access to what Lightning's annotations leave out: the one place where this project says a
library's types are narrower than what it does (STYLE.md, "Type checking").

``Trainer.callbacks``, ``Trainer.datamodule`` and ``Trainer.fast_dev_run`` are assigned by Lightning's
connectors outside ``Trainer``'s class body, so a type checker does not see them; ``LightningModule.hparams``
is annotated as a plain mapping although ``save_hyperparameters`` always stores an ``AttributeDict``."""

from __future__ import annotations

from typing import cast

import lightning as L
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.mixins import HyperparametersMixin


class TypedHyperparameters(HyperparametersMixin):
    """``hparams`` typed as what ``save_hyperparameters`` stores, an ``AttributeDict`` (read by
    attribute); a base of this project's LightningModules and DataModules."""

    @property
    def hparams(self) -> AttributeDict:
        """The saved constructor arguments, by attribute."""
        return cast(AttributeDict, super().hparams)


def callbacks_of(trainer: L.Trainer) -> list[Callback]:
    """``trainer.callbacks``, the list the trainer calls (a mutable list: callers may append to it)."""
    return cast(list[Callback], trainer.callbacks)  # type: ignore[attr-defined]


def set_callbacks(trainer: L.Trainer, callbacks: list[Callback]) -> None:
    """Replace ``trainer.callbacks``."""
    trainer.callbacks = callbacks  # type: ignore[attr-defined]


def datamodule_of(trainer: L.Trainer) -> L.LightningDataModule | None:
    """``trainer.datamodule``: the datamodule of the running fit/validate/test, or None."""
    return cast("L.LightningDataModule | None", trainer.datamodule)  # type: ignore[attr-defined]


def fast_dev_run_of(trainer: L.Trainer) -> int | bool:
    """``trainer.fast_dev_run``: False, or the number of batches a quick check runs."""
    return cast("int | bool", trainer.fast_dev_run)  # type: ignore[attr-defined]
