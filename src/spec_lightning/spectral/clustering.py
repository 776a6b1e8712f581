"""Dynamic spectral clustering of parameter blocks (MFTC's DSCA, METHODS.md §4), as pure functions.

One update, from the gradient sketches g_i(t) of m blocks:

1. S(t): the similarity of every block to its k nearest neighbours (cosine, negatives as 0, or the
   Gaussian kernel exp(−||g_i − g_j||² / 2σ²), σ = median neighbour distance), symmetrised; a block
   whose sketch is zero (no gradient since the last update) gets no edges in S(t); the neighbours
   are searched exactly up to 50,000 blocks (10⁶ on a GPU), beyond through an IVF index whose probes
   are calibrated to find a target fraction of the exact neighbours (0.99 by default)
   (:mod:`~spec_lightning.spectral.neighbors`);
2. W(t) = α W(t−1) + (1 − α) S(t), pruned again to the k strongest edges per node: O(m k) edges, k of
   order log m;
3. L_sym = I − D^{-1/2} W D^{-1/2}; its r smallest eigenvectors U(t) by LOBPCG started from U(t−1),
   with a periodic full recompute (dense, or LOBPCG from a multilevel start for large graphs), until
   the eigengap of step 4 is certified and the eigenvectors below it converged; a solve whose
   residual is over the tolerance falls back to a dense or fresh one, and says so
   (:mod:`~spec_lightning.spectral.eigensolve`);
4. k-means on the unit-normalised rows of U(t)[:, :k] (Ng, Jordan and Weiss), k ∈ [k_min, k_max]
   chosen by the largest eigengap (fitted on a sample of 50,000 rows of larger embeddings, then
   every row assigned); clusters under ``min_size`` blocks merge into the nearest centroid,
   clusters over ``max_size`` are split in two by k-means until none is;
5. labels aligned to the previous clustering (Hungarian matching on the overlap), so module ids are
   stable, and its stability measured by NMI and ARI.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from spec_lightning.spectral.eigensolve import (
    DENSE_NODES,
    GUARD_VECTORS,
    multilevel_start,
    normalized_laplacian,
    smallest_eigenvectors,
)
from spec_lightning.spectral.neighbors import TARGET_RECALL, NeighborSearch
from spec_lightning.spectral.optional import available
from spec_lightning.spectral.similarity import (  # S(t) and W(t), steps 1-2 (re-exported here)
    Kernel,
    _knn_similarity,
    default_neighbors,
    ema_weights,
    keep_strongest,
    knn_similarity,
)

__all__ = ["Kernel", "default_neighbors", "ema_weights", "keep_strongest", "knn_similarity"]

#: k-means fits its centroids on a seeded sample of this many rows of a larger embedding.
KMEANS_SAMPLE = 50_000


def eigengap_clusters(values: np.ndarray, k_min: int, k_max: int) -> int:
    """The k in [k_min, k_max] with the largest gap λ_{k+1} − λ_k (λ ascending, 1-based)."""
    k_max = min(k_max, len(values) - 1)
    if k_min > k_max:
        raise ValueError(f"need more than {k_min} eigenvalues to choose between {k_min} and {k_max} clusters")
    gaps = values[k_min : k_max + 1] - values[k_min - 1 : k_max]
    return k_min + int(np.argmax(gaps))


def embed_rows(vectors: np.ndarray, k: int) -> np.ndarray:
    """The spectral embedding: the rows of U[:, :k], scaled to unit length."""
    rows = vectors[:, :k]
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def kmeans_labels(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """sklearn k-means (10 restarts, seeded) labels of ``points``; beyond :data:`KMEANS_SAMPLE` rows the
    centroids are fitted on a seeded sample of that many and every row takes its nearest centroid."""
    model = KMeans(n_clusters=k, n_init=10, random_state=seed)
    if len(points) <= KMEANS_SAMPLE:
        return model.fit_predict(points)
    sample = np.random.default_rng(seed).choice(len(points), KMEANS_SAMPLE, replace=False)
    return model.fit(points[np.sort(sample)]).predict(points)


def bound_sizes(
    points: np.ndarray, labels: np.ndarray, min_size: int, max_size: int, seed: int
) -> np.ndarray:
    """Merge clusters under ``min_size`` into the nearest centroid's cluster (smallest first), then split
    clusters over ``max_size`` in two by k-means (at the median of the principal axis when k-means
    leaves a half under ``min_size``) until none is; labels come back as 0..k−1."""
    if 2 * min_size > max_size:
        raise ValueError(f"max_size {max_size} must be at least twice min_size {min_size}")
    labels = np.unique(labels, return_inverse=True)[1]
    while True:
        ids, sizes = np.unique(labels, return_counts=True)
        if len(ids) < 2 or sizes.min() >= min_size:
            break
        small = ids[np.argmin(sizes)]
        centroids = np.stack([points[labels == i].mean(axis=0) for i in ids])
        distances = np.linalg.norm(centroids - centroids[ids == small], axis=1)
        distances[ids == small] = np.inf
        labels[labels == small] = ids[np.argmin(distances)]
        labels = np.unique(labels, return_inverse=True)[1]
    while True:
        ids, sizes = np.unique(labels, return_counts=True)
        large = ids[sizes > max_size]
        if len(large) == 0:
            return labels
        members = np.flatnonzero(labels == large[0])
        halves = kmeans_labels(points[members], 2, seed)
        if min(halves.sum(), len(halves) - halves.sum()) < min_size:
            centred = points[members] - points[members].mean(axis=0)
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            position = np.argsort(np.argsort(centred @ axis))
            halves = (position >= len(members) // 2).astype(int)
        labels[members[halves == 1]] = labels.max() + 1


def align_labels(labels: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """Renumber ``labels`` so that each cluster takes the id of the previous cluster it overlaps most
    (Hungarian matching on the contingency table); unmatched clusters get fresh ids."""
    if previous is None:
        return labels
    ids = np.unique(labels)
    prev_ids = np.unique(previous)
    overlap = np.array([[np.sum((labels == a) & (previous == b)) for b in prev_ids] for a in ids])
    rows, cols = scipy.optimize.linear_sum_assignment(-overlap)
    mapping = {ids[r]: prev_ids[c] for r, c in zip(rows, cols, strict=True)}
    fresh = max(prev_ids.max(), ids.max()) + 1
    for a in ids:
        if a not in mapping:
            mapping[a] = fresh
            fresh += 1
    return np.array([mapping[a] for a in labels])


def stability(labels: np.ndarray, previous: np.ndarray | None) -> tuple[float, float]:
    """(NMI, ARI) between two consecutive clusterings; (1, 1) for the first."""
    if previous is None:
        return 1.0, 1.0
    return (
        float(normalized_mutual_info_score(previous, labels)),
        float(adjusted_rand_score(previous, labels)),
    )


@dataclass
class Module:
    """One module of the library: its blocks, size, mean gradient energy and stability (the Jaccard
    overlap with the module of the same id in the previous clustering)."""

    id: int
    blocks: list[int]
    parameters: int
    energy: float
    stability: float


def module_library(
    labels: np.ndarray, previous: np.ndarray | None, block_parameters: np.ndarray, energy: np.ndarray
) -> list[Module]:
    """The module library of a clustering: per module its blocks, parameter count, mean block energy
    (mean over its blocks of the averaged ||g_i||²) and stability."""
    library = []
    for module in np.unique(labels):
        members = labels == module
        if previous is None:
            overlap = 1.0
        else:
            before = previous == module
            overlap = float((members & before).sum() / max((members | before).sum(), 1))
        library.append(
            Module(
                id=int(module),
                blocks=np.flatnonzero(members).tolist(),
                parameters=int(block_parameters[members].sum()),
                energy=float(energy[members].mean()),
                stability=overlap,
            )
        )
    return library


@dataclass
class ClusteringUpdate:
    """What one update measured: modules chosen, stability against the previous clustering, timings."""

    modules: int
    nmi: float
    ari: float
    full_recompute: bool
    eigen_solver: str
    eigen_residual: float
    eigen_fallback: str
    neighbor_seconds: float
    neighbor_recall: float
    neighbor_probes: int
    eigen_seconds: float
    seconds: float


class SpectralClusterer:
    """DSCA's state across updates: W(t), U(t), the labels and the module library (steps 1–5 above).

    Args:
        kernel: ``cosine`` or ``gaussian`` similarity of block sketches.
        alpha: EMA factor α of W(t) (METHODS.md: 0.85–0.95).
        neighbors: edges kept per node (None: ⌈log₂ m⌉).
        eigenvectors: r, the eigenvectors kept and warm-started.
        clusters: (k_min, k_max); k is chosen by the largest eigengap.
        min_size: blocks below which a module merges into its nearest neighbour.
        max_size: blocks above which a module is split (None: no bound).
        full_recompute_every: every n-th update solves from scratch instead of warm-starting.
        seed: k-means, neighbour index and eigensolver seed.
        neighbor_search: ``exact``, ``ivf`` (approximate, linear in m) or ``auto`` (exact up to
            :func:`~spec_lightning.spectral.neighbors.exact_nodes` blocks on the clusterer's device).
        neighbor_recall: the fraction of the exact neighbours the approximate search must find (its
            probes are calibrated on a sample to reach it; each update reports the recall reached).
    """

    def __init__(
        self,
        kernel: Kernel = "cosine",
        alpha: float = 0.9,
        neighbors: int | None = None,
        eigenvectors: int = 16,
        clusters: tuple[int, int] = (8, 12),
        min_size: int = 4,
        max_size: int | None = None,
        full_recompute_every: int = 5,
        seed: int = 0,
        neighbor_search: NeighborSearch = "auto",
        neighbor_recall: float = TARGET_RECALL,
    ) -> None:
        if not 0.0 < neighbor_recall <= 1.0:
            raise ValueError(f"neighbor_recall must lie in (0, 1], got {neighbor_recall}")
        self.kernel = kernel
        self.neighbor_search = neighbor_search
        self.neighbor_recall = neighbor_recall
        self.alpha = alpha
        self.neighbors = neighbors
        self.eigenvectors = eigenvectors
        self.clusters = clusters
        self.min_size = min_size
        self.max_size = max_size
        self.full_recompute_every = full_recompute_every
        self.seed = seed
        #: Where the exact neighbour search runs: a GPU takes the blocked torch search (the callback sets
        #: the model's device at fit start); the CPU, scikit-learn's.
        self.device: torch.device | str = "cpu"
        self.updates = 0
        self.weights: scipy.sparse.csr_matrix | None = None
        self.vectors: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.block: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.previous: np.ndarray | None = None
        self.library: list[Module] = []

    def update(
        self, sketches: np.ndarray, energy: np.ndarray, block_parameters: np.ndarray
    ) -> ClusteringUpdate:
        """One DSCA update from the (m, s) sketches and (m,) mean squared gradient norms."""
        start = time.perf_counter()
        m = sketches.shape[0]
        neighbors = self.neighbors or default_neighbors(m)
        similarity, searched = _knn_similarity(
            sketches, neighbors, self.kernel, self.neighbor_search, self.seed, self.device,
            self.neighbor_recall,
        )  # fmt: skip
        neighbor_seconds = time.perf_counter() - start
        self.weights = ema_weights(self.weights, similarity, self.alpha, neighbors)
        lap = normalized_laplacian(self.weights)
        full = self.block is None or self.updates % self.full_recompute_every == 0
        eigen_start = time.perf_counter()
        num = min(self.eigenvectors, m - 1)
        begin, origin = (None, "fresh") if full else (self.block, "warm")
        stalled = ""
        if full and m > DENSE_NODES and available("pyamg"):  # without it: LOBPCG from a random block
            begin, origin = multilevel_start(self.weights, num + GUARD_VECTORS, self.seed), "multilevel"
            if begin is None:
                stalled = "no multilevel start (aggregation stalled: most blocks have no edges)"
        k_range = (min(self.clusters[0], m - 1), self.clusters[1])
        eigen = smallest_eigenvectors(lap, num, begin, self.seed, origin, k_range)
        self.values, self.vectors, self.block = eigen.values, eigen.vectors, eigen.block
        eigen_seconds = time.perf_counter() - eigen_start
        k = eigengap_clusters(self.values, *k_range)
        points = embed_rows(self.vectors, k)
        labels = kmeans_labels(points, k, self.seed)
        labels = bound_sizes(points, labels, self.min_size, self.max_size or m, self.seed)
        labels = align_labels(labels, self.labels)
        nmi, ari = stability(labels, self.labels)
        reasons = [reason for reason in (stalled, eigen.fallback) if reason]
        self.previous, self.labels = self.labels, labels
        self.library = module_library(labels, self.previous, block_parameters, energy)
        self.updates += 1
        return ClusteringUpdate(
            modules=len(self.library),
            nmi=nmi,
            ari=ari,
            full_recompute=full,
            eigen_solver=eigen.solver,
            eigen_residual=eigen.residual,
            eigen_fallback="; ".join([*reasons, f"solved by {eigen.solver}"]) if reasons else "",
            neighbor_seconds=neighbor_seconds,
            neighbor_recall=1.0 if searched is None else searched.recall,
            neighbor_probes=0 if searched is None else searched.probes,
            eigen_seconds=eigen_seconds,
            seconds=time.perf_counter() - start,
        )

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it."""
        weights = None if self.weights is None else self.weights.tocoo()
        return {
            "updates": self.updates,
            "weights": None
            if weights is None
            else {
                "row": torch.from_numpy(weights.row.astype(np.int64)),
                "col": torch.from_numpy(weights.col.astype(np.int64)),
                "data": torch.from_numpy(weights.data),
                "shape": list(weights.shape),
            },
            "vectors": _tensor(self.vectors),
            "block": _tensor(self.block),
            "values": _tensor(self.values),
            "labels": _tensor(self.labels),
            "previous": _tensor(self.previous),
            "library": [asdict(module) for module in self.library],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        w = state["weights"]
        self.weights = (
            None
            if w is None
            else scipy.sparse.csr_matrix(
                (w["data"].numpy(), (w["row"].numpy(), w["col"].numpy())), shape=tuple(w["shape"])
            )
        )
        self.vectors, self.values = _array(state["vectors"]), _array(state["values"])
        self.block = _array(state.get("block"))  # absent before warm starts kept the guard vectors
        self.labels, self.previous = _array(state["labels"]), _array(state["previous"])
        self.library = [Module(**module) for module in state["library"]]


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array))


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()
