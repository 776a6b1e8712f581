"""Apply a fine-tuning method to a model inside any LightningModule, objective and hooks included."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from spec_lightning.callbacks.strategy import KeyedCallback
from spec_lightning.data.calibration import apply_arguments
from spec_lightning.methods.base import FineTuningMethod, Regularization, describe


class ApplyMethod(KeyedCallback):
    """Fine-tune the model held in ``pl_module.<attribute>`` with ``method``, in a LightningModule that
    knows nothing of spec_lightning (in the spirit of Lightning's ``BaseFinetuning``).

    - ``setup("fit")``: ``pl_module.<attribute> = method.apply(pl_module.<attribute>, head)``, before the
      optimiser is configured (so ``configure_optimizers`` sees the method's parameters; pass only those
      with ``requires_grad``, or rely on the optimiser skipping parameters without gradients) and before
      a checkpoint is restored into it.
    - The method's regulariser joins the objective, L = task_weight · L_task + weight · R: after the
      module's backward of L_task, that backward's share of the gradients is scaled by task_weight
      and weight · R is back-propagated into them (divided by ``accumulate_grad_batches`` as Lightning
      divides the loss, and through the precision plugin's gradient scaler where there is one).
      ``train/<name>`` is logged.
    - ``method.on_optimizer_step(model, step)`` runs after every optimiser step (AdaLoRA's rank
      reallocation).

    The method's description is kept in the checkpoint and checked on resume. :meth:`export_adapter`
    writes the adapter alone; :func:`spec_lightning.load_adapter` rebuilds the model from it.

    Example::

        trainer = L.Trainer(callbacks=[ApplyMethod(LoRA(target_modules=["q_proj", "v_proj"]), head=["head"])])

    Args:
        method: the fine-tuning method.
        attribute: dotted attribute path of the model inside the LightningModule (``model``,
            ``net.backbone``); empty: the LightningModule's own layers are adapted in place.
        head: names (suffixes) of freshly initialised modules that train fully.
    """

    def __init__(self, method: FineTuningMethod, attribute: str = "model", head: Sequence[str] = ()) -> None:
        if isinstance(head, str):
            raise MisconfigurationException(
                f"ApplyMethod: head must be a list of names, got the string {head!r}"
            )
        self.method = method
        self.attribute = attribute
        self.head = list(head)
        self._applied = False
        self._last_step = 0
        self._term: Regularization | None = None
        self._before: dict[torch.Tensor, torch.Tensor] = {}

    def key_arguments(self) -> Mapping[str, Any]:
        return {"method": type(self.method).__qualname__, "attribute": self.attribute}

    def model(self, pl_module: L.LightningModule) -> nn.Module:
        """The adapted model inside ``pl_module``."""
        return pl_module.get_submodule(self.attribute) if self.attribute else pl_module

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Apply the method at the start of every stage, not only ``fit``: ``trainer.validate/test/predict(
        ..., ckpt_path=...)`` then restore the adapter into the model it belongs to (the adapters start
        as the identity, so a model without a checkpoint computes what it did)."""
        if self._applied:
            return
        if self.attribute:
            try:
                target = pl_module.get_submodule(self.attribute)
            except AttributeError as error:
                raise MisconfigurationException(
                    f"ApplyMethod: {type(pl_module).__name__} has no module at {self.attribute!r}; set "
                    "attribute to the dotted path of the model to fine-tune"
                ) from error
        else:
            target = pl_module
        steps = trainer.estimated_stepping_batches if stage == "fit" else math.inf
        adapted = self.method.apply(
            target,
            head=self.head,
            total_steps=None if math.isinf(steps) else int(steps),
            **apply_arguments(self.method, trainer),
        )
        if self.attribute and adapted is not target:
            parent, _, name = self.attribute.rpartition(".")
            setattr(pl_module.get_submodule(parent) if parent else pl_module, name, adapted)
        elif not self.attribute and adapted is not target:
            raise MisconfigurationException(
                f"ApplyMethod: {type(self.method).__name__} wraps the model it adapts, which cannot be done "
                "to the LightningModule itself; hold the model in an attribute and pass attribute=<its name>"
            )
        self._applied = True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    @override
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._term = self.method.regularization(self.model(pl_module))
        if self._term is not None and self._term.task_weight != 1.0:  # to scale this backward's share only
            self._before = {p: p.grad.clone() for p in pl_module.parameters() if p.grad is not None}

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        term, self._term = self._term, None
        if term is None:
            return
        if term.task_weight != 1.0:  # g ← g_before + task_weight · (g − g_before)
            for p in pl_module.parameters():
                if p.grad is not None:
                    before = self._before.get(p)
                    p.grad = (
                        term.task_weight * p.grad if before is None else before.lerp(p.grad, term.task_weight)
                    )
            self._before = {}
        value = term.weight * term.value / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if value.requires_grad:
            (scaler.scale(value) if scaler is not None else value).backward()
        pl_module.log(f"train/{term.name}", term.value.detach())

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step:  # an optimiser step happened (not an accumulation batch)
            self._last_step = step
            self.method.on_optimizer_step(self.model(pl_module), step - 1)

    def export_adapter(
        self, pl_module: L.LightningModule, directory: str | Path, base_model: str | None = None
    ) -> Path:
        """Write the adapter alone (and its method, head and ``base_model`` name) to ``directory``."""
        if not self._applied:
            raise MisconfigurationException(
                "ApplyMethod.export_adapter: the method was never applied to this module (the callback was "
                "not given to a Trainer that ran fit, validate, test or predict), so there is no adapter to "
                "export; pass the callback to the Trainer that trains the module"
            )
        self.method.export_adapter(self.model(pl_module), directory, self.head, base_model)
        return Path(directory)

    def restore(self, pl_module: L.LightningModule, checkpoint_path: str | Path) -> L.LightningModule:
        """``pl_module`` with the method applied and a fit's checkpoint loaded into it, outside a Trainer
        (Lightning's ``load_from_checkpoint`` builds the module without callbacks, so the adapter's keys
        would find no home)::

            model = ApplyMethod(LoRA(...), head=["head"]).restore(MyModule(), "last.ckpt")
        """
        from spec_lightning.io.checkpoints import load_checkpoint

        checkpoint = load_checkpoint(checkpoint_path)
        for key, state in checkpoint.get("callbacks", {}).items():
            if key.startswith(f"{type(self).__qualname__}"):
                self.load_state_dict(state)  # refuses a checkpoint of another method
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        self.setup(trainer, pl_module, "validate")
        pl_module.load_state_dict(checkpoint["state_dict"])
        return pl_module

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"method": describe(self.method)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, current = state_dict["method"], describe(self.method)
        if saved != current:
            raise MisconfigurationException(
                f"ApplyMethod: the checkpoint was trained with {saved}, this run applies {current}; resume "
                "with the method of the run that wrote it"
            )
