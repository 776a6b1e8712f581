"""MFTC's probes (§3.3): a few optimiser steps training the head and one set of blocks' slices, a score on
held-out batches, then every weight, optimiser state and ``requires_grad`` flag put back."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng

from spec_lightning.distributed import local_grads, local_rows_of, reshard
from spec_lightning.spectral.blocks import frozen_values, mask_gradients, restore_frozen

#: ``step(pl_module, batch) -> (mean loss, score)``: one probe batch's loss (differentiable) and score.
ProbeStep = Callable[[L.LightningModule, Any], tuple[torch.Tensor, torch.Tensor]]


@runtime_checkable
class Probeable(Protocol):
    """A LightningModule that ModuleSearch can probe: ``probe_step(batch)`` returns the batch's mean
    loss (differentiable) and its accuracy, or any score where higher is better (spec_lightning's
    modules give the expected accuracy, the mean probability of the true label, which a few probe
    steps move even when no prediction flips)."""

    def probe_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Probe:
    """Per-batch accuracy and loss on the probe batches after a few steps training one set of blocks."""

    accuracy: np.ndarray
    loss: np.ndarray


def probe(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    optimizer: torch.optim.Optimizer,
    masks: Mapping[str, torch.Tensor],
    head: Sequence[str],
    batches: tuple[Sequence[Any], Sequence[Any]],
    step: ProbeStep,
) -> Probe:
    """Train ``head`` and the ``masks``' slices for one optimiser step per batch of ``batches[0]`` (the
    other slices restored after each step), score every batch of ``batches[1]`` in eval mode, and put the
    weights, the optimiser state and the ``requires_grad`` flags back; under ``isolate_rng``, so a probe
    draws no random number the training run would have drawn. The per-batch scores are averaged over
    the ranks (every rank takes part in each forward and backward under FSDP2)."""
    params = dict(pl_module.named_parameters())
    touched = [*head, *masks]
    saved_values = {n: params[n].detach().clone() for n in touched}
    frozen = frozen_values(local_rows_of(params), masks)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    train, evaluate = batches
    accuracy, loss = [], []
    with isolate_rng():
        for name, p in params.items():  # backward reaches the probed parameters only
            p.requires_grad_(name in touched)
        try:
            pl_module.train()
            for batch in train:
                optimizer.zero_grad()
                with trainer.precision_plugin.forward_context():
                    batch_loss, _ = step(pl_module, batch)
                batch_loss.backward()
                mask_gradients(local_grads(params), masks)
                optimizer.step()
                restore_frozen(local_rows_of(params), masks, frozen)
            pl_module.eval()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch in evaluate:
                    batch_loss, batch_accuracy = step(pl_module, batch)
                    loss.append(float(batch_loss))
                    accuracy.append(float(batch_accuracy))
        finally:
            # FSDP2 keeps its root gathered after the evaluation (no backward): the next forward
            # would read the probe's weights, not the shards restored below
            reshard(pl_module)
            optimizer.zero_grad()
            with torch.no_grad():
                for name, value in saved_values.items():
                    params[name].copy_(value)
            optimizer.load_state_dict(saved_optimizer)
            for name, p in params.items():
                p.requires_grad_(saved_flags[name])
            pl_module.train()
    result = torch.tensor([accuracy, loss], dtype=torch.float64)
    result = trainer.strategy.reduce(result.to(pl_module.device), reduce_op="mean").cpu()
    return Probe(result[0].numpy(), result[1].numpy())


def plain_batch(batch: Any) -> Any:
    """``batch`` as lists, tuples, dicts and CPU tensors (a tokenizer's BatchEncoding becomes a dict)."""
    if torch.is_tensor(batch):
        return batch.detach().cpu()
    if isinstance(batch, Mapping):
        return {k: plain_batch(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [plain_batch(v) for v in batch]
    if isinstance(batch, tuple):
        return tuple(plain_batch(v) for v in batch)
    return batch
