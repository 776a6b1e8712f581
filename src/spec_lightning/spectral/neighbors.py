"""The k nearest neighbours of every gradient sketch, exactly or through an approximate index.

``exact``: every distance is computed, O(m² s). On the CPU by scikit-learn's brute force (its ArgKmin
reduction: blocked, threaded, float64, a heap per row); on a GPU in blocks of rows against all points on
torch matmuls (:func:`blocked_exact_neighbours`: each block's k nearest in float32 from ||a||² + ||b||² −
2 a·b of the centred points, then those candidates and a margin re-ranked by their float64 distances).
On 2 CPU threads scikit-learn's path took 0.3–0.5x the torch path's time at 4,000–10,000 points
(``benchmarks/neighbor_search.py``), so the CPU keeps it. ``ivf``: faiss' inverted
file index: k-means splits the m points into m / :data:`CELL_SIZE` cells (centroids trained on a seeded
sample of :data:`TRAINING_POINTS_PER_CELL` points per cell), and each query scans only the points of
its ``probes`` nearest cells, O(m · probes · CELL_SIZE · s), after its assignment to the cells (one
BLAS product with the centroids, O(m² s / CELL_SIZE)). The cells store the points in half precision
(IVF-SQfp16): a fifth less time than single precision at a million points, the same neighbours on
the benchmark's sketches, and distances within about 1e-3 of the exact ones (half precision's 2⁻¹¹
relative error per coordinate), far inside the approximation of the search. ``auto`` takes the exact
search up to :data:`EXACT_NODES` points. :func:`neighbour_recall` measures how many of the exact
neighbours an approximate graph found.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from spec_lightning.spectral.optional import require

NeighborSearch = Literal["auto", "exact", "ivf"]

#: ``auto`` searches exactly up to this many points.
EXACT_NODES = 20_000
#: Mean points per IVF cell: nlist = m / CELL_SIZE.
CELL_SIZE = 256
#: Training sample per IVF cell (faiss warns below 39; the cells only route queries: at 10⁶ points 16
#: train in about half the time of 32, recall 0.26 against 0.24 on the benchmark's sketches).
TRAINING_POINTS_PER_CELL = 16
#: Lloyd iterations of the IVF k-means.
TRAINING_ITERATIONS = 5
#: Cells scanned per query by default.
PROBES = 4
#: Distances one block of the exact search holds at once (float32: 64 MiB).
BLOCK_ELEMENTS = 2**24
#: Candidates beyond k kept from the float32 distances for the float64 re-ranking.
RERANK_MARGIN = 8


def nearest_neighbours(
    points: np.ndarray,
    neighbors: int,
    search: NeighborSearch = "auto",
    probes: int = PROBES,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (m, neighbors): the euclidean distance to and index of every row's
    nearest other rows, nearest first. The IVF search can return fewer than ``neighbors`` (its
    probed cells held too few points): missing entries have index −1 and distance inf. The exact search
    runs on ``device`` when that is a GPU, else scikit-learn's on the CPU.
    """
    m = points.shape[0]
    if search not in get_args(NeighborSearch):
        raise ValueError(f"neighbor search must be one of {get_args(NeighborSearch)}, got {search!r}")
    if not 1 <= neighbors < m:
        raise ValueError(f"cannot find {neighbors} neighbours among {m} points; use 1 to {m - 1}")
    if search == "exact" or (search == "auto" and m <= EXACT_NODES):
        if torch.device(device).type != "cpu":
            return blocked_exact_neighbours(points, neighbors, device)
        index = NearestNeighbors(n_neighbors=neighbors, algorithm="brute").fit(points)
        return index.kneighbors(n_neighbors=neighbors)  # each point's own row is left out
    return _ivf_neighbours(np.ascontiguousarray(points, dtype=np.float32), neighbors, probes, seed)


def blocked_exact_neighbours(
    points: np.ndarray,
    neighbors: int,
    device: torch.device | str = "cpu",
    rows_per_block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest other rows of every row, (distances, indices) each (m, k), nearest first (ties:
    the lower index first), computed a block of rows at a time against all points.

    Per block: squared distances ||a||² + ||b||² − 2 a·b, less the row's own constant ||a||², in float32
    on ``device`` (one addmm; the points are centred first, which leaves distances unchanged and keeps
    the expansion's cancellation small), the row's own point excluded, the k + :data:`RERANK_MARGIN`
    smallest kept, and those re-ranked by their float64 distances computed directly, so float32
    rounding cannot reorder near ties. A block holds ``rows_per_block`` rows (default:
    :data:`BLOCK_ELEMENTS` distances at a time).
    """
    m = points.shape[0]
    exact = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64)).to(device)
    exact = exact - exact.mean(0)
    fast = exact.float()
    norms = (fast * fast).sum(1)  # (m,)
    keep = min(m - 1, neighbors + RERANK_MARGIN)
    block = rows_per_block or max(1, BLOCK_ELEMENTS // m)
    distances, indices = [], []
    for start in range(0, m, block):
        rows = torch.arange(start, min(m, start + block), device=exact.device)
        # ||b||² − 2 a·b: the row's own ||a||² does not change its ranking (one fused addmm)
        ranked = torch.addmm(norms[None, :], fast[rows], fast.T, alpha=-2.0)  # (b, m)
        ranked[torch.arange(len(rows), device=exact.device), rows] = float("inf")  # not itself
        candidates = ranked.topk(keep, dim=1, largest=False).indices.sort(dim=1).values  # (b, keep)
        true = (exact[rows, None, :] - exact[candidates]).norm(dim=-1)  # (b, keep), float64
        order = true.argsort(dim=1, stable=True)[:, :neighbors]  # equal distances: lower index first
        distances.append(true.gather(1, order).cpu())
        indices.append(candidates.gather(1, order).cpu())
    return torch.cat(distances).numpy(), torch.cat(indices).numpy().astype(np.int64)


def _ivf_neighbours(
    points: np.ndarray, neighbors: int, probes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    faiss = require(
        "faiss", "the approximate neighbour search (neighbor_search 'ivf', or 'auto' above 20,000 blocks)"
    )

    faiss.omp_set_num_threads(torch.get_num_threads())  # the threads the user gave torch, no more
    m, dim = points.shape
    cells = max(1, m // CELL_SIZE)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, cells, faiss.ScalarQuantizer.QT_fp16)
    index.cp.niter = TRAINING_ITERATIONS
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # silences faiss' warning about the deliberately small sample
    index.cp.max_points_per_centroid = TRAINING_POINTS_PER_CELL
    sample = np.random.default_rng(seed).choice(m, min(m, cells * TRAINING_POINTS_PER_CELL), replace=False)
    index.train(points[np.sort(sample)])
    index.add(points)
    index.nprobe = min(probes, cells)
    squared, found = index.search(points, neighbors + 1)
    # Drop each point itself; where a duplicate hid it (or the search missed it), drop the farthest.
    itself = found == np.arange(m)[:, None]
    itself[~itself.any(axis=1), -1] = True
    keep = ~itself
    squared = squared[keep].reshape(m, neighbors)
    found = found[keep].reshape(m, neighbors)
    distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float64)
    distances[found < 0] = np.inf
    return distances, found.astype(np.int64)


def neighbour_recall(approximate: np.ndarray, exact: np.ndarray) -> float:
    """The fraction of exact neighbours (rows of ``exact`` indices) that the approximate search found,
    averaged over rows: 1 for an exact graph."""
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approximate, exact, strict=True)]
    return float(np.mean(hits) / exact.shape[1])
