"""The r smallest eigenpairs of a graph's normalised Laplacian L_sym = I − D^{-1/2} W D^{-1/2}.

Small graphs are solved densely (LAPACK). Larger ones by LOBPCG, started from the previous solve's
block (a warm start: the graph moved a little since), or, for a solve from scratch, from
:func:`multilevel_start`: the eigenvectors of Galerkin-coarsened graphs, prolongated back. Every
solve is checked by its residual max_k ||L u_k − λ_k u_k||, and one that did not converge falls back
to a slower, surer one and says why. A clustering uses only the eigenvectors below its eigengap: given
the range of cluster counts, LOBPCG stops once the gap is certified (:func:`certified_gap`) and the
vectors below it converged, instead of converging vectors inside the spectrum's bulk that nobody uses.
Above :data:`DENSE_NODES` nodes LOBPCG iterates in single precision on torch's threads (its block
algebra and sparse products are bound by memory traffic: at a million nodes the same iterations take
about half the time); every check (residuals, the certificate) is made in double precision against L.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch

from spec_lightning.spectral.optional import require

#: Full eigensolves up to this many nodes are dense.
DENSE_NODES = 2048
#: Extra LOBPCG vectors beyond the r wanted.
GUARD_VECTORS = 4
#: Largest accepted eigen-residual max_k ||L u_k − λ_k u_k|| (LOBPCG stops at 1e-4 per vector).
RESIDUAL_TOLERANCE = 1e-3
#: LOBPCG iterations that refine each intermediate level of the multilevel start.
CASCADE_ITERATIONS = 20
#: LOBPCG iterations between two checks of an eigengap (:func:`certified_gap`).
ROUND_ITERATIONS = 4
#: Coarse graphs up to this many aggregates are summed densely (:func:`galerkin`; 512 MiB at most).
DENSE_GALERKIN = 2**13


def normalized_laplacian(weights: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """L_sym = I − D^{-1/2} W D^{-1/2}, d_i = Σ_{j≠i} w_ij, as SciPy's ``csgraph.laplacian(normed=True)``
    computes it (W's diagonal ignored; a node of degree 0 gets a zero row), built in one pass over
    W's entries: their scaled values, and each row's diagonal inserted at its sorted position."""
    weights = weights.tocsr().astype(np.float64, copy=False)
    if not weights.has_canonical_format:
        weights = weights.copy()
        weights.sum_duplicates()  # sorts the indices within rows
    m = weights.shape[0]
    rows = np.repeat(np.arange(m, dtype=weights.indices.dtype), np.diff(weights.indptr))
    on_diagonal = weights.indices == rows
    if on_diagonal.any():
        weights = weights.copy()
        weights.data[on_diagonal] = 0.0
        weights.eliminate_zeros()  # keeps the order
        rows = np.repeat(np.arange(m, dtype=weights.indices.dtype), np.diff(weights.indptr))
    counts = np.diff(weights.indptr)
    degree = np.asarray(weights.sum(axis=1)).ravel()
    values = -_scaled_entries(weights, degree)
    columns, row_index = torch.from_numpy(weights.indices), torch.from_numpy(rows)
    below = torch.zeros(m, dtype=torch.int64).index_add_(0, row_index, (columns < row_index).long()).numpy()
    indptr = np.concatenate([[0], np.cumsum(counts + 1)])
    diagonal = indptr[:-1] + below
    position = np.arange(weights.nnz) + rows + (weights.indices > rows)  # shifted by the diagonals before
    lap_data = np.empty(weights.nnz + m)
    lap_indices = np.empty(weights.nnz + m, dtype=weights.indices.dtype)
    lap_data[position] = values
    lap_indices[position] = weights.indices
    lap_data[diagonal] = (degree > 0).astype(np.float64)
    lap_indices[diagonal] = np.arange(m)
    return scipy.sparse.csr_matrix((lap_data, lap_indices, indptr), shape=(m, m))


class Eigenpairs(NamedTuple):
    """The r smallest eigenpairs of L_sym, ascending, and how they were found.

    Attributes:
        values: (r,) eigenvalues.
        vectors: (m, r) unit eigenvectors.
        residual: max_k ||L u_k − λ_k u_k|| over the ``checked`` leading vectors.
        solver: ``dense``, ``lobpcg-warm``, ``lobpcg-multilevel``, ``lobpcg-fresh`` or ``eigsh``: the
            solve that was kept.
        iterations: LOBPCG iterations of the kept solve (0 for the others).
        fallback: why the first solve was not kept ("" when it was).
        block: (m, r + guard) the whole block of the solve, the warm start of the next one (the
            guard vectors converged too: a start with random guards takes nearly as long as none).
        checked: the leading vectors held to the tolerance: all r, or the k below a certified gap.
    """

    values: np.ndarray
    vectors: np.ndarray
    residual: float
    solver: str
    iterations: int
    fallback: str
    block: np.ndarray
    checked: int


def smallest_eigenvectors(
    lap: scipy.sparse.csr_matrix,
    num: int,
    start: np.ndarray | None = None,
    seed: int = 0,
    origin: str = "warm",
    gap_range: tuple[int, int] | None = None,
) -> Eigenpairs:
    """The ``num`` smallest eigenpairs of L_sym, ascending, checked for convergence.

    With ``start`` (the previous solve's ``block``, r to r + :data:`GUARD_VECTORS` columns) LOBPCG
    refines it in a few iterations (graphs too small for LOBPCG are solved densely); ``origin`` names
    where the start came from (``warm``, or ``multilevel`` for :func:`multilevel_start`). A full solve is
    LAPACK's ``eigh`` up to :data:`DENSE_NODES` nodes, else LOBPCG from a seeded random block. Both
    block methods keep repeated eigenvalues (one zero per connected component of a k-NN graph),
    which single-vector Lanczos (``eigsh``) can miss.
    With ``gap_range`` = (k_min, k_max), the caller uses only the vectors below the largest eigengap
    with k in that range: LOBPCG runs in rounds of :data:`ROUND_ITERATIONS` iterations until
    :func:`certified_gap` names that k and the k vectors below it meet the tolerance (``checked`` = k);
    the vectors above the gap are Ritz vectors of the bulk, left unconverged. Dense and fallback solves
    converge all r. Above :data:`DENSE_NODES` nodes the iterations run in single precision, the checks
    in double.
    A LOBPCG result whose residual max_k ||L u_k − λ_k u_k|| exceeds :data:`RESIDUAL_TOLERANCE` is
    not used: the solve falls back to ``eigh`` (small graphs), else to a fresh LOBPCG and then to
    ``eigsh``, and ``fallback`` says why. A residual still above the tolerance after that raises.
    """
    m = lap.shape[0]
    if not 1 <= num < m:
        raise ValueError(f"cannot compute {num} eigenvectors of a graph with {m} nodes; use fewer")
    if gap_range is not None and not 1 <= gap_range[0] <= min(gap_range[1], num - 1):
        raise ValueError(
            f"need more than {gap_range[0]} eigenvectors to choose between {gap_range[0]} and "
            f"{gap_range[1]} clusters, got {num}"
        )
    lobpcg_fits = m >= 5 * (num + GUARD_VECTORS)
    if not lobpcg_fits and m > DENSE_NODES:
        raise ValueError(
            f"LOBPCG needs at least 5 x {num + GUARD_VECTORS} nodes, got {m}; compute fewer eigenvectors"
        )
    if m <= DENSE_NODES and (start is None or not lobpcg_fits):
        return _dense(lap, num, "")
    warm = start is not None and start.shape[0] == m and num <= start.shape[1] <= num + GUARD_VECTORS
    result = _lobpcg(lap, num, start if warm else None, seed, origin, gap_range)
    if result.residual <= RESIDUAL_TOLERANCE:
        return result
    reason = f"{result.solver} residual {result.residual:.2e} > {RESIDUAL_TOLERANCE:.0e}"
    if m <= DENSE_NODES:
        return _dense(lap, num, reason)
    if warm:
        result = _lobpcg(lap, num, None, seed, "fresh", gap_range)
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
    return Eigenpairs(values[:num], block[:, :num].copy(), residual, "eigsh", 0, reason, block, num)


def _dense(lap: scipy.sparse.csr_matrix, num: int, fallback: str) -> Eigenpairs:
    wanted = min(num + GUARD_VECTORS, lap.shape[0])
    values, block = scipy.linalg.eigh(lap.toarray(), subset_by_index=[0, wanted - 1])
    values, vectors = values[:num], np.ascontiguousarray(block[:, :num])
    residual = eigen_residual(lap, values, vectors)
    return Eigenpairs(values, vectors, residual, "dense", 0, fallback, block, num)


def _lobpcg(
    lap: scipy.sparse.csr_matrix,
    num: int,
    start: np.ndarray | None,
    seed: int,
    origin: str,
    gap_range: tuple[int, int] | None,
) -> Eigenpairs:
    """LOBPCG from ``start`` plus seeded guard vectors (a random block when ``start`` is None); the
    guard vectors make the wanted block's last vector converge as fast as the others. With
    ``gap_range``, in rounds until the gap is certified and the vectors below it converged."""
    m = lap.shape[0]
    block = np.random.default_rng(seed).standard_normal((m, num + GUARD_VECTORS))
    if start is not None:
        block[:, : start.shape[1]] = start
    limit = 1000 if start is None else 200
    iterations, checked = 0, num
    operator = threaded(lap) if m > DENSE_NODES else lap  # below, handing over to torch costs more
    iterate = threaded(lap, np.float32) if m > DENSE_NODES else lap
    values = residuals = None
    if gap_range is not None and origin == "warm" and start is not None:  # it may need no iteration
        values, block, residuals = _rayleigh_ritz(operator, block, num)
    while True:
        if gap_range is not None and values is not None:
            if residuals is None:
                residuals = residual_norms(operator, values[:num], block[:, :num])
            k = certified_gap(values[:num], residuals, *gap_range)
            if k is not None and residuals[:k].max() <= RESIDUAL_TOLERANCE:
                checked = k
                break
        if iterations >= limit:
            break
        values, block, done = _quiet_lobpcg(
            iterate, block.astype(iterate.dtype), limit if gap_range is None else ROUND_ITERATIONS
        )
        iterations += max(done, 1)
        residuals = None
        order = np.argsort(values)
        values, block = values[order].astype(np.float64), block[:, order].astype(np.float64)
        block /= np.linalg.norm(block, axis=0, keepdims=True)
        if gap_range is None:
            break
    assert values is not None, "the loop above runs LOBPCG at least once or breaks with values"
    if residuals is None:  # without a gap range no round checked the final block
        residuals = residual_norms(operator, values[:num], block[:, :num])
    values, vectors = values[:num], np.ascontiguousarray(block[:, :num])
    solver = "lobpcg-fresh" if start is None else f"lobpcg-{origin}"
    residual = float(residuals[:checked].max())
    return Eigenpairs(values, vectors, residual, solver, iterations, "", block, checked)


def _rayleigh_ritz(
    operator: scipy.sparse.linalg.LinearOperator, block: np.ndarray, num: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Ritz values (ascending), unit Ritz vectors and the residual norms of the first ``num`` of L
    on span(block): Q = qr(block), QᵀLQ = S Θ Sᵀ, vectors QS, residuals ||(LQ)S − QSΘ|| (from the one
    product LQ)."""
    basis = np.linalg.qr(block)[0]
    product = operator @ basis
    values, small = scipy.linalg.eigh(basis.T @ product)
    vectors = basis @ small
    residuals = np.linalg.norm(product @ small[:, :num] - vectors[:, :num] * values[:num], axis=0)
    return values, vectors, residuals


def certified_gap(values: np.ndarray, residuals: np.ndarray, k_min: int, k_max: int) -> int | None:
    """The k in [k_min, min(k_max, r − 1)] whose gap θ_{k+1} − θ_k is the largest even when every Ritz
    value θ_j may be off by its residual r_j = ||L u_j − θ_j u_j|| (an eigenvalue lies within r_j of
    θ_j): gap_k − r_k − r_{k+1} > gap_j + r_j + r_{j+1} for every other j in the range (1-based); None
    while no k is, or when the range is a single k whose gap is not larger than r_k + r_{k+1}."""
    k_max = min(k_max, len(values) - 1)
    ks = np.arange(k_min, k_max + 1)
    gaps = values[ks] - values[ks - 1]
    slack = residuals[ks] + residuals[ks - 1]
    best = int(np.argmax(gaps))
    lower = gaps[best] - slack[best]
    others = np.delete(gaps + slack, best)
    return int(ks[best]) if lower > 0 and (others.size == 0 or lower > others.max()) else None


def eigen_residual(lap: scipy.sparse.csr_matrix, values: np.ndarray, vectors: np.ndarray) -> float:
    """max_k ||L u_k − λ_k u_k|| over unit eigenvectors: how well the solver converged."""
    return float(residual_norms(lap, values, vectors).max())


def residual_norms(
    lap: scipy.sparse.csr_matrix | scipy.sparse.linalg.LinearOperator, values: np.ndarray, vectors: np.ndarray
) -> np.ndarray:
    """(r,) ||L u_k − λ_k u_k|| of each column u_k."""
    return np.linalg.norm(lap @ vectors - vectors * values, axis=0)


def threaded(
    lap: scipy.sparse.csr_matrix, dtype: type[np.floating] = np.float64
) -> scipy.sparse.linalg.LinearOperator:
    """L in ``dtype`` as an operator whose products with blocks of vectors run on torch's threads:
    SciPy's sparse product uses one thread, and it is half of a LOBPCG iteration on a large graph."""
    with warnings.catch_warnings():  # the CSR layout is in beta; the product used here is not
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.sparse_csr_tensor(
            torch.from_numpy(lap.indptr),
            torch.from_numpy(lap.indices),
            torch.from_numpy(lap.data.astype(dtype, copy=False)),
            size=lap.shape,
        )

    def product(vectors: np.ndarray) -> np.ndarray:
        return (tensor @ torch.from_numpy(np.ascontiguousarray(vectors, dtype=dtype))).numpy()

    return scipy.sparse.linalg.LinearOperator(
        lap.shape, matvec=product, matmat=product, rmatvec=product, rmatmat=product, dtype=dtype
    )


def multilevel_start(weights: scipy.sparse.csr_matrix, width: int, seed: int = 0) -> np.ndarray | None:
    """An (m, width) start block for LOBPCG on L_sym(W) from the eigenvectors of coarsened graphs.

    Level ℓ + 1 aggregates the nodes of level ℓ (pyamg's standard aggregation: a root and its
    neighbours; a node left out, e.g. an isolated one, is its own aggregate) with the binary
    m_ℓ × m_{ℓ+1} matrix P, and has the Galerkin graph W_{ℓ+1} = Pᵀ W_ℓ P (the weight inside an
    aggregate becomes a self-loop, so degrees add up: d_{ℓ+1} = Pᵀ d_ℓ). A coarse vector v prolongates
    to u = D_ℓ^{1/2} P D_{ℓ+1}^{-1/2} v, an isometry with uᵀ L_ℓ u = vᵀ L_{ℓ+1} v: the coarse
    eigenproblem is the fine one restricted to vectors that are D^{1/2}-weighted constants on each
    aggregate (Rayleigh–Ritz), so a cluster made of whole aggregates is found exactly. The coarsest
    level (at most :data:`DENSE_NODES` nodes) is solved densely, or by LOBPCG from a random block where
    aggregation would leave no more than ``width`` nodes (a dense graph); every intermediate
    one is refined by :data:`CASCADE_ITERATIONS` LOBPCG iterations; refining the finest is the
    caller's solve.
    None when aggregation stalls (fewer than a fifth of the nodes merge, as when most are isolated):
    then there is no cheaper graph to solve.
    """
    return _cascade(weights.tocsr().astype(np.float64, copy=False), width, seed, refine=False)


def _cascade(weights: scipy.sparse.csr_matrix, width: int, seed: int, refine: bool) -> np.ndarray | None:
    m = weights.shape[0]
    degree = np.asarray(weights.sum(axis=1)).ravel()
    if m <= DENSE_NODES:
        lap = _with_self_loops(weights, degree).toarray()
        return scipy.linalg.eigh(lap, subset_by_index=[0, min(width, m) - 1])[1]
    membership = _aggregates(weights)
    count = int(membership.max()) + 1
    if count > 0.8 * m:
        return None
    if count <= width:  # too few aggregates to hold the eigenvectors: solve this level
        start = np.random.default_rng(seed).standard_normal((m, width), dtype=np.float32)
        return _quiet_lobpcg(
            threaded(_with_self_loops(weights, degree), np.float32), start, CASCADE_ITERATIONS * 10
        )[1]
    coarse = _cascade(galerkin(weights, membership, count), width, seed, refine=True)
    if coarse is None or coarse.shape[1] < width:
        return None
    coarse_degree = np.bincount(membership, weights=degree, minlength=count)  # Pᵀd
    block = _root_degree(degree)[:, None] * (coarse / _root_degree(coarse_degree)[:, None])[membership]
    if not refine:
        return block
    return _quiet_lobpcg(
        threaded(_with_self_loops(weights, degree), np.float32), block.astype(np.float32), CASCADE_ITERATIONS
    )[1]


def galerkin(weights: scipy.sparse.csr_matrix, membership: np.ndarray, count: int) -> scipy.sparse.csr_matrix:
    """PᵀWP for the binary P with P[i, membership[i]] = 1: (PᵀWP)_ab = Σ w_ij over i in aggregate a and
    j in b. Up to :data:`DENSE_GALERKIN` aggregates one ``bincount`` fills the dense count × count
    matrix (a quarter of the time of summing duplicates in a sparse build at a million nodes); beyond,
    a COO build sums the duplicates."""
    rows = np.repeat(membership, np.diff(weights.indptr))
    columns = membership[weights.indices]
    if count <= DENSE_GALERKIN:
        dense = np.bincount(rows * count + columns, weights=weights.data, minlength=count * count)
        return scipy.sparse.csr_matrix(dense.reshape(count, count))
    return scipy.sparse.csr_matrix((weights.data, (rows, columns)), shape=(count, count))


def _quiet_lobpcg(
    lap: scipy.sparse.csr_matrix | scipy.sparse.linalg.LinearOperator, block: np.ndarray, iterations: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(values, vectors, iterations done) of at most ``iterations`` LOBPCG iterations (block updates)
    from ``block``, without SciPy's warning that some vectors did not reach its tolerance: callers check
    the residual, or use the block as a start only. (SciPy's ``maxiter`` = n makes n + 1 updates, and
    its residual history holds one row per update plus the start's and the final Rayleigh–Ritz's.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        values, vectors, history = scipy.sparse.linalg.lobpcg(
            lap, block, largest=False, tol=1e-4, maxiter=iterations - 1, retResidualNormsHistory=True
        )
    return values, vectors, len(history) - 2


def _with_self_loops(weights: scipy.sparse.csr_matrix, degree: np.ndarray) -> scipy.sparse.csr_matrix:
    """I − D^{-1/2} W D^{-1/2} with self-loops counted in W and D (``csgraph.laplacian`` drops them);
    a node of degree 0 gets a zero row, as in SciPy."""
    scaled = scipy.sparse.csr_matrix(
        (_scaled_entries(weights, degree), weights.indices, weights.indptr), shape=weights.shape
    )
    return (scipy.sparse.diags((degree > 0).astype(np.float64)) - scaled).tocsr()


def _scaled_entries(weights: scipy.sparse.csr_matrix, degree: np.ndarray) -> np.ndarray:
    """The stored entries of D^{-1/2} W D^{-1/2}, w_ij / √(d_i d_j) (0 where d is 0), on torch's
    threads: at a million nodes these passes over every entry are most of building L."""
    inverse = torch.from_numpy(np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0))
    row_scale = inverse.repeat_interleave(
        torch.from_numpy(np.diff(weights.indptr))
    )  # each entry's d_i^{-1/2}
    return (torch.from_numpy(weights.data) * row_scale * inverse[torch.from_numpy(weights.indices)]).numpy()


def _root_degree(degree: np.ndarray) -> np.ndarray:
    """D^{1/2}, with 1 for isolated nodes (whose L_sym row is zero, as in SciPy)."""
    return np.sqrt(np.where(degree > 0, degree, 1.0))


def _aggregates(weights: scipy.sparse.csr_matrix) -> np.ndarray:
    """(m,) the aggregate of every node under pyamg's standard aggregation on the graph's pattern (the
    binary P has P[i, membership[i]] = 1); a node it leaves out (no neighbour) is its own aggregate."""
    pyamg = require("pyamg.aggregation", "the multilevel eigensolver start (DSCA above 2,048 blocks)")
    aggregation = scipy.sparse.csr_matrix(pyamg.standard_aggregation(scipy.sparse.csr_array(weights))[0])
    membership = np.full(weights.shape[0], -1, dtype=np.int64)
    membership[np.diff(aggregation.indptr) > 0] = aggregation.indices
    left_out = membership < 0
    membership[left_out] = aggregation.shape[1] + np.arange(left_out.sum())
    return membership
