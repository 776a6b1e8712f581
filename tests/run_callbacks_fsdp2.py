"""Train the user's ``LayerStack`` with each spectral callback, in one process with the whole batch or
under FSDP2 (``ModelParallelStrategy``, 2 CPU processes with gloo, half the batch each); every rank saves
the gathered weights and the callbacks' state to ``OUT/<scenario>-rank{r}.pt``.

``python tests/run_callbacks_fsdp2.py OUT`` runs every scenario under FSDP2 (Lightning relaunches the
script once for rank 1); tests/test_callbacks_fsdp2.py runs :func:`run` in its own process for the
single-process reference. Scenarios: the gradient filter on a cross_layer graph with gradient-cosine
edges and on rows graphs; DSCA + ModuleSearch through the search (with the exported slices); the same
interrupted after step 1 (the clustering's sketches pending, no batch held back yet) and resumed from
its gathered checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spec_lightning import (  # noqa: E402
    BlockRule,
    DynamicSpectralClustering,
    GraphConfig,
    ModuleSearch,
    SpectralGradientFilter,
)
from spec_lightning.distributed import gather_full  # noqa: E402
from tests.run_filter_ddp import ShardedLayerStack  # noqa: E402
from tests.user_model import probe_step  # noqa: E402

#: Examples per optimiser step (split over the ranks under FSDP2).
BATCH = 8
#: Width 9: FSDP2 gives rank 0 five rows of each matrix and rank 1 four, and the row block 3-5 lies
#: across both shards.
WIDTH = 9
RULES = [BlockRule("fc1.weight", 0, 3), BlockRule("fc2.weight", 1, 3)]
SCENARIOS = ("filter_cross_layer", "filter_rows", "mftc", "mftc_resumed")


class ShardedStack(ShardedLayerStack):
    """The user's model, each block and then the root sharded by ``fully_shard`` when a mesh is set
    (FSDP2); rank r trains on examples r, r + W, ... in order, so that the ranks' batches together are
    the single-process batches. AdamW with weight decay (so frozen slices would move if not restored)."""

    probe_step = probe_step

    def configure_model(self) -> None:
        """FSDP2 units: every linear layer of the blocks (a ModuleDict has no forward to hook), then the
        root (the head); once."""
        if self.device_mesh is None or isinstance(self, FSDPModule):
            return
        for block in self.blocks:
            for layer in block.values():
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


def make_filter(kind: str) -> SpectralGradientFilter:
    if kind == "cross_layer":
        graph = GraphConfig(targets=("fc1", "fc2"), edge_weights="grad_cosine", neighbors=2)
        return SpectralGradientFilter(graph, filter="heat", tau=1.0, recompute_every_n_steps=2)
    graph = GraphConfig(kind="rows", targets=("fc1",), edge_weights="weight_cosine", neighbors=3)
    return SpectralGradientFilter(graph, filter="tikhonov", tau=0.5)


def make_callbacks() -> list[L.Callback]:
    """DSCA every 2 steps, then the module search after step 4."""
    return [
        DynamicSpectralClustering(
            RULES, sketch_dim=8, eigenvectors=6, clusters=(2, 4), min_module_size=2, update_every_n_steps=2
        ),
        ModuleSearch(4, always_train=["head"], probe_steps=1, probe_batches=2, predictor_samples=0),
    ]


def trainer(
    callbacks: list[L.Callback],
    steps: int,
    devices: int | None,
    root: Path,
    ckpt_dir: Path | None = None,
    accelerator: str = "cpu",
) -> L.Trainer:
    """One process without sharding (``devices`` None), or FSDP2 over ``devices`` processes; the ranks'
    shards of the data fed in order; files under ``root``."""
    strategy = (
        ModelParallelStrategy(
            data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        if devices
        else "auto"
    )
    checkpoints = [ModelCheckpoint(ckpt_dir, save_last=True, save_top_k=0)] if ckpt_dir else []
    return L.Trainer(
        accelerator=accelerator,
        devices=devices or 1,
        strategy=strategy,
        max_steps=steps,
        use_distributed_sampler=False,
        callbacks=[*callbacks, *checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_model_summary=False,
        default_root_dir=root,  # the log folder's files (modules.json, figures) go there
    )


def run(scenario: str, devices: int | None, out: Path, accelerator: str = "cpu") -> dict[str, Any]:
    """Fit ``scenario`` in one process (``devices`` None) or under FSDP2 over ``devices`` processes; the
    gathered weights and the callbacks' state (the same on every rank)."""
    module = ShardedStack(width=WIDTH, batch_size=BATCH // (devices or 1))
    options = {"root": out, "accelerator": accelerator}
    state: dict[str, Any] = {}
    if scenario.startswith("filter"):
        callback = make_filter(scenario.removeprefix("filter_"))
        trainer([callback], 3, devices, **options).fit(module)
        state["filter"] = callback.state_dict()
    else:
        callbacks = make_callbacks()
        if scenario == "mftc_resumed":
            trainer(callbacks, 1, devices, ckpt_dir=out / "ckpt", **options).fit(
                module
            )  # before the held-back batches
            module, callbacks = ShardedStack(width=WIDTH, batch_size=module.batch_size), make_callbacks()
            trainer(callbacks, 6, devices, ckpt_dir=out / "ckpt", **options).fit(
                module, ckpt_path=out / "ckpt" / "last.ckpt"
            )
        else:
            trainer(callbacks, 6, devices, **options).fit(module)
        search = callbacks[1]
        assert isinstance(search, ModuleSearch)
        state |= {
            "clustering": callbacks[0].state_dict(),
            "selected": search.selected,
            "report": search.report,
        }
        state["exported"] = search.export(module, out / f"export-{scenario}-{devices}")
    state["params"] = gather_full({n: p.detach() for n, p in module.named_parameters()})
    return state


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for scenario in SCENARIOS:
        state = run(scenario, 2, out)
        torch.save(state, out / f"{scenario}-rank{os.environ.get('LOCAL_RANK', 0)}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
