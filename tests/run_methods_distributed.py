"""Fine-tune every method of tests/conftest.METHODS for a few steps on a dropout-free tiny BERT, in one
process or under a 2-process CPU strategy (gloo), and save each method's whole adapter.

``python tests/run_methods_distributed.py STRATEGY BACKBONE DATA OUT`` with STRATEGY ``ddp`` or
``fsdp2`` (``ModelParallelStrategy``, data-parallel size 2) writes ``OUT/<method>-rank<r>.pt``; Lightning
relaunches the script once for rank 1. LoRSA also runs with SpectralImportance choosing its components
(``OUT/lorsa-importance-rank<r>.pt``); under ``fsdp2`` also LoRA with a SpectrumMonitor (its snapshots in
``OUT/lora-monitor-rank<r>.pt``) and GraphSpectral over full fine-tuning with a rows graph
(``graph_spectral_rows``). Rank r seeds its RNG with r, so only an initialisation
broadcast from rank 0 makes the ranks agree with a single process seeded with 0. Under ``fsdp2`` LoRA
also stops after the first epoch, writes ``OUT/last.ckpt`` and resumes from it to the end
(``OUT/lora-resumed-rank<r>.pt``). Run by tests/test_distributed.py, which compares the adapters with
:func:`train` in one process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spec_lightning import (  # noqa: E402
    FullFineTuning,
    GLUEDataModule,
    GraphConfig,
    GraphSpectral,
    SequenceClassificationModule,
    SpectralImportance,
    SpectrumMonitor,
)
from spec_lightning.distributed import gather_full  # noqa: E402
from tests.conftest import BACKBONE_TARGETS, METHODS  # noqa: E402

#: Examples per optimiser step, split evenly over the ranks, and the training examples used.
BATCH, EXAMPLES = 8, 16
#: Epochs of EXAMPLES / BATCH = 2 optimiser steps.
EPOCHS = 2
#: Methods run besides tests/conftest.METHODS: the joint loss over a rows graph (its nodes, the rows
#: of each query matrix, lie on both ranks under FSDP2).
EXTRA = {
    "graph_spectral_rows": lambda: GraphSpectral(
        FullFineTuning(),
        GraphConfig(kind="rows", targets=("query",), edge_weights="weight_cosine", neighbors=4),
        spectral_weight=0.1,
    )
}


class Interrupt(L.Callback):
    """Stop after the first epoch, as a killed job would (its checkpoint is written)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def rank() -> int:
    """This process's rank (Lightning sets LOCAL_RANK in the processes it launches)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def strategy(name: str | None) -> str | Strategy:
    if name == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return name or "auto"


def train(
    method: str,
    backbone: str,
    data: str,
    strategy_name: str | None = None,
    interrupt: bool = False,
    ckpt_path: Path | None = None,
    ckpt_dir: Path | None = None,
    callbacks: Sequence[L.Callback] = (),
    metrics: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The adapter after EPOCHS epochs of optimiser steps of BATCH examples (one with ``interrupt``;
    resumed from ``ckpt_path``; ``last.ckpt`` written to ``ckpt_dir`` after every epoch; ``callbacks``
    added; the last logged values put into ``metrics``): in this process when ``strategy_name`` is None,
    else on 2 ranks of BATCH / 2 each."""
    devices = 1 if strategy_name is None else 2
    L.seed_everything(rank())
    build = EXTRA[method] if method in EXTRA else lambda: METHODS[method](*BACKBONE_TARGETS["bert"])
    module = SequenceClassificationModule(backbone, build(), learning_rate=1e-3, warmup_ratio=0.0)
    data_module = GLUEDataModule(
        "sst2", data_dir=data, tokenizer=backbone, batch_size=BATCH // devices, train_limit=EXAMPLES, seed=1
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy(strategy_name),
        max_epochs=EPOCHS,
        limit_val_batches=0,
        callbacks=[
            *([Interrupt()] if interrupt else []),
            *callbacks,
            *([ModelCheckpoint(ckpt_dir, save_last=True, save_top_k=0)] if ckpt_dir else []),
        ],
        logger=False,
        default_root_dir=Path(data).parent / "runs",  # beside the test data, never the working directory
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data_module, ckpt_path=ckpt_path)
    if metrics is not None:
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return gather_full(module.method.adapter_state_dict(module.model))


def fsdp_methods() -> list[str]:
    """The methods that support FSDP2 (the others refuse it with an error)."""
    return [m for m, build in METHODS.items() if build(*BACKBONE_TARGETS["bert"]).supports_fsdp]


def importance() -> SpectralImportance:
    """Scores over the whole training set, in batches of BATCH."""
    return SpectralImportance(num_samples=EXAMPLES, batch_size=BATCH)


def main(strategy_name: str, backbone: str, data: str, out: Path) -> None:
    torch.set_num_threads(1)
    for method in fsdp_methods() if strategy_name == "fsdp2" else METHODS:
        metrics: dict[str, float] = {}
        adapter = train(method, backbone, data, strategy_name, metrics=metrics)
        torch.save({**adapter, "metrics": metrics}, out / f"{method}-rank{rank()}.pt")
    scorer = importance()
    adapter = train("lorsa", backbone, data, strategy_name, callbacks=[scorer])
    torch.save({**adapter, "scores": scorer.scores}, out / f"lorsa-importance-rank{rank()}.pt")
    if strategy_name == "fsdp2":
        metrics = {}
        adapter = train("graph_spectral_rows", backbone, data, strategy_name, metrics=metrics)
        torch.save({**adapter, "metrics": metrics}, out / f"graph_spectral_rows-rank{rank()}.pt")
        monitor = SpectrumMonitor(top_k=4)
        train("lora", backbone, data, strategy_name, callbacks=[monitor])
        torch.save(monitor.state_dict(), out / f"lora-monitor-rank{rank()}.pt")
        train("lora", backbone, data, strategy_name, interrupt=True, ckpt_dir=out)
        adapter = train("lora", backbone, data, strategy_name, ckpt_path=out / "last.ckpt")
        torch.save(adapter, out / f"lora-resumed-rank{rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
