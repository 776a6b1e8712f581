"""Steps 1-2 of a DSCA update (:mod:`~spec_lightning.spectral.clustering`): the k-NN similarity S(t) of
the blocks' gradient sketches and its exponential average W(t), both sparse, O(m k) edges."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import scipy.sparse
import torch

from spec_lightning.spectral.neighbors import TARGET_RECALL, NeighborSearch, Neighbours, search_neighbours

Kernel = Literal["cosine", "gaussian"]

#: Padded weights per ``torch.topk`` call when pruning W(t) (32 MiB of float64).
TOPK_CHUNK = 2**22


def default_neighbors(num_nodes: int) -> int:
    """k = ⌈log₂ m⌉ (at least 4, at most m − 1): O(m log m) edges."""
    return max(1, min(num_nodes - 1, max(4, math.ceil(math.log2(max(num_nodes, 2))))))


def knn_similarity(
    points: np.ndarray,
    neighbors: int,
    kernel: Kernel = "cosine",
    search: NeighborSearch = "auto",
    seed: int = 0,
    device: torch.device | str = "cpu",
    recall: float = TARGET_RECALL,
) -> scipy.sparse.csr_matrix:
    """S: symmetric sparse similarities of every row of ``points`` (m, s) to its ``neighbors`` nearest
    rows (:func:`~spec_lightning.spectral.neighbors.search_neighbours` by ``search``, an approximate
    search finding ``recall`` of them); no self loops, entries in [0, 1].

    A row that is all zeros (a block that got no gradient) has no direction: it gets no edges and is
    nobody's neighbour, as in :func:`~spec_lightning.spectral.graph.cosine_weights`.
    """
    return _knn_similarity(points, neighbors, kernel, search, seed, device, recall)[0]


def _knn_similarity(
    points: np.ndarray,
    neighbors: int,
    kernel: Kernel,
    search: NeighborSearch,
    seed: int,
    device: torch.device | str,
    recall: float,
) -> tuple[scipy.sparse.csr_matrix, Neighbours | None]:
    """:func:`knn_similarity` and the search's result (None: fewer than two active rows)."""
    m = points.shape[0]
    if kernel not in ("cosine", "gaussian"):
        raise ValueError(f"kernel must be cosine or gaussian, got {kernel!r}")
    norms = np.sqrt(np.einsum("ij,ij->i", points, points))
    active = np.flatnonzero(norms > 0)
    if len(active) < 2:
        return scipy.sparse.csr_matrix((m, m)), None
    points = points[active]
    if kernel == "cosine":  # on unit rows ||a − b||² = 2 − 2 cos: euclidean k-NN
        points = points / norms[active, None]
    reach = min(neighbors, len(active) - 1)
    searched = search_neighbours(points, reach, search, seed=seed, device=device, recall=recall)
    distances, found = searched.distances, searched.indices
    ascending, order = torch.from_numpy(found).sort(dim=1)  # columns ascending: W's rows stay sorted
    found, distances = ascending.numpy(), np.take_along_axis(distances, order.numpy(), axis=1)
    if kernel == "cosine":
        values = np.clip(1.0 - distances**2 / 2.0, 0.0, 1.0)
    else:
        sigma = float(np.median(distances[np.isfinite(distances)])) or 1.0
        values = np.exp(-(distances**2) / (2 * sigma**2))
    hit = found >= 0  # the IVF search marks a missing neighbour −1 (its distance inf)
    counts = np.zeros(m, dtype=np.int64)
    counts[active] = hit.sum(axis=1)
    columns = found[hit] if len(active) == m else active[found[hit]]
    full = scipy.sparse.csr_matrix((values[hit], columns, np.concatenate([[0], np.cumsum(counts)])), (m, m))
    return _symmetrised(full), searched  # no self loop: the search leaves each point out


def keep_strongest(weights: scipy.sparse.csr_matrix, neighbors: int) -> scipy.sparse.csr_matrix:
    """Keep each node's ``neighbors`` strongest edges (an edge survives if either end keeps it; among
    equal weights ``torch.topk`` chooses).

    Rows with more edges are grouped by length (up to 2, 4, 8, ... entries), each group's weights
    padded into a matrix and its rows' strongest found by one ``torch.topk`` (threaded) per chunk of
    :data:`TOPK_CHUNK` entries; the kept edges stay in W's order (and W's sorted indices sorted)."""
    weights = weights.tocsr()
    counts = np.diff(weights.indptr)
    keep = np.repeat(counts <= neighbors, counts)  # rows with no more edges keep them all
    data = torch.from_numpy(weights.data)
    lengths = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)
    for power in np.unique(lengths[counts > neighbors]):
        offsets = torch.arange(2**power)
        rows = np.flatnonzero((lengths == power) & (counts > neighbors))
        for chunk in np.array_split(rows, -(-len(rows) * len(offsets) // TOPK_CHUNK)):
            positions = torch.from_numpy(weights.indptr[chunk].astype(np.int64))[:, None] + offsets
            padded = offsets >= torch.from_numpy(counts[chunk])[:, None]
            values = data[positions.clamp_(max=len(data) - 1)].masked_fill_(padded, -np.inf)
            keep[torch.gather(positions, 1, values.topk(neighbors, dim=1).indices).numpy()] = True
    indptr = np.concatenate([[0], np.cumsum(np.minimum(counts, neighbors))])
    pruned = scipy.sparse.csr_matrix((weights.data[keep], weights.indices[keep], indptr), shape=weights.shape)
    return _symmetrised(pruned)


def _symmetrised(graph: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """max(G, Gᵀ), entry by entry, storing no zero; sorted indices in G give sorted indices out (the
    transpose is converted to CSR first, so SciPy merges two canonical matrices)."""
    return graph.maximum(graph.T.tocsr())


def ema_weights(
    previous: scipy.sparse.csr_matrix | None,
    similarity: scipy.sparse.csr_matrix,
    alpha: float,
    neighbors: int,
) -> scipy.sparse.csr_matrix:
    """W(t) = α W(t−1) + (1 − α) S(t), pruned to ``neighbors`` edges per node; W(0) = S(0)."""
    if previous is None:
        return similarity
    return keep_strongest((alpha * previous + (1.0 - alpha) * similarity).tocsr(), neighbors)
