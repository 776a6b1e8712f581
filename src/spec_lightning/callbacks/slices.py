"""ModuleSearch's slice bookkeeping: after the search only the head and the selected blocks' slices
train. Parameters with no selected slice stop requiring gradients (where the strategy allows it), the
others' gradients are masked before each optimiser step and their frozen slices restored after it, so no
optimiser (weight decay, momentum) moves them. Under FSDP2 each rank keeps the rows it holds."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from spec_lightning.distributed import local_grads, local_rows, local_rows_of, rows_like
from spec_lightning.spectral.blocks import BlockMap, frozen_values, mask_gradients, restore_frozen


class SliceTraining:
    """Which slices train: the head's parameters whole, the selected blocks' rows of the others.

    Args:
        head: names of the parameters that train whole (the task head).
    """

    def __init__(self, head: list[str]) -> None:
        self.head = head
        self.masks: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}

    @staticmethod
    def device_masks(
        block_map: BlockMap, pl_module: L.LightningModule, blocks: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """The masks of ``blocks`` over the rows each parameter holds on this rank (all of them off
        FSDP2), on its device (moved once, not per step)."""
        params = dict(pl_module.named_parameters())
        return {
            n: rows_like(m, params[n]).to(local_rows(params[n])[0].device)
            for n, m in block_map.masks(blocks).items()
        }

    def freeze_outside(
        self, block_map: BlockMap, trainer: L.Trainer, pl_module: L.LightningModule, blocks: np.ndarray
    ) -> None:
        """Train the head and ``blocks``' slices only, from now on; parameters with no trained slice stop
        requiring gradients where the strategy allows it (under DDP only with
        ``find_unused_parameters=True``, else a warning says their gradients are computed and dropped)."""
        params = dict(pl_module.named_parameters())
        self.masks = self.device_masks(block_map, pl_module, blocks)
        self.frozen = frozen_values(local_rows_of(params), self.masks)
        unused = [
            n for n, p in params.items() if p.requires_grad and n not in self.head and n not in self.masks
        ]
        strategy = trainer.strategy
        ddp_options = getattr(strategy, "_ddp_kwargs", {})  # DDPStrategy(**kwargs) keeps them there
        if isinstance(strategy, DDPStrategy) and not ddp_options.get("find_unused_parameters"):
            rank_zero_warn(
                f"ModuleSearch: {len(unused)} parameter(s) with no selected slice keep requires_grad under "
                "DDP (its reducer waits for every gradient it was built with): their gradients are still "
                "computed, then dropped. Use DDPStrategy(find_unused_parameters=True) to skip them."
            )
            return
        for name in unused:
            params[name].requires_grad_(False)

    def mask_gradients(self, pl_module: L.LightningModule) -> None:
        """Drop the gradients of parameters with no trained slice; zero the frozen rows of the others."""
        params = dict(pl_module.named_parameters())
        for name, p in params.items():
            if p.grad is not None and name not in self.head and name not in self.masks:
                p.grad = None  # the optimiser skips it altogether
        mask_gradients(local_grads(params), self.masks)

    def restore(self, pl_module: L.LightningModule) -> None:
        """Put the frozen slices back to their values at the search."""
        restore_frozen(local_rows_of(dict(pl_module.named_parameters())), self.masks, self.frozen)

    def trained_parameters(
        self, block_map: BlockMap | None, selected: list[int] | None
    ) -> dict[str, torch.Tensor | None]:
        """Parameter name -> boolean mask of its trained slices, whole-parameter shaped on the CPU
        (None: the whole tensor, the head)."""
        if selected is None or block_map is None:
            return dict.fromkeys(self.head)
        return {**dict.fromkeys(self.head), **block_map.masks(np.array(selected, dtype=np.int64))}
