"""The joint loss of graph-spectral parameter coordination, around any method's trainable tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from spec_lightning.distributed import (
    all_reduce_sum,
    broadcast_from_rank0,
    full_tensor,
    local_rows,
    sharding_mesh,
)
from spec_lightning.methods.base import FineTuningMethod, Regularization, describe_in
from spec_lightning.methods.full import FullFineTuning
from spec_lightning.spectral import GraphConfig, ParameterGraphs, spectral_smoothness


class GraphSpectral(FineTuningMethod):
    """Graph-spectral parameter coordination (Zhang et al., 2025; METHODS.md §1) as a joint objective.

    L = L_task + λ · L_spec,  L_spec = Σ_graphs Σ_ij W_ij ||Δθ_i − Δθ_j||² = 2 Σ_k λ_k ||(Uᵀ Δθ)_k||²,

    computed in the spectral domain of each graph's Laplacian L = U Λ Uᵀ. The nodes are blocks of the
    wrapped method's trainable tensors (``graph``); Δθ = θ − θ₀ with θ₀ their values right after
    ``method.apply`` (the pretrained weights under full fine-tuning), so the term keeps the update
    smooth across the graph without dragging the pretrained weights; ``reference="zero"`` regularises
    θ itself. The graph is fixed (``structural`` or ``weight_cosine`` edges, from the pretrained
    weights); gradient-dependent graphs belong to :class:`~spec_lightning.SpectralGradientFilter`,
    which adds the paper's low-pass filtering of gradients. Everything else (what trains, adapter
    state, merge, export, FSDP2 support) is the wrapped method's; under FSDP2 the term is computed
    from each rank's shards (:meth:`spectral_loss`).

    Args:
        method: the method whose trainable tensors become nodes (default: full fine-tuning).
        graph: how the tensors become graphs.
        spectral_weight: λ.
        reference: ``pretrained`` (Δθ = θ − θ₀) or ``zero`` (the raw-θ variant).
        objective: ``joint``; or, for the ablation, ``task`` (λ-term logged, not trained on) or
            ``spectral`` (the task loss logged, not trained on).
    """

    def __init__(
        self,
        method: FineTuningMethod | None = None,
        graph: GraphConfig | None = None,
        spectral_weight: float = 0.01,
        reference: Literal["pretrained", "zero"] = "pretrained",
        objective: Literal["joint", "task", "spectral"] = "joint",
    ) -> None:
        graph = graph if graph is not None else GraphConfig()
        if graph.edge_weights == "grad_cosine":
            raise ValueError(
                "method.init_args.graph.edge_weights=grad_cosine would make the loss change with every "
                "gradient; use structural or weight_cosine here, and grad_cosine in SpectralGradientFilter"
            )
        if spectral_weight < 0:
            raise ValueError(f"method.init_args.spectral_weight must be >= 0, got {spectral_weight}")
        if reference not in ("pretrained", "zero"):
            raise ValueError(f"method.init_args.reference must be pretrained or zero, got {reference!r}")
        if objective not in ("joint", "task", "spectral"):
            raise ValueError(f"method.init_args.objective must be joint, task or spectral, got {objective!r}")
        self.method = method if method is not None else FullFineTuning()
        self.graph = graph
        self.spectral_weight = spectral_weight
        self.reference = reference
        self.objective = objective
        self.parameter_efficient = self.method.parameter_efficient
        self.mergeable = self.method.mergeable
        self.supports_fsdp = self.method.supports_fsdp
        self.supports_fsdp_reason = self.method.supports_fsdp_reason
        self._graphs: ParameterGraphs | None = None
        self._reference: dict[str, torch.Tensor] = {}
        self._columns: dict[str, slice] = {}  # under FSDP2: the node columns of θ₀ this rank keeps

    def calibration_sample(self, loader: Callable[[], Iterable[Any]]) -> Iterable[Any] | None:
        return self.method.calibration_sample(loader)

    def apply(
        self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None, **data: Any
    ) -> nn.Module:
        """Apply the wrapped method (with its ``calibration=`` data, where it reads some), then build the
        graphs over its trainable tensors and keep θ₀ (rank 0's, so that every rank regularises towards
        the same θ₀)."""
        model = self.method.apply(model, head, total_steps, **data)
        broadcast_from_rank0(model)
        params = dict(self.method.trainable_parameters(model))
        self._graphs = ParameterGraphs({n: p.shape for n, p in params.items()}, self.graph)
        self._graphs.initialise(self._edge_source(model, params))
        self._graphs.refresh()
        self._reference = {
            g.name: g.stack(params).detach().clone() if self.reference == "pretrained" else torch.zeros(())
            for g in self._graphs.groups
        }
        self.expect_calls(model, ["regularization"])
        return model

    def _edge_source(self, model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """The tensors whose cosines weight the edges: the trainable tensors themselves under a method
        that trains pretrained weights (full fine-tuning), else, for adapter tensors (LoRA's B is
        zero at init, A random), the pretrained weight of the layer each adapter wraps.

        Raises:
            ValueError: ``weight_cosine`` edges over adapter tensors of a ``rows`` graph (an adapter's
                rows do not correspond to the pretrained weight's), or over a fresh tensor that
                wraps no pretrained layer (a bottleneck adapter).
        """
        if self.graph.edge_weights != "weight_cosine" or not self.method.parameter_efficient:
            return dict(params)
        if self.graph.kind == "rows":
            raise ValueError(
                "method.init_args.graph.edge_weights=weight_cosine with kind=rows over adapter tensors: an "
                "adapter factor's rows are not the pretrained weight's rows. Use kind: cross_layer (edges "
                "from the wrapped layers' pretrained weights) or edge_weights: structural."
            )
        names = self.graphs.parameter_names
        sources = {n: wrapped_weight(model, n) for n in names}
        fresh = [n for n, weight in sources.items() if weight is None]
        if fresh:
            raise ValueError(
                f"method.init_args.graph.edge_weights=weight_cosine: {fresh[:3]} wrap no pretrained layer, "
                "so their cosine edges would come from a random or zero initialisation. Use "
                "edge_weights: structural, or exclude them with graph.targets."
            )
        return {n: weight for n, weight in sources.items() if weight is not None}

    @property
    def graphs(self) -> ParameterGraphs:
        if self._graphs is None:
            raise RuntimeError("GraphSpectral: call apply(model) first")
        return self._graphs

    def spectral_loss(self, model: nn.Module) -> torch.Tensor:
        """L_spec summed over the graphs, differentiable in the node tensors.

        Under FSDP2 the value is the single-process one on every rank and each rank's gradient is
        its shard's. L_spec = 2 Σ_k λ_k Σ_columns (UᵀΔθ)_k² is a sum over the columns of the node
        matrix, and FSDP2 cuts every node of a cross_layer graph alike (dim 0), so each rank computes
        the term over its own rows and one all-reduce of the detached sum supplies the other ranks'
        part of the value. A rows graph (whose nodes are rows on different ranks) and a tensor that
        is whole on every rank are computed whole, from all-gathered tensors.
        """
        params = dict(model.named_parameters())
        local, whole = [], []
        for group in self.graphs.groups:
            tensors = {p: params[p] for p in group.params}
            if group.kind == "cross_layer" and all(isinstance(t, DTensor) for t in tensors.values()):
                parts = {p: local_rows(t) for p, t in tensors.items()}
                start = next(iter(parts.values()))[1]  # equal shapes: every node's shard starts alike
                per_row = math.prod(next(iter(tensors.values())).shape[1:])
                nodes = group.stack({p: part for p, (part, _) in parts.items()})
                columns = slice(start * per_row, start * per_row + nodes.shape[1])
                local.append(self._smoothness(group.name, nodes, columns))
            else:
                full = {p: full_tensor(t) for p, t in tensors.items()}
                whole.append(self._smoothness(group.name, group.stack(full), slice(None)))
        total = torch.stack(whole).sum() if whole else torch.zeros(())
        if local:
            own = torch.stack(local).sum()
            mesh = sharding_mesh(params[p] for group in self.graphs.groups for p in group.params)
            total = total.to(own.device) + own + (all_reduce_sum(own.detach(), mesh) - own.detach())
        return total

    def _smoothness(self, name: str, nodes: torch.Tensor, columns: slice) -> torch.Tensor:
        """The term of graph ``name`` over ``nodes``, the node matrix's ``columns`` (θ₀ cut alike and
        kept on ``nodes``' device)."""
        reference = self._reference[name]
        held = self._columns.get(name, slice(None))
        if reference.ndim == 2 and columns != held:
            if held != slice(None):
                raise RuntimeError(
                    f"GraphSpectral: θ₀ of graph {name} holds the columns {held} of this rank's shard, and "
                    f"the loss now asks for {columns}: the parameters were resharded during the fit"
                )
            # FSDP2 keeps each rank's shard all fit long: keep only its columns of θ₀ (1/W of the memory)
            reference = self._reference[name] = reference[:, columns].clone()
            self._columns[name] = columns
        if reference.device != nodes.device:  # moved once, not kept twice
            reference = self._reference[name] = reference.to(nodes.device)
        return spectral_smoothness((nodes - reference).float(), self.graphs.spectra[name])

    def regularization(self, model: nn.Module) -> Regularization:
        self._called("regularization")
        return Regularization(
            name="spectral_loss",
            value=self.spectral_loss(model),
            weight=0.0 if self.objective == "task" else self.spectral_weight,
            task_weight=0.0 if self.objective == "spectral" else 1.0,
        )

    # ---- everything else is the wrapped method's ---------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return self.method.trainable_parameters(model)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.method.adapter_state_dict(model)

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.method.load_adapter_state_dict(model, state)

    def export_adapter(
        self, model: nn.Module, directory: str | Path, head: Sequence[str] = (), base_model: str | None = None
    ) -> None:
        """The wrapped method's adapter, with this method's description (a method-agnostic loader
        rebuilds the graphs too)."""
        self.method.export_adapter(model, directory, head, base_model)
        describe_in(directory, self, head, base_model)

    def load_exported(self, model: nn.Module, directory: str | Path, head: Sequence[str] = ()) -> nn.Module:
        return self.method.load_exported(model, directory, head)

    def merge(self, model: nn.Module) -> nn.Module:
        return self.method.merge(model)

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        self.method.on_optimizer_step(model, global_step)


def wrapped_weight(model: nn.Module, parameter: str) -> torch.Tensor | None:
    """The frozen pretrained weight of the layer that owns an adapter tensor (peft's ``base_layer``,
    spec_lightning's ``base``), found by walking up the parameter's module path; None when no
    enclosing module wraps a layer."""
    parts = parameter.split(".")[:-1]
    for end in range(len(parts), 0, -1):
        module = model.get_submodule(".".join(parts[:end]))
        for attribute in ("base_layer", "base"):
            weight = getattr(getattr(module, attribute, None), "weight", None)
            if isinstance(weight, torch.Tensor):
                return weight.detach()
    return None
