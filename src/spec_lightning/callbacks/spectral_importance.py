"""Fisher-weighted spectral importance scoring that chooses LoRSA's adapted components S."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, Protocol, runtime_checkable
from unittest.mock import patch

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader
from typing_extensions import override

from spec_lightning._lightning import callbacks_of
from spec_lightning.analysis.specialisation import selection_rows, specialisation_figure, write_rows
from spec_lightning.callbacks.strategy import (
    KeyedCallback,
    log_directory,
    publish_figure,
    refuse_fsdp1,
    sharding_mesh_of,
)
from spec_lightning.data.calibration import fit_train_loader, seeded_sample
from spec_lightning.distributed import by_unit
from spec_lightning.spectral import TopKSVD, allocate_components
from spec_lightning.spectral.importance import SigmaFisher


@runtime_checkable
class SpectralComponents(Protocol):
    """A layer that adapts a chosen subset of its weight's singular components (e.g. ``LoRSALinear``)."""

    @property
    def num_components(self) -> int: ...

    def candidate_spectrum(self) -> TopKSVD: ...

    def select_components(self, index: torch.Tensor, spectrum: TopKSVD) -> None: ...


#: The calibration batch size where neither the callback nor the calibration loader sets one.
CALIBRATION_BATCH = 16


class SpectralImportance(KeyedCallback):
    """Score the top-k singular components of every adaptable layer, then adapt the most important.

    I_i = σ_i² · E_x[(∂ℓ(x)/∂σ_i)²] over ``num_samples`` training examples (the calibration set,
    drawn with its own seeded generator), with per-sample derivatives from forward/backward hooks.
    S is the top-|S| per layer (``budget="per_layer"``) or the highest scores across layers for the
    same total (``budget="global"``, at least one per layer). Runs in ``setup("fit")``, before the
    optimiser exists, so |S| may change per layer; the model is built first by its
    ``configure_model`` hook, which Lightning requires to be idempotent.

    Works with any LightningModule whose ``training_step`` returns the loss (or ``{"loss":
    ...}``) of a calibration batch, and whose layers satisfy :class:`SpectralComponents`. The
    calibration batches come from ``calibration_dataloader`` if given, else from the training
    loader of the fit: the datamodule's, the one passed as ``trainer.fit(model,
    train_dataloaders=...)``, or the module's ``train_dataloader``. From a DataLoader over a
    map-style dataset, ``num_samples`` examples are drawn; an iterable without ``__len__`` (or
    the batches a callable returns) is used as given. Logging from ``training_step`` is muted
    during calibration. The scores and the chosen S are kept in the checkpoint (S also lives in
    the model's state), and ``spectral_importance.csv`` / ``.png`` (the specialisation figure)
    are written to the log dir. On resume the scoring pass runs again in ``setup`` and is then
    overwritten by the checkpoint.

    Example::

        trainer = L.Trainer(callbacks=[SpectralImportance(num_samples=256)])

    Args:
        num_samples: size of the calibration set.
        batch_size: calibration batch size; None: the training loader's (so the scoring pass needs no
            more activation memory than a training step: at 1B parameters a calibration batch of 4
            where training used 1 raised the run's peak by 3.5 GiB), else 16.
        budget: ``per_layer`` or ``global`` allocation of the adapted components.
        loss_reduction: how ``training_step`` reduces per-sample losses (``mean`` for HF models).
        seed: seed of the calibration sample.
        task: label of the specialisation figure; default ``pl_module.hparams.task`` if present.
        calibration_dataloader: the calibration data, a DataLoader or a callable that returns one (or
            any iterable of batches); None: the fit's training loader.
    """

    def __init__(
        self,
        num_samples: int = 256,
        batch_size: int | None = None,
        budget: Literal["per_layer", "global"] = "per_layer",
        loss_reduction: Literal["mean", "sum"] = "mean",
        seed: int = 0,
        task: str | None = None,
        calibration_dataloader: DataLoader | Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        if num_samples < 1 or (batch_size is not None and batch_size < 1):
            raise MisconfigurationException(
                "SpectralImportance: num_samples and batch_size must be >= 1, "
                f"got {num_samples} and {batch_size}"
            )
        if budget not in ("per_layer", "global"):
            raise MisconfigurationException(
                f"SpectralImportance: budget must be per_layer or global, got {budget!r}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.budget = budget
        self.loss_reduction = loss_reduction
        self.seed = seed
        self.task = task
        self.calibration_dataloader = calibration_dataloader
        self.scores: dict[str, torch.Tensor] = {}
        self.sigmas: dict[str, torch.Tensor] = {}
        self.selected: dict[str, torch.Tensor] = {}

    def key_arguments(self) -> Mapping[str, Any]:
        # Not the calibration arguments: a resumed run restores the selection whatever they are now.
        return {"budget": self.budget}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_fsdp1(trainer, "SpectralImportance")
        pl_module.configure_model()
        layers = {name: m for name, m in pl_module.named_modules() if isinstance(m, SpectralComponents)}
        if not layers:
            callbacks = callbacks_of(trainer)
            later = [c for c in callbacks[callbacks.index(self) + 1 :] if hasattr(c, "method")]
            if any(type(c).__name__ == "ApplyMethod" for c in later):
                raise MisconfigurationException(
                    "SpectralImportance runs before ApplyMethod in the Trainer's callbacks, so the method's "
                    "layers do not exist yet: list ApplyMethod first (callbacks run in list order)."
                )
            raise MisconfigurationException(
                "SpectralImportance found no layer with selectable spectral components: use it with a method "
                "such as spec_lightning.LoRSA."
            )
        sharded = sharding_mesh_of("SpectralImportance", pl_module.parameters()) is not None
        if sharded and self.budget == "global":
            raise MisconfigurationException(
                "SpectralImportance(budget='global') under FSDP2: a global budget changes |S| per layer, "
                "so the adapted parameters would be replaced after FSDP2 has sharded them. Use "
                "budget='per_layer' (the parameters keep their shapes), or DDP."
            )
        pl_module.to(trainer.strategy.root_device)
        spectra = self._spectra(trainer, pl_module, layers)
        self.scores = self._score(trainer, pl_module, layers, spectra)
        sizes = {name: layer.num_components for name, layer in layers.items()}
        selected = trainer.strategy.broadcast(allocate_components(self.scores, sizes, self.budget), src=0)
        self.selected = {name: index.cpu() for name, index in selected.items()}
        self.sigmas = {name: s.S.cpu() for name, s in spectra.items()}
        for name, layer in layers.items():
            layer.select_components(self.selected[name], spectra[name])
        self._report(trainer, pl_module)

    def _spectra(
        self, trainer: L.Trainer, pl_module: L.LightningModule, layers: dict[str, SpectralComponents]
    ) -> dict[str, TopKSVD]:
        """Every layer's candidate spectrum, computed once on rank 0 (under FSDP2 while its weights are
        gathered, one FSDP2 unit at a time) and broadcast: singular vectors are defined up to sign, so
        ranks must not compute their own."""
        spectra: dict[str, TopKSVD] = {}
        for names in by_unit(pl_module, layers):
            if trainer.is_global_zero:
                spectra |= {n: TopKSVD(*(t.cpu() for t in layers[n].candidate_spectrum())) for n in names}
        spectra = trainer.strategy.broadcast(spectra, src=0)
        device = trainer.strategy.root_device
        return {n: TopKSVD(*(t.to(device) for t in spectrum)) for n, spectrum in spectra.items()}

    def _score(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        layers: Mapping[str, SpectralComponents],
        spectra: dict[str, TopKSVD],
    ) -> dict[str, torch.Tensor]:
        """I_i per layer. With several processes rank r scores the calibration batches r, r + W, ...
        and the sums Σ (∂ℓ/∂σ_i)² and sample counts are added over the ranks; a rank short of a batch
        in the last round runs its first batch again unrecorded, so that every rank makes the same
        forward and backward passes (FSDP2's all-gathers and reduce-scatters)."""
        modules = {name: pl_module.get_submodule(name) for name in layers}  # the same layers, as modules
        fisher = SigmaFisher(modules, spectra, self.loss_reduction)
        batches = list(self._calibration_batches(trainer, pl_module))
        world, rank = trainer.world_size, trainer.global_rank
        was_training = pl_module.training
        pl_module.eval()  # no dropout: the scores are a property of the pretrained model
        with isolate_rng(), torch.enable_grad(), _muted_logging(pl_module):
            for first in range(0, len(batches), world):
                i = first + rank
                with fisher.recording() if i < len(batches) else nullcontext():
                    batch = trainer.strategy.batch_to_device(batches[min(i, len(batches) - 1)])
                    with trainer.precision_plugin.forward_context():
                        out = pl_module.training_step(batch, i)
                    loss = out["loss"] if isinstance(out, Mapping) else out
                    assert isinstance(loss, torch.Tensor), "training_step returns the loss"
                    loss.backward()
        pl_module.train(was_training)
        pl_module.zero_grad(set_to_none=True)
        if world > 1:
            fisher.add(lambda t: trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum"))
        return {name: s.cpu() for name, s in fisher.scores().items()}

    def _calibration_batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterable[Any]:
        """The calibration loader's ``num_samples`` seeded examples (:func:`seeded_sample`)."""
        loader: Iterable[Any] | Callable[[], Iterable[Any]] | None = self.calibration_dataloader
        if loader is None:
            fix = "pass SpectralImportance(calibration_dataloader=...)"
            loader = fit_train_loader(trainer, "SpectralImportance", fix)
        if callable(loader) and not isinstance(loader, DataLoader):
            loader = loader()
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = (loader.batch_size if isinstance(loader, DataLoader) else None) or CALIBRATION_BATCH
        return seeded_sample(loader, self.num_samples, batch_size, self.seed, "SpectralImportance")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(len(s) for s in self.selected.values())
        rank_zero_info(f"SpectralImportance: {total} components selected in {len(self.selected)} layers")
        directory = log_directory(trainer)
        if not trainer.is_global_zero:
            return
        task = self.task or str(getattr(pl_module, "hparams", {}).get("task", "run"))
        rows = selection_rows(task, self.sigmas, self.scores, self.selected)
        write_rows(rows, directory / "spectral_importance.csv")
        fig = specialisation_figure(rows)
        publish_figure(trainer, fig, directory / "spectral_importance.png", "spectral_importance/selected", 0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "sigmas": self.sigmas, "selected": self.selected}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores = state_dict["scores"]
        self.sigmas = state_dict["sigmas"]
        self.selected = state_dict["selected"]


@contextmanager
def _muted_logging(pl_module: L.LightningModule) -> Iterator[None]:
    """``self.log`` is not allowed in ``setup``; calibration losses must not reach the run's metrics."""
    with patch.object(pl_module, "log", _ignore), patch.object(pl_module, "log_dict", _ignore):
        yield


def _ignore(*args: Any, **kwargs: Any) -> None:
    """A logging call that records nothing."""
