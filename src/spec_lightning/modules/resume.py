"""Loading a checkpoint into a run: the facts it must share with the run (:func:`same_fact`), weights that
are finite (:func:`check_finite`), a finished epoch resumed at the next one, and changed optimisation
settings. For those the config decides (LightningCLI would have replaced them with the checkpoint's; see
``SpecLightningCLI._parse_ckpt_path``), and the run says in one line what it replaced. Lightning restores
the optimiser's and scheduler's states after the module is built, so a new learning rate would otherwise
be silently overwritten by the checkpoint's: it is applied again once training starts, by scaling the
schedule's base rates (the warm-up and decay continue from the checkpoint's step, at the new peak)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

#: Settings a resumed run may change (the backbone, task and method are run facts: a checkpoint of
#: another is refused).
CHANGEABLE = ("learning_rate", "weight_decay", "warmup_ratio")


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """(checkpoint's value, this run's) of every changeable setting that differs."""
    return {
        key: (saved[key], current[key])
        for key in CHANGEABLE
        if key in saved and key in current and saved[key] != current[key]
    }


def apply_resumed_settings(module: L.LightningModule, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Put this run's learning rate and weight decay into the restored optimiser and schedule, and say
    what replaced what (the warm-up ratio needs nothing: the schedule's function is rebuilt from it)."""
    if not changes:
        return
    trainer = module.trainer
    if "learning_rate" in changes:
        old, new = changes["learning_rate"]
        scale = float(new) / float(old)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [rate * scale for rate in scheduler.base_lrs]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= scale
                if "initial_lr" in group:
                    group["initial_lr"] *= scale
    if "weight_decay" in changes:
        new = changes["weight_decay"][1]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if group["params"] and group["params"][0].ndim >= 2:  # matrices; biases and norms keep 0
                    group["weight_decay"] = new
    replaced = ", ".join(f"{key} {new!r} (the checkpoint's: {old!r})" for key, (old, new) in changes.items())
    rank_zero_info(
        f"resuming {trainer.ckpt_path} with this run's {replaced}; the schedule continues from step "
        f"{trainer.global_step} with them"
    )


def check_finite(state: Mapping[str, Any], what: str) -> None:
    """Raise a ValueError naming the tensors of ``state`` that hold NaN or infinite values."""
    bad = [
        k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ValueError(
            f"{what} holds non-finite values (NaN or inf) in {bad[:3]} ({len(bad)} tensors in all): the run "
            "diverged before this checkpoint; resume from an earlier one or lower the learning rate"
        )


#: Method arguments that change training but not what a trained adapter computes: not compared.
TRAINING_ONLY = frozenset({"dropout"})


def _without_training_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_training_only(v) for k, v in value.items() if k not in TRAINING_ONLY}
    if isinstance(value, list):
        return [_without_training_only(v) for v in value]
    return value


def same_fact(key: str, saved: Any, current: Any) -> bool:
    """Equal facts; a backbone given as two spellings of one local folder counts as equal, the
    method's training-only arguments (dropout) may differ, and arguments that only one side records
    (a checkpoint from before a description changed) are not compared."""
    if key == "backbone" and isinstance(saved, str) and isinstance(current, str):
        return saved == current or (Path(saved).exists() and Path(saved).resolve() == Path(current).resolve())
    return _shared(_without_training_only(saved), current) == _shared(_without_training_only(current), saved)


def _shared(value: Any, other: Any) -> Any:
    """``value`` with the init args that ``other`` does not record left out, recursively."""
    if isinstance(value, dict) and isinstance(other, dict):
        if "init_args" in value and isinstance(other.get("init_args"), dict):
            args, theirs = value["init_args"], other["init_args"]
            return {**value, "init_args": {k: _shared(v, theirs[k]) for k, v in args.items() if k in theirs}}
        return {k: _shared(v, other.get(k)) for k, v in value.items()}
    if isinstance(value, list) and isinstance(other, list) and len(value) == len(other):
        return [_shared(v, o) for v, o in zip(value, other, strict=True)]
    return value


def start_next_epoch_cleanly(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint taken after an epoch finished resume at the start of the next epoch.

    A run that ends when an epoch ends (``max_epochs``, or ``max_steps`` on the epoch's last batch)
    saves its epoch as completed while the batch counter still holds that epoch's batches; Lightning
    then takes the next epoch for finished too, so a resume with higher limits trained 0 or 1 steps
    and reported ``max_epochs`` reached. The batch counters (training and validation) of a completed
    epoch are reset here (the dict is the one Lightning restores the loops from, after this hook).
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or "epoch_loop.batch_progress" not in fit:
        return
    epochs, batches = fit["epoch_progress"]["current"], fit["epoch_loop.batch_progress"]["current"]
    if epochs["completed"] == epochs["ready"] > 0 and batches["completed"] > 0:
        for progress in ("epoch_loop.batch_progress", "epoch_loop.val_loop.batch_progress"):
            if progress in fit:
                fit[progress]["current"] = dict.fromkeys(fit[progress]["current"], 0)
                fit[progress]["is_last_batch"] = False
