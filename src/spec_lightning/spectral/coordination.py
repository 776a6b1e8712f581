"""The graphs of a model's parameter blocks with their edge weights and Laplacian spectra.

One object serves the joint spectral loss (``methods.graph_spectral``) and the gradient filter
(``callbacks.SpectralGradientFilter``). It is pure torch/SciPy: collectives are passed in as
``all_reduce`` (sum in place), so the same code runs in one process and on sharded tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from spec_lightning.spectral.graph import (
    GraphConfig,
    NodeGroup,
    cosine_weights,
    gram,
    group_nodes,
    knn_sparsify,
    structural_weights,
)
from spec_lightning.spectral.laplacian import Eigensolver, LaplacianSpectrum, eigendecompose, laplacian

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class ParameterGraphs:
    """Graphs over parameter blocks: W per graph, its Laplacian L and L's eigenpairs.

    ``structural`` weights are fixed by the layer order, ``weight_cosine`` weights by the tensors given
    to :meth:`initialise` (the pretrained weights), ``grad_cosine`` weights follow
    :meth:`observe_gradients`: S ← β S + (1 − β) cos(G), W = kNN(S). :meth:`refresh` recomputes L and
    its spectrum from the current W. The state (W and S) is plain tensors, for checkpoints.

    Args:
        shapes: name -> shape of the candidate parameters (the trainable ones), in model order.
        config: how blocks become graphs.
        num_pairs: eigenpairs kept per graph (None: all; an ideal low-pass needs only its cutoff).
        solver: eigensolver, see :func:`~spec_lightning.spectral.laplacian.eigendecompose`.
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size],
        config: GraphConfig,
        num_pairs: int | None = None,
        solver: Eigensolver = "auto",
    ) -> None:
        self.config = config
        self.groups = group_nodes(shapes, config.kind, config.targets, config.groups)
        self.num_pairs = num_pairs
        self.solver = solver
        self._rows = {g.name: int(shapes[g.params[0]][0]) for g in self.groups}
        self.similarity: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {
            g.name: torch.zeros(self.num_nodes(g), self.num_nodes(g), dtype=torch.float64)
            for g in self.groups
        }
        self.spectra: dict[str, LaplacianSpectrum] = {}

    def num_nodes(self, group: NodeGroup) -> int:
        """m: layers of a cross_layer graph, rows of a rows graph."""
        return len(group.params) if group.kind == "cross_layer" else self._rows[group.name]

    @property
    def parameter_names(self) -> list[str]:
        """Every parameter that is (part of) a node, in graph order."""
        return [p for g in self.groups for p in g.params]

    @torch.no_grad()
    def initialise(self, tensors: Mapping[str, torch.Tensor], all_reduce: AllReduce = _identity) -> None:
        """Set the fixed edge weights: the layer chain, or the cosines of ``tensors`` (pretrained)."""
        for group in self.groups:
            if self.config.edge_weights == "structural":
                self.weights[group.name] = structural_weights(self.num_nodes(group), self.config.neighbors)
            elif self.config.edge_weights == "weight_cosine":
                similarity = cosine_weights(all_reduce(gram(group.stack(tensors))))
                self.weights[group.name] = knn_sparsify(similarity, self.config.neighbors)

    @torch.no_grad()
    def observe_gradients(self, grads: Mapping[str, torch.Tensor], all_reduce: AllReduce = _identity) -> None:
        """Fold one step's gradient cosines into S (``grad_cosine`` only; a no-op otherwise). A graph
        with a parameter missing from ``grads`` keeps its S."""
        if self.config.edge_weights != "grad_cosine":
            return
        beta = self.config.ema
        for group in self.groups:
            if not all(p in grads for p in group.params):
                continue
            cosine = cosine_weights(all_reduce(gram(group.stack(grads))))
            previous = self.similarity.get(group.name)
            self.similarity[group.name] = (
                cosine if previous is None else beta * previous + (1 - beta) * cosine
            )
            self.weights[group.name] = knn_sparsify(self.similarity[group.name], self.config.neighbors)

    def refresh(self) -> None:
        """Recompute every graph's Laplacian and its eigenpairs from the current weights."""
        self.spectra = {
            g.name: eigendecompose(
                laplacian(self.weights[g.name], self.config.normalized),
                None if self.num_pairs is None else min(self.num_pairs, self.num_nodes(g)),
                self.solver,
            )
            for g in self.groups
        }

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "similarity": dict(self.similarity)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore W and S (the spectra follow from W by :meth:`refresh`)."""
        missing = sorted(set(self.weights) - set(state["weights"]))
        if missing:
            raise KeyError(
                f"the saved graph state lacks the graphs {missing[:3]} ({len(missing)} in all): "
                "was it saved with the same model and graph config?"
            )
        self.weights = {name: state["weights"][name].double().cpu() for name in self.weights}
        self.similarity = {name: s.double().cpu() for name, s in state["similarity"].items()}
        self.refresh()
