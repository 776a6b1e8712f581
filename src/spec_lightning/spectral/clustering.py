"""Dynamic spectral clustering of parameter blocks (MFTC's DSCA, METHODS.md §4), as pure functions.

One update, from the gradient sketches g_i(t) of m blocks:

1. S(t): the similarity of every block to its k nearest neighbours (cosine, negatives as 0, or the
   Gaussian kernel exp(−||g_i − g_j||² / 2σ²), σ = median neighbour distance), symmetrised; a block
   whose sketch is zero (no gradient since the last update) gets no edges in S(t);
2. W(t) = α W(t−1) + (1 − α) S(t), pruned again to the k strongest edges per node: O(m k) edges, k of
   order log m;
3. L_sym = I − D^{-1/2} W D^{-1/2}; its r smallest eigenvectors U(t) by LOBPCG started from U(t−1),
   with a periodic full recompute (dense, or LOBPCG from a random block for large graphs); a solve
   whose residual is over :data:`RESIDUAL_TOLERANCE` falls back to a dense or fresh one, and says so;
4. k-means on the unit-normalised rows of U(t)[:, :k] (Ng, Jordan and Weiss), k ∈ [k_min, k_max]
   chosen by the largest eigengap; clusters under ``min_size`` blocks merge into the nearest centroid,
   clusters over ``max_size`` are split in two by k-means until none is;
5. labels aligned to the previous clustering (Hungarian matching on the overlap), so module ids are
   stable, and its stability measured by NMI and ARI.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

Kernel = Literal["cosine", "gaussian"]

#: Full eigensolves up to this many nodes are dense.
DENSE_NODES = 2048
#: Extra LOBPCG vectors beyond the r wanted.
GUARD_VECTORS = 4
#: Largest accepted eigen-residual max_k ||L u_k − λ_k u_k|| (LOBPCG stops at 1e-4 per vector).
RESIDUAL_TOLERANCE = 1e-3


def default_neighbors(num_nodes: int) -> int:
    """k = ⌈log₂ m⌉ (at least 4, at most m − 1): O(m log m) edges."""
    return max(1, min(num_nodes - 1, max(4, math.ceil(math.log2(max(num_nodes, 2))))))


def knn_similarity(points: np.ndarray, neighbors: int, kernel: Kernel = "cosine") -> scipy.sparse.csr_matrix:
    """S: symmetric sparse similarities of every row of ``points`` (m, s) to its ``neighbors`` nearest
    rows (sklearn ``NearestNeighbors``, brute force); no self loops, entries in [0, 1].

    A row that is all zeros (a block that got no gradient) has no direction: it gets no edges and is
    nobody's neighbour, as in :func:`~spec_lightning.spectral.graph.cosine_weights`.
    """
    m = points.shape[0]
    if kernel not in ("cosine", "gaussian"):
        raise ValueError(f"kernel must be cosine or gaussian, got {kernel!r}")
    norms = np.linalg.norm(points, axis=1)
    active = np.flatnonzero(norms > 0)
    if len(active) < 2:
        return scipy.sparse.csr_matrix((m, m))
    points = points[active]
    if kernel == "cosine":  # on unit rows ||a − b||² = 2 − 2 cos: euclidean k-NN, sklearn's fast path
        points = points / norms[active, None]
    reach = min(neighbors, len(active) - 1)
    index = NearestNeighbors(n_neighbors=reach + 1, algorithm="brute").fit(points)
    graph = index.kneighbors_graph(mode="distance", n_neighbors=reach).tocoo()  # excludes each point
    distances = graph.data
    if kernel == "cosine":
        values = np.clip(1.0 - distances**2 / 2.0, 0.0, 1.0)
    else:
        sigma = float(np.median(distances)) or 1.0
        values = np.exp(-(distances**2) / (2 * sigma**2))
    full = scipy.sparse.csr_matrix((values, (active[graph.row], active[graph.col])), shape=(m, m))
    full = full.maximum(full.T).tocsr()
    full.setdiag(0.0)
    full.eliminate_zeros()
    return full


def keep_strongest(weights: scipy.sparse.csr_matrix, neighbors: int) -> scipy.sparse.csr_matrix:
    """Keep each node's ``neighbors`` strongest edges (an edge survives if either end keeps it)."""
    coo = weights.tocoo()
    order = np.lexsort((-coo.data, coo.row))  # by row, strongest first
    rows = coo.row[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    keep = order[rank < neighbors]
    pruned = scipy.sparse.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=weights.shape)
    return pruned.maximum(pruned.T).tocsr()


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


def normalized_laplacian(weights: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """L_sym = I − D^{-1/2} W D^{-1/2} (SciPy's ``csgraph.laplacian(normed=True)``)."""
    return scipy.sparse.csgraph.laplacian(weights.astype(np.float64), normed=True).tocsr()


class Eigenpairs(NamedTuple):
    """The r smallest eigenpairs of L_sym, ascending, and how they were found.

    Attributes:
        values: (r,) eigenvalues.
        vectors: (m, r) unit eigenvectors.
        residual: max_k ||L u_k − λ_k u_k||.
        solver: ``dense``, ``lobpcg-warm``, ``lobpcg-fresh`` or ``eigsh``: the solve that was kept.
        iterations: LOBPCG iterations of the kept solve (0 for the others).
        fallback: why the first solve was not kept ("" when it was).
        block: (m, r + guard) the whole block of the solve, the warm start of the next one (the
            guard vectors converged too: a start with random guards takes nearly as long as none).
    """

    values: np.ndarray
    vectors: np.ndarray
    residual: float
    solver: str
    iterations: int
    fallback: str
    block: np.ndarray


def smallest_eigenvectors(
    lap: scipy.sparse.csr_matrix, num: int, start: np.ndarray | None = None, seed: int = 0
) -> Eigenpairs:
    """The ``num`` smallest eigenpairs of L_sym, ascending, checked for convergence.

    With ``start`` (the previous solve's ``block``, r to r + :data:`GUARD_VECTORS` columns) LOBPCG
    refines it in a few iterations (graphs too small for LOBPCG are solved densely). A full solve is
    LAPACK's ``eigh`` up to :data:`DENSE_NODES` nodes, else LOBPCG from a seeded random block. Both
    block methods keep repeated eigenvalues (one zero per connected component of a k-NN graph),
    which single-vector Lanczos (``eigsh``) can miss.
    A LOBPCG result whose residual max_k ||L u_k − λ_k u_k|| exceeds :data:`RESIDUAL_TOLERANCE` is
    not used: the solve falls back to ``eigh`` (small graphs), else to a fresh LOBPCG and then to
    ``eigsh``, and ``fallback`` says why. A residual still above the tolerance after that raises.
    """
    m = lap.shape[0]
    if not 1 <= num < m:
        raise ValueError(f"cannot compute {num} eigenvectors of a graph with {m} nodes; use fewer")
    lobpcg_fits = m >= 5 * (num + GUARD_VECTORS)
    if not lobpcg_fits and m > DENSE_NODES:
        raise ValueError(
            f"LOBPCG needs at least 5 x {num + GUARD_VECTORS} nodes, got {m}; compute fewer eigenvectors"
        )
    if m <= DENSE_NODES and (start is None or not lobpcg_fits):
        return _dense(lap, num, "")
    warm = start is not None and start.shape[0] == m and num <= start.shape[1] <= num + GUARD_VECTORS
    result = _lobpcg(lap, num, start if warm else None, seed)
    if result.residual <= RESIDUAL_TOLERANCE:
        return result
    reason = f"{result.solver} residual {result.residual:.2e} > {RESIDUAL_TOLERANCE:.0e}"
    if m <= DENSE_NODES:
        return _dense(lap, num, reason)
    if warm:
        result = _lobpcg(lap, num, None, seed)
        if result.residual <= RESIDUAL_TOLERANCE:
            return result._replace(fallback=reason)
    wanted = min(num + GUARD_VECTORS, m - 1)
    values, vectors = scipy.sparse.linalg.eigsh(lap, k=wanted, which="SA", tol=1e-8)
    order = np.argsort(values)
    values, block = values[order], np.ascontiguousarray(vectors[:, order])
    residual = eigen_residual(lap, values[:num], block[:, :num])
    if residual > RESIDUAL_TOLERANCE:
        raise RuntimeError(
            f"no eigensolver converged on the {m}-node clustering graph ({reason}; eigsh residual "
            f"{residual:.2e}); compute fewer eigenvectors or raise neighbors"
        )
    return Eigenpairs(values[:num], block[:, :num].copy(), residual, "eigsh", 0, reason, block)


def _dense(lap: scipy.sparse.csr_matrix, num: int, fallback: str) -> Eigenpairs:
    wanted = min(num + GUARD_VECTORS, lap.shape[0])
    values, block = scipy.linalg.eigh(lap.toarray(), subset_by_index=[0, wanted - 1])
    values, vectors = values[:num], np.ascontiguousarray(block[:, :num])
    return Eigenpairs(values, vectors, eigen_residual(lap, values, vectors), "dense", 0, fallback, block)


def _lobpcg(lap: scipy.sparse.csr_matrix, num: int, start: np.ndarray | None, seed: int) -> Eigenpairs:
    """LOBPCG from ``start`` plus seeded guard vectors (a random block when ``start`` is None); the
    guard vectors make the wanted block's last vector converge as fast as the others."""
    m = lap.shape[0]
    block = np.random.default_rng(seed).standard_normal((m, num + GUARD_VECTORS))
    if start is not None:
        block[:, : start.shape[1]] = start
    with warnings.catch_warnings():  # it warns when only the guard vectors lag; the residual is checked
        warnings.simplefilter("ignore", UserWarning)
        values, vectors, history = scipy.sparse.linalg.lobpcg(
            lap, block, largest=False, tol=1e-4, maxiter=1000 if start is None else 200,
            retResidualNormsHistory=True,
        )  # fmt: skip
    order = np.argsort(values)
    values, block = values[order], np.ascontiguousarray(vectors[:, order])
    block /= np.linalg.norm(block, axis=0, keepdims=True)
    values, vectors = values[:num], np.ascontiguousarray(block[:, :num])
    solver = "lobpcg-fresh" if start is None else "lobpcg-warm"
    residual = eigen_residual(lap, values, vectors)
    return Eigenpairs(values, vectors, residual, solver, len(history), "", block)


def eigen_residual(lap: scipy.sparse.csr_matrix, values: np.ndarray, vectors: np.ndarray) -> float:
    """max_k ||L u_k − λ_k u_k|| over unit eigenvectors: how well the solver converged."""
    return float(np.linalg.norm(lap @ vectors - vectors * values, axis=0).max())


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
    """sklearn k-means (10 restarts, seeded) labels of ``points``."""
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)


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
    eigen_residual: float
    eigen_fallback: str
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
        seed: k-means and eigensolver seed.
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
    ) -> None:
        self.kernel = kernel
        self.alpha = alpha
        self.neighbors = neighbors
        self.eigenvectors = eigenvectors
        self.clusters = clusters
        self.min_size = min_size
        self.max_size = max_size
        self.full_recompute_every = full_recompute_every
        self.seed = seed
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
        similarity = knn_similarity(sketches, neighbors, self.kernel)
        self.weights = ema_weights(self.weights, similarity, self.alpha, neighbors)
        lap = normalized_laplacian(self.weights)
        full = self.block is None or self.updates % self.full_recompute_every == 0
        eigen_start = time.perf_counter()
        eigen = smallest_eigenvectors(
            lap, min(self.eigenvectors, m - 1), None if full else self.block, self.seed
        )
        self.values, self.vectors, self.block = eigen.values, eigen.vectors, eigen.block
        eigen_seconds = time.perf_counter() - eigen_start
        k = eigengap_clusters(self.values, min(self.clusters[0], m - 1), self.clusters[1])
        points = embed_rows(self.vectors, k)
        labels = kmeans_labels(points, k, self.seed)
        labels = bound_sizes(points, labels, self.min_size, self.max_size or m, self.seed)
        labels = align_labels(labels, self.labels)
        nmi, ari = stability(labels, self.labels)
        self.previous, self.labels = self.labels, labels
        self.library = module_library(labels, self.previous, block_parameters, energy)
        self.updates += 1
        return ClusteringUpdate(
            modules=len(self.library),
            nmi=nmi,
            ari=ari,
            full_recompute=full,
            eigen_residual=eigen.residual,
            eigen_fallback=f"{eigen.fallback}; solved again by {eigen.solver}" if eigen.fallback else "",
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
