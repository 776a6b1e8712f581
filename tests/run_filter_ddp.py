"""Train ``LayerStack`` with SpectralGradientFilter under CPU DDP (gloo, 2 processes); each rank saves its
weights and the filter's state to ``OUT/rank{r}.pt``. Run by tests/test_spectral_gradient_filter.py as
``python tests/run_filter_ddp.py OUT`` (Lightning relaunches this script once per extra rank)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spec_lightning import GraphConfig, SpectralGradientFilter  # noqa: E402
from tests.user_model import LayerStack  # noqa: E402

STEPS = 3


class ShardedLayerStack(LayerStack):
    """Rank r trains on examples r, r + W, r + 2W, ... in order, so that the ranks' batches together
    are the single-process batches (Lightning's own distributed sampler would shuffle)."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shard = Subset(TensorDataset(self.x, self.y), range(rank, len(self.x), world))
        return DataLoader(shard, batch_size=self.batch_size)


def ddp_trainer(callbacks: list[L.Callback], steps: int) -> L.Trainer:
    """Two CPU processes (gloo), the ranks' shards fed in order, nothing written."""
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        use_distributed_sampler=False,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def make_filter() -> SpectralGradientFilter:
    return SpectralGradientFilter(
        GraphConfig(targets=("fc1", "fc2"), edge_weights="grad_cosine", neighbors=2),
        filter="heat",
        tau=1.0,
        recompute_every_n_steps=2,
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    module = ShardedLayerStack(batch_size=4)  # 2 ranks x 4 = the single-process batch of 8
    callback = make_filter()
    trainer = ddp_trainer([callback], STEPS)
    trainer.fit(module)
    state = {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "filter": callback.state_dict(),
    }
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
