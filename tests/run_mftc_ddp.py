"""Train ``LayerStack`` with DynamicSpectralClustering and ModuleSearch under CPU DDP (gloo, 2 processes);
each rank saves its weights, labels and selection to ``OUT/rank{r}.pt``. Run by
tests/test_mftc_callbacks.py as ``python tests/run_mftc_ddp.py OUT``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spec_lightning import BlockRule, DynamicSpectralClustering, ModuleSearch  # noqa: E402
from tests.run_filter_ddp import ShardedLayerStack, ddp_trainer  # noqa: E402
from tests.user_model import probe_step  # noqa: E402

STEPS = 6
RULES = [BlockRule("fc1.weight", 0, 2), BlockRule("fc2.weight", 1, 2)]


class ShardedProbedStack(ShardedLayerStack):
    probe_step = probe_step


def make_callbacks() -> list[L.Callback]:
    return [
        DynamicSpectralClustering(
            RULES, sketch_dim=8, eigenvectors=6, clusters=(2, 4), min_module_size=2, update_every_n_steps=2
        ),
        ModuleSearch(4, always_train=["head"], probe_steps=1, probe_batches=2, predictor_samples=0),
    ]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    module = ShardedProbedStack(batch_size=4)
    callbacks = make_callbacks()
    trainer = ddp_trainer(callbacks, STEPS)
    trainer.fit(module)
    state = {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "clustering": callbacks[0].state_dict(),
        "selected": callbacks[1].selected,
        "report": callbacks[1].report,
    }
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
