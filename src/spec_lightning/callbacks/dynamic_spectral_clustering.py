"""Dynamic spectral clustering of parameter blocks into modules during training (MFTC's DSCA)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.device_mesh import DeviceMesh
from typing_extensions import override

from spec_lightning.analysis.modules import assignment_figure
from spec_lightning.callbacks.strategy import (
    KeyedCallback,
    log_directory,
    publish_figure,
    refuse_fsdp1,
    sharding_mesh_of,
)
from spec_lightning.distributed import all_reduce_sum, local_rows
from spec_lightning.spectral.blocks import BlockMap, BlockRule, GradientSketcher, default_blocks
from spec_lightning.spectral.clustering import Kernel, Module, SpectralClusterer
from spec_lightning.spectral.eigensolve import DENSE_NODES
from spec_lightning.spectral.neighbors import TARGET_RECALL, NeighborSearch, exact_nodes
from spec_lightning.spectral.optional import EXTRA, available, check_available


class DynamicSpectralClustering(KeyedCallback):
    """Cluster parameter blocks into modules by the spectra of their gradient-similarity graph.

    Every optimiser step (in ``on_before_optimizer_step``: after accumulation, AMP unscaling and the
    DDP all-reduce, so every rank sketches the same global gradient) each block's gradient is sketched
    by a random projection, g_i ↦ Rᵀ g_i ∈ ℝ^s, and its squared norm kept. Under FSDP2
    (``ModelParallelStrategy``) each rank sketches the rows of the reduce-scattered gradient it holds
    (a sketch and a norm are sums over a block's entries) and one all-reduce of the m x (s + 1)
    contributions gives every rank the sketches of the whole gradient. Every
    ``update_every_n_steps`` steps the summed sketches feed one DSCA update
    (:class:`~spec_lightning.spectral.clustering.SpectralClusterer`): k-NN similarity S(t),
    W(t) = α W(t−1) + (1−α) S(t), L_sym, its r smallest eigenvectors warm-started from the last ones
    (full recompute every ``full_recompute_every`` updates), k-means with k ∈ ``clusters`` by eigengap,
    merge/split by size, and the module library (size, mean gradient energy, stability). It logs
    ``clustering/modules``, ``clustering/nmi``, ``clustering/ari`` (against the previous clustering),
    ``clustering/eigen_residual`` and ``clustering/seconds``, writes the library to ``modules.json`` in the
    log dir after every update and draws the block-to-module map per matrix (``clustering.png`` and
    TensorBoard) at fit end and every ``plot_every_n_updates`` updates. W,
    U, the labels, the library and the pending sketches are kept in the checkpoint.

    A parameter without a gradient in a step (frozen, e.g. by a :class:`ModuleSearch` after its
    search) contributes a zero sketch for that step, and a warning names it once. Blocks that got
    no gradient since the last update get no new edges: their old edges decay by α per update while
    the blocks that still train keep being clustered. An eigensolve that did not converge falls
    back to a dense or fresh solve, logged as ``clustering/eigen_fallback`` with a warning.

    Example::

        blocks = bert_blocks(head_dim=64)
        trainer = L.Trainer(callbacks=[DynamicSpectralClustering(blocks, update_every_n_steps=20)])

    Args:
        blocks: how parameters split into blocks (first matching rule wins); None: per attention head
            and per 32 FFN neurons for a transformers BERT- or Llama-style model inside the module
            (:func:`~spec_lightning.spectral.blocks.default_blocks`).
        sketch_dim: s, the sketch dimension.
        kernel: ``cosine`` or ``gaussian`` similarity of sketches.
        alpha: EMA factor α of the similarity graph.
        neighbors: edges kept per block (None: ⌈log₂ m⌉).
        eigenvectors: r, eigenvectors computed and warm-started.
        clusters: (k_min, k_max) modules, chosen by eigengap.
        min_module_size: blocks below which a module merges into its nearest neighbour.
        max_module_size: blocks above which a module is split (None: unbounded).
        update_every_n_steps: optimiser steps between two updates.
        sketch_every_n_steps: sketch the gradients every n-th step only (a divisor of
            ``update_every_n_steps``, so the step of each update is sketched): the graph then sums
            fewer steps' sketches, and the sketch, which reads every blocked gradient entry, costs 1/n
            as much. 1 (default): every step. At 1B parameters a sketch was about a fifth of a full
            fine-tuning step on CPU; ``update_every_n_steps`` is the paper's g_i(t), the update step's
            gradient alone.
        full_recompute_every: every n-th update solves the eigenproblem from scratch.
        plot_every_n_updates: also draw the module map every n-th update (0: at fit end only).
        seed: projection, neighbour index, eigensolver and k-means seed.
        neighbor_search: how each block's nearest sketches are found: ``exact`` (brute force,
            O(m²)), ``ivf`` (faiss' inverted file index, linear in m) or ``auto`` (exact up to 50,000
            blocks on the CPU and 10⁶ on a GPU, IVF beyond).
        neighbor_recall: the fraction of the exact neighbours the IVF search must find: its probes
            are calibrated on 500 sampled blocks each update to reach it (logged as
            ``clustering/neighbor_recall``); higher costs more probes.
    """

    def __init__(
        self,
        blocks: Sequence[BlockRule] | None = None,
        sketch_dim: int = 32,
        kernel: Kernel = "cosine",
        alpha: float = 0.9,
        neighbors: int | None = None,
        eigenvectors: int = 16,
        clusters: tuple[int, int] = (8, 12),
        min_module_size: int = 4,
        max_module_size: int | None = None,
        update_every_n_steps: int = 25,
        full_recompute_every: int = 5,
        plot_every_n_updates: int = 0,
        seed: int = 0,
        neighbor_search: NeighborSearch = "auto",
        neighbor_recall: float = TARGET_RECALL,
        sketch_every_n_steps: int = 1,
    ) -> None:
        if blocks is not None and not blocks:
            raise MisconfigurationException("DynamicSpectralClustering: blocks must name at least one rule")
        if (
            not 0.0 <= alpha < 1.0
            or min(sketch_dim, update_every_n_steps, full_recompute_every) < 1
            or plot_every_n_updates < 0
        ):
            raise MisconfigurationException(
                "DynamicSpectralClustering: need 0 <= alpha < 1, sketch_dim, update_every_n_steps, "
                f"full_recompute_every >= 1 and plot_every_n_updates >= 0; got alpha={alpha}, "
                f"sketch_dim={sketch_dim}, update_every_n_steps={update_every_n_steps}, "
                f"full_recompute_every={full_recompute_every}, plot_every_n_updates={plot_every_n_updates}"
            )
        if not 2 <= clusters[0] <= clusters[1] < eigenvectors:
            raise MisconfigurationException(
                f"DynamicSpectralClustering: need 2 <= clusters[0] <= clusters[1] < eigenvectors, got "
                f"clusters={tuple(clusters)} and eigenvectors={eigenvectors}"
            )
        if max_module_size is not None and max_module_size < 2 * min_module_size:
            raise MisconfigurationException(
                f"DynamicSpectralClustering: max_module_size ({max_module_size}) must be at least twice "
                f"min_module_size ({min_module_size})"
            )
        if sketch_every_n_steps < 1 or update_every_n_steps % sketch_every_n_steps:
            raise MisconfigurationException(
                f"DynamicSpectralClustering: sketch_every_n_steps ({sketch_every_n_steps}) must be a "
                f"divisor of update_every_n_steps ({update_every_n_steps}), so the step of every update "
                "is sketched"
            )
        if not 0.0 < neighbor_recall <= 1.0:
            raise MisconfigurationException(
                f"DynamicSpectralClustering: neighbor_recall must lie in (0, 1], got {neighbor_recall}"
            )
        if neighbor_search not in get_args(NeighborSearch):
            raise MisconfigurationException(
                f"DynamicSpectralClustering: neighbor_search must be one of {get_args(NeighborSearch)}, "
                f"got {neighbor_search!r}"
            )
        self.blocks = None if blocks is None else list(blocks)
        self.sketch_dim = sketch_dim
        self.update_every_n_steps = update_every_n_steps
        self.sketch_every_n_steps = sketch_every_n_steps
        self.plot_every_n_updates = plot_every_n_updates
        self.seed = seed
        self.clusterer = SpectralClusterer(
            kernel, alpha, neighbors, eigenvectors, (clusters[0], clusters[1]), min_module_size,
            max_module_size, full_recompute_every, seed, neighbor_search, neighbor_recall,
        )  # fmt: skip
        self.steps = 0
        self.block_map: BlockMap | None = None
        self._sketcher: GradientSketcher | None = None
        self._sketches: torch.Tensor | None = None
        self._energy: torch.Tensor | None = None
        self._pending = 0
        self._warned: set[str] = set()
        self._mesh: DeviceMesh | None = None

    def key_arguments(self) -> Mapping[str, Any]:
        blocks = None if self.blocks is None else [asdict(rule) for rule in self.blocks]
        return {"blocks": blocks, "sketch_dim": self.sketch_dim, "seed": self.seed}

    @property
    def labels(self) -> np.ndarray | None:
        """The module id of every block (None before the first update)."""
        return self.clusterer.labels

    @property
    def library(self) -> list[Module]:
        return self.clusterer.library

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_fsdp1(trainer, "DynamicSpectralClustering")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        try:
            rules = self.blocks if self.blocks is not None else default_blocks(pl_module)
            self.block_map = BlockMap({n: tuple(p.shape) for n, p in params.items()}, rules)
        except ValueError as error:
            raise MisconfigurationException(f"DynamicSpectralClustering: {error}") from error
        frozen = [n for n in self.block_map.names if not params[n].requires_grad]
        if frozen:
            raise MisconfigurationException(
                f"DynamicSpectralClustering clusters gradients, but {frozen[:3]} do not require grad; "
                "train them (e.g. method FullFineTuning) and let ModuleSearch choose what updates"
            )
        self._sketcher = GradientSketcher(self.block_map, self.sketch_dim, self.seed)
        self._mesh = sharding_mesh_of("DynamicSpectralClustering", [params[n] for n in self.block_map.names])
        device = params[self.block_map.names[0]].device
        self.clusterer.device = device  # the exact neighbour search runs where the model is
        m = self.block_map.num_blocks
        self._check_packages(m)
        if self._sketches is None or self._energy is None or self._sketches.shape != (m, self.sketch_dim):
            self._sketches = torch.zeros(m, self.sketch_dim, device=device)
            self._energy = torch.zeros(m, device=device)
        self._sketches, self._energy = self._sketches.to(device), self._energy.to(device)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.block_map is not None and self._sketcher is not None
        assert self._sketches is not None and self._energy is not None, "set up in on_fit_start"
        if (self.steps + 1) % self.sketch_every_n_steps:  # a step between the sketched ones
            self.steps += 1
            return
        params = dict(pl_module.named_parameters())
        grads = {name: params[name].grad for name in self.block_map.names}
        missing = [name for name, g in grads.items() if g is None]
        if len(missing) == len(grads):
            self._warn_missing(missing, "nothing is clustered this step")
            return
        if missing:
            self._warn_missing(missing, "their blocks get zero sketches this step")
        sketches, energy = self._sketch(grads)
        self._sketches += sketches
        self._energy += energy
        self._pending += 1
        self.steps += 1
        if self.steps % self.update_every_n_steps == 0:
            self.update(trainer, pl_module)

    def _sketch(self, grads: Mapping[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's sketches and squared norms of the whole gradient (under FSDP2: this rank's rows'
        contributions, summed over the ranks)."""
        assert self._sketcher is not None
        if self._mesh is None:
            return self._sketcher.sketch(grads)
        parts = {n: None if g is None else local_rows(g) for n, g in grads.items()}
        sketches, energy = self._sketcher.sketch(
            {n: None if part is None else part[0] for n, part in parts.items()},
            {n: part[1] for n, part in parts.items() if part is not None},
        )
        summed = all_reduce_sum(torch.cat([sketches, energy[:, None]], dim=1), self._mesh)
        return summed[:, :-1], summed[:, -1]

    def _check_packages(self, m: int) -> None:
        """Refuse the large path at fit start when its packages are missing (not at the first update,
        steps into the run); below it, say once that the eigensolver starts without pyamg's help."""
        search, exact = self.clusterer.neighbor_search, exact_nodes(self.clusterer.device)
        if search == "ivf" or (search == "auto" and m > exact):
            check_available(
                ["faiss", "pyamg"] if m > exact else ["faiss"],
                f"DynamicSpectralClustering at {m:,} blocks (the approximate neighbour search, used "
                f"above {exact:,} blocks on {torch.device(self.clusterer.device).type} or with "
                "neighbor_search='ivf')",
            )
        if m > DENSE_NODES and not available("pyamg"):
            rank_zero_warn(
                f"DynamicSpectralClustering: {m:,} blocks and pyamg is not installed, so each full "
                "eigensolve starts LOBPCG from a random block instead of the multilevel start (the same "
                f"eigenvectors, found more slowly); pip install 'spec-lightning[{EXTRA}]' for the faster "
                "start."
            )

    def _warn_missing(self, missing: list[str], consequence: str) -> None:
        new = [name for name in missing if name not in self._warned]
        if new:
            self._warned.update(new)
            rank_zero_warn(
                f"DynamicSpectralClustering: {len(new)} parameter(s) have no gradient, e.g. {new[:3]}; "
                f"{consequence} (frozen parameters, or a module search that froze them)."
            )

    def update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One DSCA update from the sketches summed since the last one; all ranks hold the same labels."""
        assert self.block_map is not None and self._sketches is not None and self._energy is not None
        result = self.clusterer.update(
            self._sketches.double().cpu().numpy(),
            (self._energy / self._pending).double().cpu().numpy(),
            self.block_map.block_parameters(),
        )
        self.clusterer.labels = trainer.strategy.broadcast(self.clusterer.labels, src=0)
        self._sketches.zero_()
        self._energy.zero_()
        self._pending = 0
        for key in ("modules", "nmi", "ari", "eigen_residual", "seconds", "neighbor_recall"):
            pl_module.log(f"clustering/{key}", float(getattr(result, key)))
        pl_module.log("clustering/eigen_fallback", float(bool(result.eigen_fallback)))
        if result.eigen_fallback:
            rank_zero_warn(
                f"DynamicSpectralClustering: the eigensolve at step {trainer.global_step} fell back: "
                f"{result.eigen_fallback}."
            )
        directory = log_directory(trainer)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            library = {"step": trainer.global_step, "modules": [asdict(m) for m in self.library]}
            (directory / "modules.json").write_text(json.dumps(library))
            if self.plot_every_n_updates and self.clusterer.updates % self.plot_every_n_updates == 0:
                self._plot(trainer, directory)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = log_directory(trainer)
        if trainer.is_global_zero and self.labels is not None:
            self._plot(trainer, directory)

    def _plot(self, trainer: L.Trainer, directory: Path) -> None:
        """The block-to-module map (about 1.5 s for 864 blocks: hence not every update by default)."""
        assert self.block_map is not None and self.labels is not None
        fig = assignment_figure(self.labels, self.block_map, f"modules at step {trainer.global_step}")
        publish_figure(
            trainer, fig, directory / "clustering.png", "clustering/assignment", trainer.global_step
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "clusterer": self.clusterer.state_dict(),
            "sketches": self._sketches,
            "energy": self._energy,
            "pending": self._pending,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]
        self.clusterer.load_state_dict(state_dict["clusterer"])
        self._sketches, self._energy = state_dict["sketches"], state_dict["energy"]
        self._pending = state_dict["pending"]
