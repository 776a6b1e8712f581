"""The r smallest eigenpairs of a graph's normalised Laplacian L_sym = I − D^{-1/2} W D^{-1/2}.

Small graphs are solved densely (LAPACK). Larger ones by LOBPCG, started from the previous solve's
block (a warm start: the graph moved a little since), or, for a solve from scratch, from
:func:`multilevel_start`: the eigenvectors of Galerkin-coarsened graphs, prolongated back. Every
solve is checked by its residual max_k ||L u_k − λ_k u_k||, and one that did not converge falls back
to a slower, surer one and says why.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
from pyamg.aggregation import standard_aggregation

#: Full eigensolves up to this many nodes are dense.
DENSE_NODES = 2048
#: Extra LOBPCG vectors beyond the r wanted.
GUARD_VECTORS = 4
#: Largest accepted eigen-residual max_k ||L u_k − λ_k u_k|| (LOBPCG stops at 1e-4 per vector).
RESIDUAL_TOLERANCE = 1e-3
#: LOBPCG iterations that refine each intermediate level of the multilevel start.
CASCADE_ITERATIONS = 20


def normalized_laplacian(weights: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """L_sym = I − D^{-1/2} W D^{-1/2} (SciPy's ``csgraph.laplacian(normed=True)``)."""
    return scipy.sparse.csgraph.laplacian(weights.astype(np.float64), normed=True).tocsr()


class Eigenpairs(NamedTuple):
    """The r smallest eigenpairs of L_sym, ascending, and how they were found.

    Attributes:
        values: (r,) eigenvalues.
        vectors: (m, r) unit eigenvectors.
        residual: max_k ||L u_k − λ_k u_k||.
        solver: ``dense``, ``lobpcg-warm``, ``lobpcg-multilevel``, ``lobpcg-fresh`` or ``eigsh``: the
            solve that was kept.
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
    lap: scipy.sparse.csr_matrix,
    num: int,
    start: np.ndarray | None = None,
    seed: int = 0,
    origin: str = "warm",
) -> Eigenpairs:
    """The ``num`` smallest eigenpairs of L_sym, ascending, checked for convergence.

    With ``start`` (the previous solve's ``block``, r to r + :data:`GUARD_VECTORS` columns) LOBPCG
    refines it in a few iterations (graphs too small for LOBPCG are solved densely); ``origin`` names
    where the start came from (``warm``, or ``multilevel`` for :func:`multilevel_start`). A full solve is
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
    result = _lobpcg(lap, num, start if warm else None, seed, origin)
    if result.residual <= RESIDUAL_TOLERANCE:
        return result
    reason = f"{result.solver} residual {result.residual:.2e} > {RESIDUAL_TOLERANCE:.0e}"
    if m <= DENSE_NODES:
        return _dense(lap, num, reason)
    if warm:
        result = _lobpcg(lap, num, None, seed, "fresh")
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


def _lobpcg(
    lap: scipy.sparse.csr_matrix, num: int, start: np.ndarray | None, seed: int, origin: str
) -> Eigenpairs:
    """LOBPCG from ``start`` plus seeded guard vectors (a random block when ``start`` is None); the
    guard vectors make the wanted block's last vector converge as fast as the others."""
    m = lap.shape[0]
    block = np.random.default_rng(seed).standard_normal((m, num + GUARD_VECTORS))
    if start is not None:
        block[:, : start.shape[1]] = start
    values, vectors, iterations = _quiet_lobpcg(lap, block, 1000 if start is None else 200)
    order = np.argsort(values)
    values, block = values[order], np.ascontiguousarray(vectors[:, order])
    block /= np.linalg.norm(block, axis=0, keepdims=True)
    values, vectors = values[:num], np.ascontiguousarray(block[:, :num])
    solver = "lobpcg-fresh" if start is None else f"lobpcg-{origin}"
    residual = eigen_residual(lap, values, vectors)
    return Eigenpairs(values, vectors, residual, solver, iterations, "", block)


def eigen_residual(lap: scipy.sparse.csr_matrix, values: np.ndarray, vectors: np.ndarray) -> float:
    """max_k ||L u_k − λ_k u_k|| over unit eigenvectors: how well the solver converged."""
    return float(np.linalg.norm(lap @ vectors - vectors * values, axis=0).max())


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
    return _cascade(weights.tocsr().astype(np.float64), width, seed, refine=False)


def _cascade(weights: scipy.sparse.csr_matrix, width: int, seed: int, refine: bool) -> np.ndarray | None:
    m = weights.shape[0]
    degree = np.asarray(weights.sum(axis=1)).ravel()
    lap = _with_self_loops(weights, degree)
    if m <= DENSE_NODES:
        return scipy.linalg.eigh(lap.toarray(), subset_by_index=[0, min(width, m) - 1])[1]
    aggregates = _aggregates(weights)
    if aggregates.shape[1] > 0.8 * m:
        return None
    if aggregates.shape[1] <= width:  # too few aggregates to hold the eigenvectors: solve this level
        start = np.random.default_rng(seed).standard_normal((m, width))
        return _quiet_lobpcg(lap, start, CASCADE_ITERATIONS * 10)[1]
    coarse = _cascade((aggregates.T @ weights @ aggregates).tocsr(), width, seed, refine=True)
    if coarse is None or coarse.shape[1] < width:
        return None
    block = _root_degree(degree)[:, None] * (
        aggregates @ (coarse / _root_degree(aggregates.T @ degree)[:, None])
    )
    return _quiet_lobpcg(lap, block, CASCADE_ITERATIONS)[1] if refine else block


def _quiet_lobpcg(
    lap: scipy.sparse.csr_matrix, block: np.ndarray, maxiter: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(values, vectors, iterations) of at most ``maxiter`` LOBPCG iterations from ``block``, without
    SciPy's warning that some vectors did not reach its tolerance: callers check the residual, or use
    the block as a start only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        values, vectors, history = scipy.sparse.linalg.lobpcg(
            lap, block, largest=False, tol=1e-4, maxiter=maxiter, retResidualNormsHistory=True
        )
    return values, vectors, len(history)


def _with_self_loops(weights: scipy.sparse.csr_matrix, degree: np.ndarray) -> scipy.sparse.csr_matrix:
    """I − D^{-1/2} W D^{-1/2} with self-loops counted in W and D (``csgraph.laplacian`` drops them);
    a node of degree 0 gets a zero row, as in SciPy."""
    inverse = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    scaled = scipy.sparse.diags(inverse) @ weights @ scipy.sparse.diags(inverse)
    return (scipy.sparse.diags((degree > 0).astype(np.float64)) - scaled).tocsr()


def _root_degree(degree: np.ndarray) -> np.ndarray:
    """D^{1/2}, with 1 for isolated nodes (whose L_sym row is zero, as in SciPy)."""
    return np.sqrt(np.where(degree > 0, degree, 1.0))


def _aggregates(weights: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """The binary m × aggregates matrix of pyamg's standard aggregation on the graph's pattern; a node
    it leaves out (no neighbour) becomes its own aggregate."""
    aggregation = scipy.sparse.csr_matrix(standard_aggregation(scipy.sparse.csr_array(weights))[0])
    left_out = np.flatnonzero(np.diff(aggregation.indptr) == 0)
    columns = aggregation.indices.copy()
    rows = np.repeat(np.arange(weights.shape[0]), np.diff(aggregation.indptr))
    all_rows = np.concatenate([rows, left_out])
    all_columns = np.concatenate([columns, aggregation.shape[1] + np.arange(len(left_out))])
    shape = (weights.shape[0], aggregation.shape[1] + len(left_out))
    return scipy.sparse.csr_matrix((np.ones(len(all_rows)), (all_rows, all_columns)), shape=shape)
