"""Parameter graphs (METHODS.md §1): which parameter blocks are nodes, and how strongly they are joined.

A node is a block of parameters, never a scalar. ``cross_layer`` makes one graph per parameter role
(``encoder.layer.*.attention.self.query.weight``) whose nodes are that parameter in successive layers
(found by the layer index in the name, ``layers.<i>.``; explicit ``groups`` name the nodes of models
without numbered layers); ``rows`` makes one graph per matrix whose nodes are its rows (output units).
A graph's nodes stacked as rows form the m x d node matrix θ that the Laplacian acts on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from spec_lightning.naming import layer_role, within

GraphKind = Literal["cross_layer", "rows"]
EdgeWeights = Literal["structural", "weight_cosine", "grad_cosine"]


@dataclass(frozen=True)
class GraphConfig:
    """How parameter blocks become weighted graphs.

    Attributes:
        kind: ``cross_layer`` (nodes = one parameter role across layers) or ``rows`` (nodes = the rows
            of one matrix).
        targets: names (dotted suffixes, as in ``target_modules``) of the parameters or modules whose
            matrices become nodes (a module's name covers the tensors inside it: ``query`` covers
            peft's ``query.lora_A.default.weight``, ``lora_A`` covers every ``lora_A.<adapter>``);
            None = every trainable parameter with two or more dimensions (cross_layer roles whose
            layers differ in shape are then left out, with a warning).
        groups: explicit cross_layer graphs, graph name -> the names (as in ``targets``) of its nodes
            in order, e.g. ``{"ffn": ["block_a.fc1", "block_b.fc1", "block_c.fc1"]}`` for a model
            without numbered layers; every node needs the same shape. Replaces ``targets``.
        edge_weights: ``structural`` (W_ij = 1 for layers at most ``neighbors`` apart; cross_layer
            only), ``weight_cosine`` (cosine of the pretrained node vectors) or ``grad_cosine`` (an
            exponential moving average of the cosine of node gradients). Negative cosines count as 0.
        neighbors: k of the k-nearest-neighbour sparsification (for ``structural``: the chain reach);
            None keeps every edge.
        normalized: use L = I − D^{-1/2} W D^{-1/2} instead of L = D − W (invariant to the scale of W).
        ema: β of the gradient-cosine average S ← β S + (1 − β) cos(G).
    """

    kind: GraphKind = "cross_layer"
    targets: tuple[str, ...] | None = None
    groups: dict[str, tuple[str, ...]] | None = None
    edge_weights: EdgeWeights = "structural"
    neighbors: int | None = 1
    normalized: bool = False
    ema: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in ("cross_layer", "rows"):
            raise ValueError(f"graph.kind must be cross_layer or rows, got {self.kind!r}")
        if self.edge_weights not in ("structural", "weight_cosine", "grad_cosine"):
            raise ValueError(
                "graph.edge_weights must be structural, weight_cosine or grad_cosine, "
                f"got {self.edge_weights!r}"
            )
        if self.kind == "rows" and self.edge_weights == "structural":
            raise ValueError(
                "graph.edge_weights=structural needs an order of layers; the rows of a matrix have none. "
                "Use weight_cosine or grad_cosine with graph.kind=rows."
            )
        if self.neighbors is not None and self.neighbors < 1:
            raise ValueError(f"graph.neighbors must be >= 1 or null, got {self.neighbors}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"graph.ema must lie in [0, 1), got {self.ema}")
        if self.groups is not None and (self.targets is not None or self.kind != "cross_layer"):
            raise ValueError(
                "graph.groups names the nodes of cross_layer graphs itself: leave graph.targets unset and "
                "graph.kind at cross_layer"
            )
        if isinstance(self.targets, str):
            raise TypeError(f"graph.targets must be a list of names, got the string {self.targets!r}")


@dataclass(frozen=True)
class NodeGroup:
    """The nodes of one graph: several equally shaped parameters (cross_layer) or one matrix (rows)."""

    name: str
    kind: GraphKind
    params: tuple[str, ...]

    def stack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The m x d node matrix (a view for ``rows``, a copy for ``cross_layer``)."""
        if self.kind == "rows":
            tensor = tensors[self.params[0]]
            return tensor.reshape(tensor.shape[0], -1)
        return torch.stack([tensors[p].reshape(-1) for p in self.params])

    @torch.no_grad()
    def write(self, nodes: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy an m x d node matrix back into the tensors it was stacked from."""
        if self.kind == "rows":
            tensor = tensors[self.params[0]]
            tensor.copy_(nodes.view_as(tensor))
            return
        for row, param in zip(nodes, self.params, strict=True):
            tensors[param].copy_(row.view_as(tensors[param]))


def group_nodes(
    shapes: Mapping[str, Sequence[int]],
    kind: GraphKind,
    targets: Sequence[str] | None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> list[NodeGroup]:
    """Build the node groups over the named parameters (name -> shape, in model order).

    Raises:
        ValueError: a target matches no parameter with two or more dimensions, a named cross_layer
            graph mixes shapes, or no graph has two nodes (the message lists what is there).
    """
    matrices = [name for name, shape in shapes.items() if len(shape) >= 2]
    if groups is not None:
        return [_named_group(name, members, matrices, shapes) for name, members in groups.items()]
    selected = matrices if targets is None else [n for n in matrices if _is_target(n, targets)]
    for pattern in targets or ():
        if not any(_is_target(n, (pattern,)) for n in matrices):
            raise ValueError(
                f"graph.targets: {pattern!r} matches no trainable matrix. Available roles: "
                f"{sorted({(layer_role(n) or (n, 0))[0] for n in matrices})[:20]}"
            )
    if kind == "rows":
        node_groups = [NodeGroup(n, "rows", (n,)) for n in selected if shapes[n][0] >= 2]
    else:
        node_groups = _cross_layer_groups(selected, shapes, strict=targets is not None)
    if not node_groups:
        raise ValueError(
            f"no {kind} graph has two nodes among {len(selected)} trainable matrices: cross_layer needs a "
            "parameter role repeated in two or more numbered layers (layers.<i>.) with equal shapes; for "
            "other models name the nodes with graph.groups, or use kind: rows (a graph per matrix)"
        )
    return node_groups


def _is_target(name: str, targets: Sequence[str]) -> bool:
    """Whether the parameter ``name`` or a module that holds it is named by ``targets``."""
    return within(name, targets)


def _named_group(
    name: str, members: Sequence[str], matrices: Sequence[str], shapes: Mapping[str, Sequence[int]]
) -> NodeGroup:
    """The cross_layer graph ``name`` whose nodes are the matrices ``members`` name, in that order."""
    params: list[str] = []
    for pattern in members:
        found = [n for n in matrices if _is_target(n, (pattern,))]
        if not found:
            raise ValueError(f"graph.groups[{name!r}]: {pattern!r} matches no trainable matrix")
        params += [n for n in found if n not in params]
    found_shapes = sorted({tuple(shapes[p]) for p in params})
    if len(params) < 2 or len(found_shapes) > 1:
        raise ValueError(
            f"graph.groups[{name!r}] must name two or more matrices of one shape; it names {params[:6]} "
            f"with shapes {found_shapes}"
        )
    return NodeGroup(name, "cross_layer", tuple(params))


def _cross_layer_groups(
    names: Sequence[str], shapes: Mapping[str, Sequence[int]], strict: bool
) -> list[NodeGroup]:
    roles: dict[str, list[tuple[int, str]]] = {}
    unequal: list[str] = []
    for name in names:
        split = layer_role(name)
        if split is not None:
            roles.setdefault(split[0], []).append((split[1], name))
    groups = []
    for role, members in roles.items():
        params = tuple(name for _, name in sorted(members))
        if len(params) < 2:
            continue
        if len({tuple(shapes[p]) for p in params}) > 1:
            message = (
                f"cross_layer graph {role}: its layers have different shapes "
                f"{sorted({tuple(shapes[p]) for p in params})[:4]} (e.g. LoRSA with budget=global adapts a "
                "different number of components per layer), and a node axis needs equal node vectors"
            )
            if strict:
                raise ValueError(f"{message}; exclude it from graph.targets, or use kind: rows")
            unequal.append(role)
            continue
        groups.append(NodeGroup(role, "cross_layer", params))
    if unequal:
        warnings.warn(
            f"cross_layer graphs over {len(unequal)} parameter role(s) left out because their layers differ "
            f"in shape, e.g. {unequal[:3]}; the other roles form graphs (name them in graph.targets to "
            "make this an error, or use kind: rows)",
            stacklevel=3,
        )
    return groups


def structural_weights(m: int, neighbors: int | None) -> torch.Tensor:
    """W_ij = 1 for 0 < |i − j| ≤ neighbors (a chain for 1; complete for None), float64."""
    index = torch.arange(m)
    distance = (index[:, None] - index[None, :]).abs()
    reach = m if neighbors is None else neighbors
    return ((distance > 0) & (distance <= reach)).double()


def gram(nodes: torch.Tensor) -> torch.Tensor:
    """K = θ θᵀ (m x m, float64 on the CPU): sums over shards give the Gram of the whole nodes. K is
    made exactly symmetric, (K + Kᵀ)/2: a float32 product θ θᵀ is not for every shape (BLAS blocks
    K_ij and K_ji differently), and an asymmetric W has no real Laplacian spectrum."""
    nodes = nodes.float()
    product = (nodes @ nodes.T).double().cpu()
    return (product + product.T) / 2


def cosine_weights(gram_matrix: torch.Tensor) -> torch.Tensor:
    """W_ij = max(0, K_ij / sqrt(K_ii K_jj)) for i ≠ j, 0 on the diagonal; zero nodes get no edge."""
    norms = gram_matrix.diagonal().clamp_min(0).sqrt()
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    cosine = (gram_matrix * scale[:, None] * scale[None, :]).clamp(0.0, 1.0)
    return cosine.fill_diagonal_(0.0)


def knn_sparsify(weights: torch.Tensor, neighbors: int | None) -> torch.Tensor:
    """Keep W_ij when j is among the ``neighbors`` heaviest edges of i, or i among those of j."""
    m = weights.shape[0]
    if neighbors is None or neighbors >= m - 1:
        return weights.clone()
    masked = weights.clone().fill_diagonal_(float("-inf"))
    top = masked.topk(neighbors, dim=1).indices
    keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, top, True)
    return torch.where(keep | keep.T, weights, torch.zeros_like(weights))
