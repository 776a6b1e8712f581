"""Low-pass spectral filtering of gradients over parameter graphs (METHODS.md §1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from typing_extensions import override

from spec_lightning.callbacks.strategy import KeyedCallback, refuse_fsdp1, sharding_mesh_of
from spec_lightning.distributed import all_reduce_sum, full_tensor, local_rows, local_rows_of, rows_like
from spec_lightning.spectral import (
    FilterName,
    GraphConfig,
    NodeFilter,
    NodeGroup,
    ParameterGraphs,
    filter_node_gradients,
)
from spec_lightning.spectral.laplacian import Eigensolver


class SpectralGradientFilter(KeyedCallback):
    """Filter gradients over parameter graphs before every optimiser step: G ← U g(Λ) Uᵀ G.

    G is the m x d matrix of one graph's stacked node gradients (see
    :class:`~spec_lightning.spectral.GraphConfig`) and L = U Λ Uᵀ the graph's Laplacian. Filters:
    ``ideal_lowpass`` keeps the ``cutoff`` lowest frequencies, ``heat`` g(λ) = exp(−τλ), ``tikhonov``
    g(λ) = 1/(1 + τλ). It runs in ``on_before_optimizer_step``: after gradient accumulation and AMP
    unscaling, before gradient clipping. Graphs are built at fit start over the module's trainable
    parameters; ``grad_cosine`` edges follow the gradients and the spectrum is recomputed every
    ``recompute_every_n_steps`` steps. The fraction of gradient energy removed,
    1 − Σ||F G||² / Σ||G||², is logged as ``spectral_filter/energy_removed``. Edge weights, the
    gradient-similarity averages and the step count are kept in the checkpoint.

    What it can filter: a ``cross_layer`` graph joins one parameter role across numbered layers
    (``layers.<i>.``), so its nodes must share a shape; with automatic targets, roles whose layers
    differ in shape (LoRSA with ``budget="global"``) are left out with a warning.
    ``GraphConfig(groups=...)`` names the nodes of models without numbered layers, and ``rows``
    graphs (one per matrix, its rows as nodes) need no layer structure. Targets name modules as peft
    does: ``lora_A`` covers ``lora_A.default``.

    Works on any LightningModule (public hooks only). Under DDP every rank filters the same
    all-reduced gradient, so no communication is needed. Under FSDP2 (``ModelParallelStrategy``) it
    filters the sharded gradients the optimiser sees, after the reduce-scatter: FSDP2 cuts dim 0 of
    every parameter and F acts on the node axis only, so a ``cross_layer`` graph (nodes of one shape,
    cut alike) is filtered shard by shard, F G_r on each rank's rows G_r; structural edges need no
    communication, cosine edges one all-reduce of the m x m Gram matrix, and the logged energy one of
    two numbers. A ``rows`` graph mixes rows held by different ranks: its gradient is all-gathered,
    filtered whole, and each rank keeps its rows. FSDP1 is refused (flattened parameters).

    Example::

        trainer = L.Trainer(callbacks=[SpectralGradientFilter(GraphConfig(targets=("query", "value")))])

    Args:
        graph: which parameters become nodes and how they are joined.
        filter: ``ideal_lowpass``, ``heat`` or ``tikhonov``.
        cutoff: frequencies kept by ``ideal_lowpass``.
        tau: τ of ``heat`` and ``tikhonov``.
        recompute_every_n_steps: optimiser steps between two spectra (``grad_cosine`` edges only;
            fixed graphs are decomposed once).
        eigensolver: ``auto``, ``dense``, ``eigsh`` or ``lobpcg``.
    """

    def __init__(
        self,
        graph: GraphConfig | None = None,
        filter: FilterName = "heat",
        cutoff: int = 1,
        tau: float = 1.0,
        recompute_every_n_steps: int = 50,
        eigensolver: Eigensolver = "auto",
    ) -> None:
        if filter not in ("ideal_lowpass", "heat", "tikhonov"):
            raise MisconfigurationException(
                f"SpectralGradientFilter: filter must be ideal_lowpass, heat or tikhonov, got {filter!r}"
            )
        if cutoff < 1 or tau < 0 or recompute_every_n_steps < 1:
            raise MisconfigurationException(
                "SpectralGradientFilter: cutoff and recompute_every_n_steps must be >= 1 and tau >= 0, got "
                f"cutoff={cutoff}, recompute_every_n_steps={recompute_every_n_steps}, tau={tau}"
            )
        self.graph = graph if graph is not None else GraphConfig()
        self.filter = filter
        self.cutoff = cutoff
        self.tau = tau
        self.recompute_every_n_steps = recompute_every_n_steps
        self.eigensolver = eigensolver
        self.steps = 0
        self.graphs: ParameterGraphs | None = None
        self._saved_graphs: dict[str, Any] | None = None
        self._filters: dict[str, NodeFilter] = {}
        self._warned: set[str] = set()
        self._mesh: DeviceMesh | None = None

    def key_arguments(self) -> Mapping[str, Any]:
        return {"graph": asdict(self.graph), "filter": self.filter, "cutoff": self.cutoff, "tau": self.tau}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_fsdp1(trainer, "SpectralGradientFilter")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        self._mesh = sharding_mesh_of("SpectralGradientFilter", params.values())
        self.build(params)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        energies = self.filter_gradients(dict(pl_module.named_parameters()))
        if energies is not None:
            total, removed = energies
            pl_module.log("spectral_filter/energy_removed", removed / total.clamp_min(1e-30))

    def build(self, params: Mapping[str, torch.Tensor]) -> None:
        """Build the graphs over ``params`` (the trainable ones, whole or FSDP2 shards); a resumed run
        takes the saved graphs."""
        num_pairs = self.cutoff if self.filter == "ideal_lowpass" else None
        try:
            self.graphs = ParameterGraphs(
                {n: p.shape for n, p in params.items()}, self.graph, num_pairs, self.eigensolver
            )
        except ValueError as error:
            raise MisconfigurationException(f"SpectralGradientFilter: {error}") from error
        if self._mesh is not None:
            whole = [n for n in self.graphs.parameter_names if not isinstance(params[n], DTensor)]
            if whole:
                raise MisconfigurationException(
                    f"SpectralGradientFilter: {whole[:3]} are not sharded while the rest of the model is "
                    "(FSDP2 shards what fully_shard covers): shard the modules that hold them too"
                )
        if self._saved_graphs is not None:  # resumed: the graphs of the interrupted run, not new ones
            self.graphs.load_state_dict(self._saved_graphs)
            self._refilter()
        elif self.graph.edge_weights != "grad_cosine":
            self.graphs.initialise(*self._node_view({n: params[n] for n in self.graphs.parameter_names}))
            self._refilter()

    @torch.no_grad()
    def _node_view(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """``tensors`` (graph parameters or their gradients) as the node arithmetic sees them, and the
        sum over ranks of a Gram matrix: whole tensors and no sum off FSDP2; under it, each rank's rows
        (cross_layer) with the sum, or the all-gathered tensors (rows graphs, a collective) without."""
        assert self.graphs is not None
        if self._mesh is None:
            return dict(tensors), _unchanged
        if self.graphs.config.kind == "rows":
            return {n: full_tensor(t) for n, t in tensors.items()}, _unchanged
        return local_rows_of(tensors), partial(all_reduce_sum, mesh=self._mesh)

    def filter_gradients(
        self, params: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """G ← U g(Λ) Uᵀ G for every graph whose parameters all have a gradient, in place; returns
        (||G||², energy removed), or None when no graph has. Graphs skipped for a missing gradient
        (e.g. frozen by a module search) are named in a warning, once per graph."""
        graphs = self.graphs
        assert graphs is not None, "build() (on_fit_start) comes first"
        present = {n: grad for n in graphs.parameter_names if (grad := params[n].grad) is not None}
        groups = [g for g in graphs.groups if all(p in present for p in g.params)]
        self._warn_skipped([g for g in graphs.groups if g not in groups], present)
        if not groups:
            return None
        grads, all_reduce = self._node_view({p: present[p] for g in groups for p in g.params})
        if graphs.config.edge_weights == "grad_cosine":
            graphs.observe_gradients(grads, all_reduce)
            if self.steps % self.recompute_every_n_steps == 0:
                self._refilter()
        total, removed = all_reduce(
            torch.stack(filter_node_gradients(groups, self._device_filters(grads), grads))
        )
        if self._mesh is not None and graphs.config.kind == "rows":  # filtered whole: keep this rank's rows
            for name, whole in grads.items():
                local_rows(present[name])[0].copy_(rows_like(whole, present[name]))
        self.steps += 1
        return total, removed

    def _warn_skipped(self, skipped: list[NodeGroup], present: Mapping[str, Any]) -> None:
        new = [g for g in skipped if g.name not in self._warned]
        if new:
            self._warned.update(g.name for g in new)
            missing = [p for g in new for p in g.params if p not in present]
            rank_zero_warn(
                f"SpectralGradientFilter: {len(missing)} parameter(s) have no gradient, e.g. {missing[:3]}, "
                f"so the graphs {[g.name for g in new][:5]} ({len(new)} in all) are not filtered while that "
                "lasts (frozen parameters, or a module search that froze them); the other graphs are."
            )

    def _refilter(self) -> None:
        """Decompose every graph's Laplacian again and rebuild the filters."""
        assert self.graphs is not None
        self.graphs.refresh()
        self._filters = {
            name: NodeFilter.from_spectrum(spectrum, self.filter, self.cutoff, self.tau)
            for name, spectrum in self.graphs.spectra.items()
        }

    def _device_filters(self, grads: Mapping[str, torch.Tensor]) -> dict[str, NodeFilter]:
        device = next(iter(grads.values())).device
        for name, node_filter in self._filters.items():
            if node_filter.basis.device != device or node_filter.basis.dtype != torch.float32:
                self._filters[name] = node_filter.to(device, torch.float32)
        return self._filters

    @override
    def state_dict(self) -> dict[str, Any]:
        graphs = self.graphs.state_dict() if self.graphs is not None else self._saved_graphs
        return {"steps": self.steps, "graphs": graphs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]
        self._saved_graphs = state_dict["graphs"]


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
