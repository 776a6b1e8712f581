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
BLAS product with the centroids, O(m² s / CELL_SIZE)). The probes are calibrated: the fewest whose
recall on :data:`CALIBRATION_QUERIES` sampled points, against their exact neighbours, reaches the
target (:data:`TARGET_RECALL` unless given), so the approximate path's result is as good as asked
whatever the sketches' structure (real gradient sketches are weakly clustered and need many more
probes than planted groups). The recall reached is returned with the neighbours. The cells store
the points in half precision (IVF-SQfp16): a fifth less time than single precision at a million
points, the same neighbours on the benchmark's sketches, and distances within about 1e-3 of the
exact ones (half precision's 2⁻¹¹ relative error per coordinate), far inside the approximation of
the search. ``auto`` takes the exact search up to :func:`exact_nodes` points (per device).
:func:`neighbour_recall` measures how many of the exact neighbours an approximate graph found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from spec_lightning.spectral.optional import require

NeighborSearch = Literal["auto", "exact", "ivf"]

#: ``auto`` searches exactly up to this many points, per device type (any other type: the CPU's). CPU:
#: up to where the exact search costs twice the IVF search at :data:`TARGET_RECALL` on real sketches
#: (2 threads; SmolLM2-135M, ``benchmarks/clustering_cost.py``: 1.8x at 46,080 blocks, 2.3x at 92,160;
#: the planted sketches of ``benchmarks/neighbor_search.py`` need fewer probes, so there IVF pays
#: sooner). Below it the modules are exactly the method's. CUDA: an estimate until the GPU suite's
#: ``neighbors`` stage measures it: the blocked search at 10⁶ points is 6.4·10¹³ flops of matmul,
#: seconds on an H100.
EXACT_NODES: dict[str, int] = {"cpu": 50_000, "cuda": 1_000_000}
#: Mean points per IVF cell: nlist = m / CELL_SIZE.
CELL_SIZE = 256
#: Training sample per IVF cell (faiss warns below 39; the cells only route queries: at 10⁶ points 16
#: train in about half the time of 32, recall 0.26 against 0.24 on the benchmark's sketches).
TRAINING_POINTS_PER_CELL = 16
#: Lloyd iterations of the IVF k-means.
TRAINING_ITERATIONS = 5
#: The IVF search's default: the fraction of the exact neighbours it must find. On real SmolLM2-135M
#: sketches (46,080 and 92,160 blocks) a recall of 0.96-0.97 gave modules at ARI 0.92-0.94 to the exact
#: path's, 0.99 at 0.96-0.98 (``benchmarks/clustering_cost.py``, its real-sketch table).
TARGET_RECALL = 0.99
#: Points whose exact neighbours calibrate the probes and estimate the recall.
CALIBRATION_QUERIES = 500
#: The first probe count tried; each next one is half as many again.
FIRST_PROBES = 4
#: Distances one block of the exact search holds at once, per device type (float32: 64 MiB on the
#: CPU, 1 GiB on a GPU, where fewer, larger blocks keep it busy).
BLOCK_ELEMENTS: dict[str, int] = {"cpu": 2**24, "cuda": 2**28}
#: Candidates beyond k kept from the float32 distances for the float64 re-ranking.
RERANK_MARGIN = 8


@dataclass(frozen=True)
class Neighbours:
    """A k-NN search's result: ``distances`` and ``indices`` (m, k), nearest first (missing: index −1,
    distance inf); ``recall``: the fraction of the exact neighbours found (1 for the exact search, else
    measured on :data:`CALIBRATION_QUERIES` sampled points); ``probes``: the IVF cells scanned per
    query (0 for the exact search)."""

    distances: np.ndarray
    indices: np.ndarray
    recall: float
    probes: int


def exact_nodes(device: torch.device | str = "cpu") -> int:
    """Up to how many points ``auto`` searches exactly on ``device`` (:data:`EXACT_NODES`)."""
    return EXACT_NODES.get(torch.device(device).type, EXACT_NODES["cpu"])


def nearest_neighbours(
    points: np.ndarray,
    neighbors: int,
    search: NeighborSearch = "auto",
    probes: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    recall: float = TARGET_RECALL,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of :func:`search_neighbours`."""
    found = search_neighbours(points, neighbors, search, probes, seed, device, recall)
    return found.distances, found.indices


def search_neighbours(
    points: np.ndarray,
    neighbors: int,
    search: NeighborSearch = "auto",
    probes: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    recall: float = TARGET_RECALL,
) -> Neighbours:
    """The euclidean distance to and index of every row's ``neighbors`` nearest other rows, nearest
    first.

    ``exact`` (or ``auto`` up to :func:`exact_nodes` points): every distance, on ``device`` when that
    is a GPU (:func:`blocked_exact_neighbours`), else by scikit-learn on the CPU. ``ivf``: faiss' IVF
    index, scanning ``probes`` cells per query; by default (``probes=None``) the fewest probes whose
    recall on :data:`CALIBRATION_QUERIES` sampled points (against their exact neighbours) reaches
    ``recall``, trying :data:`FIRST_PROBES` and then half as many again each time, up to every cell.
    The IVF search can return fewer than ``neighbors`` (its probed cells held too few points):
    missing entries have index −1 and distance inf.
    """
    m = points.shape[0]
    if search not in get_args(NeighborSearch):
        raise ValueError(f"neighbor search must be one of {get_args(NeighborSearch)}, got {search!r}")
    if not 1 <= neighbors < m:
        raise ValueError(f"cannot find {neighbors} neighbours among {m} points; use 1 to {m - 1}")
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"the target recall must lie in (0, 1], got {recall}")
    if probes is not None and probes < 1:
        raise ValueError(f"probes must be at least 1 (or None: calibrated to the recall), got {probes}")
    if search == "exact" or (search == "auto" and m <= exact_nodes(device)):
        if torch.device(device).type != "cpu":
            distances, indices = blocked_exact_neighbours(points, neighbors, device)
        else:
            index = NearestNeighbors(n_neighbors=neighbors, algorithm="brute").fit(points)
            distances, indices = index.kneighbors(n_neighbors=neighbors)  # each point's own row left out
        return Neighbours(distances, indices, 1.0, 0)
    return _ivf_neighbours(np.ascontiguousarray(points, dtype=np.float32), neighbors, probes, seed, recall)


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
    :data:`BLOCK_ELEMENTS` distances at a time, by device type).
    """
    m = points.shape[0]
    exact = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64)).to(device)
    exact = exact - exact.mean(0)
    fast = exact.float()
    norms = (fast * fast).sum(1)  # (m,)
    keep = min(m - 1, neighbors + RERANK_MARGIN)
    elements = BLOCK_ELEMENTS.get(exact.device.type, BLOCK_ELEMENTS["cpu"])
    block = rows_per_block or max(1, elements // m)
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
    points: np.ndarray, neighbors: int, probes: int | None, seed: int, recall: float
) -> Neighbours:
    faiss = require(
        "faiss", "the approximate neighbour search (neighbor_search 'ivf', or 'auto' above the exact size)"
    )

    faiss.omp_set_num_threads(torch.get_num_threads())  # the threads the user gave torch, no more
    m, dim = points.shape
    cells = max(1, m // CELL_SIZE)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, cells, faiss.ScalarQuantizer.QT_fp16)
    index.cp.niter = TRAINING_ITERATIONS
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # silences faiss' warning about the deliberately small sample
    index.cp.max_points_per_centroid = TRAINING_POINTS_PER_CELL
    rng = np.random.default_rng(seed)
    sample = rng.choice(m, min(m, cells * TRAINING_POINTS_PER_CELL), replace=False)
    index.train(points[np.sort(sample)])
    index.add(points)
    # The calibration points' exact neighbours: one exhaustive pass of CALIBRATION_QUERIES rows.
    queries = np.sort(rng.choice(m, min(m, CALIBRATION_QUERIES), replace=False))
    exhaustive = faiss.IndexFlatL2(dim)
    exhaustive.add(points)
    exact = _without_itself(exhaustive.search(points[queries], neighbors + 1), queries)[1]

    def measured(count: int) -> float:
        index.nprobe = count
        found = _without_itself(index.search(points[queries], neighbors + 1), queries)[1]
        return neighbour_recall(found, exact)

    count = min(probes or FIRST_PROBES, cells)
    reached = measured(count)
    while probes is None and reached < recall and count < cells:
        count = min(cells, math.ceil(count * 1.5))
        reached = measured(count)
    index.nprobe = count
    squared, found = _without_itself(index.search(points, neighbors + 1), np.arange(m))
    distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float64)
    distances[found < 0] = np.inf
    return Neighbours(distances, found.astype(np.int64), reached, count)


def _without_itself(
    searched: tuple[np.ndarray, np.ndarray], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k + 1 results (squared distances, indices) less the point itself; where a duplicate
    hid it (or the search missed it), less the farthest."""
    squared, found = searched
    itself = found == rows[:, None]
    itself[~itself.any(axis=1), -1] = True
    keep = ~itself
    n, k = found.shape[0], found.shape[1] - 1
    return squared[keep].reshape(n, k), found[keep].reshape(n, k)


def neighbour_recall(approximate: np.ndarray, exact: np.ndarray) -> float:
    """The fraction of exact neighbours (rows of ``exact`` indices) that the approximate search found,
    averaged over rows: 1 for an exact graph."""
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approximate, exact, strict=True)]
    return float(np.mean(hits) / exact.shape[1])
