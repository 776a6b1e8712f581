"""Singular spectra and singular-vector alignment of chosen weight matrices during fitting."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from spec_lightning._lightning import callbacks_of
from spec_lightning.analysis.specialisation import write_rows
from spec_lightning.analysis.spectrum import (
    FIELDS,
    Spectrum,
    compare,
    effective_weight,
    has_weight_matrix,
    spectrum,
    spectrum_figure,
)
from spec_lightning.callbacks.strategy import KeyedCallback, log_directory, publish_figure, refuse_fsdp1
from spec_lightning.distributed import by_unit
from spec_lightning.naming import matches

#: Default targets, tried in order: BERT-style names, then Llama/GPT-style ones.
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",))


class SpectrumMonitor(KeyedCallback):
    """Track how fine-tuning changes the spectra of weight matrices (the analysis behind SpecLoRA).

    At fit start the monitor takes the exact SVD of each matched matrix as the reference; at fit
    end, and every ``every_n_epochs`` epochs, it compares the current weights with it: σ_i
    against σ_i', and |⟨u_i, u_i'⟩|, |⟨v_i, v_i'⟩| for the top-``top_k`` pairs. Each snapshot is
    logged to TensorBoard as a figure and saved as ``spectrum_<stage>.png``; all snapshots go to
    ``spectrum.csv`` in the log dir (``<name>.csv``, ``<name>_<stage>.png`` and TensorBoard tags
    ``<name>/<stage>`` with a ``name``; several monitors in one Trainer without names get one
    from their targets, and each keeps its own state in the checkpoint). The current weight is
    read from a layer's ``effective_weight()`` (spec_lightning's layers), from peft's
    ``get_base_layer()`` + ``get_delta_weight()``, or from a plain ``nn.Linear``/``Conv1D``, so
    it works on any LightningModule. The reference and the snapshots are kept in the checkpoint,
    so a resumed run compares with the original weights. Global rank 0 computes the spectra; under
    FSDP2 (``ModelParallelStrategy``) every rank takes part in gathering each matrix's FSDP2 unit, one
    unit at a time.

    Example::

        trainer = L.Trainer(callbacks=[SpectrumMonitor(target_modules=["query", "value"], every_n_epochs=1)])

    Args:
        target_modules: dotted name suffixes of the matrices to monitor; None: ``query``/``value``,
            else ``q_proj``/``v_proj``, else ``c_attn``, whichever the model has.
        top_k: singular-vector pairs compared per matrix.
        every_n_epochs: also snapshot after every N-th training epoch (0: start and end only).
        name: prefix of the files and TensorBoard tags (default ``spectrum``).
    """

    def __init__(
        self,
        target_modules: Sequence[str] | None = None,
        top_k: int = 16,
        every_n_epochs: int = 0,
        name: str | None = None,
    ) -> None:
        if target_modules is not None and (isinstance(target_modules, str) or not target_modules):
            raise MisconfigurationException(
                f"SpectrumMonitor: target_modules must be a non-empty list of names, got {target_modules!r}"
            )
        if top_k < 1 or every_n_epochs < 0:
            raise MisconfigurationException(
                f"SpectrumMonitor: need top_k >= 1 and every_n_epochs >= 0, got {top_k} and {every_n_epochs}"
            )
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise MisconfigurationException(
                f"SpectrumMonitor: name {name!r} becomes a file name; use letters, digits, '_', '-' or '.'"
            )
        self.target_modules = None if target_modules is None else list(target_modules)
        self.top_k = top_k
        self.every_n_epochs = every_n_epochs
        self.name = name
        self.prefix = name or "spectrum"
        self.reference: dict[str, Spectrum] = {}
        self.rows: list[dict[str, object]] = []

    def key_arguments(self) -> Mapping[str, Any]:
        return {"target_modules": self.target_modules, "top_k": self.top_k, "name": self.name}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        refuse_fsdp1(trainer, "SpectrumMonitor")
        monitors = [c for c in callbacks_of(trainer) if isinstance(c, SpectrumMonitor)]
        if self.name is None and len(monitors) > 1:
            targets = self.target_modules or ["default"]
            self.prefix = "spectrum_" + "_".join(re.sub(r"[^A-Za-z0-9_.-]", "-", t) for t in targets)

    def _targets(self, pl_module: L.LightningModule) -> dict[str, Any]:
        candidates = [self.target_modules] if self.target_modules is not None else DEFAULT_TARGETS
        for patterns in candidates:
            found = {
                name: m
                for name, m in pl_module.named_modules()
                if has_weight_matrix(m) and any(matches(name, p) for p in patterns)
            }
            if found:
                return found
        raise MisconfigurationException(
            f"SpectrumMonitor: target_modules {self.target_modules or list(DEFAULT_TARGETS)} match no weight "
            f"matrix of {type(pl_module).__name__}; use dotted name suffixes such as 'attention.self.query'."
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reference:  # resumed: the reference came from the checkpoint
            return
        directory = log_directory(trainer)
        spectra = self._spectra(trainer, pl_module)
        if trainer.is_global_zero:
            self.reference = spectra
            self._snapshot(trainer, pl_module, "start", directory, spectra)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            directory = log_directory(trainer)
            spectra = self._spectra(trainer, pl_module)
            if trainer.is_global_zero:
                self._snapshot(trainer, pl_module, f"epoch{epoch}", directory, spectra)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = log_directory(trainer)
        spectra = self._spectra(trainer, pl_module)
        if trainer.is_global_zero:
            self._snapshot(trainer, pl_module, "end", directory, spectra)

    def _spectra(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Spectrum]:
        """The current spectra of the targets, on global rank 0 (empty elsewhere). Every rank must call
        it: under FSDP2 the weights are gathered one FSDP2 unit at a time (a collective), so memory
        holds one unit's whole matrices, never the whole model."""
        targets = self._targets(pl_module)
        spectra: dict[str, Spectrum] = {}
        with torch.no_grad():
            for names in by_unit(pl_module, targets):
                if trainer.is_global_zero:
                    spectra |= {n: spectrum(effective_weight(targets[n]), self.top_k) for n in names}
        return spectra

    def _snapshot(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        stage: str,
        directory: Path,
        spectra: Mapping[str, Spectrum],
    ) -> None:
        rows = []
        for name, now in spectra.items():
            rows += compare(stage, trainer.global_step, name, self.reference[name], now)
        self.rows += rows
        write_rows(self.rows, directory / f"{self.prefix}.csv", FIELDS)
        fig = spectrum_figure(rows, f"{stage} (step {trainer.global_step})")
        publish_figure(
            trainer,
            fig,
            directory / f"{self.prefix}_{stage}.png",
            f"{self.prefix}/{stage}",
            trainer.global_step,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": {name: tuple(s) for name, s in self.reference.items()}, "rows": self.rows}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = {name: Spectrum(*s) for name, s in state_dict["reference"].items()}
        self.rows = list(state_dict["rows"])
