"""Resuming with changed optimisation settings: the config decides (LightningCLI would have replaced them
with the checkpoint's; see ``SpecLightningCLI._parse_ckpt_path``), and the run says in one line what it
replaced. Lightning restores the optimiser's and scheduler's states after the module is built, so a
new learning rate would otherwise be silently overwritten by the checkpoint's: it is applied again
once training starts, by scaling the schedule's base rates (the warm-up and decay continue from the
checkpoint's step, at the new peak)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
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
            scheduler.base_lrs = [rate * scale for rate in scheduler.base_lrs]  # type: ignore[attr-defined]
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
