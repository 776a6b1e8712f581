"""The DSCA eigensolver against SciPy references: dense, warm-started, multilevel and fallback solves."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
from pyamg.aggregation import standard_aggregation

from spec_lightning.spectral import eigensolve
from spec_lightning.spectral.eigensolve import (
    certified_gap,
    eigen_residual,
    multilevel_start,
    normalized_laplacian,
    smallest_eigenvectors,
)
from tests.test_clustering import planted_partition


def test_too_many_eigenvectors_name_the_problem() -> None:
    lap = normalized_laplacian(scipy.sparse.csr_matrix(np.ones((5, 5))))
    with pytest.raises(ValueError, match="cannot compute 10 eigenvectors of a graph with 5 nodes"):
        smallest_eigenvectors(lap, 10)
    with pytest.raises(ValueError, match="need more than 3 eigenvectors to choose between 3 and 4 clusters"):
        smallest_eigenvectors(lap, 3, gap_range=(3, 4))


def test_warm_started_eigenvectors_match_a_fresh_eigsh_solve() -> None:
    weights, _ = planted_partition([40] * 8, seed=1)
    lap = normalized_laplacian(weights)
    reference_values, reference_vectors = scipy.sparse.linalg.eigsh(lap, k=8, which="SA")
    perturbed, _ = planted_partition([40] * 8, seed=1)
    perturbed = perturbed + 0.05 * scipy.sparse.random(320, 320, density=0.01, random_state=2)
    _, previous, *_ = smallest_eigenvectors(normalized_laplacian(perturbed.maximum(perturbed.T)), 8)
    values, vectors, *_ = smallest_eigenvectors(lap, 8, start=previous)
    np.testing.assert_allclose(values, np.sort(reference_values), atol=1e-5)
    # Degenerate-safe comparison: the projectors onto the two 8-dimensional subspaces agree.
    projector = vectors @ vectors.T - reference_vectors @ reference_vectors.T
    assert np.linalg.norm(projector, 2) < 1e-3


def test_normalized_laplacian_against_its_definition() -> None:
    """L_sym = I − D^{-1/2} W D^{-1/2}, written out in numpy (an isolated node gets L_ii = 0)."""
    weights, _ = planted_partition([6, 5, 7], p_in=0.6, p_out=0.1, seed=3)
    dense = weights.toarray()
    dense[0, :] = dense[:, 0] = 0.0  # isolate node 0
    degree = dense.sum(axis=1)
    scale = np.array([d**-0.5 if d > 0 else 0.0 for d in degree])
    expected = np.diag((degree > 0).astype(float)) - scale[:, None] * dense * scale[None, :]
    np.testing.assert_allclose(
        normalized_laplacian(scipy.sparse.csr_matrix(dense)).toarray(), expected, atol=1e-12
    )


def test_normalized_laplacian_matches_scipy_on_awkward_input() -> None:
    """Against SciPy's ``csgraph.laplacian(normed=True)``: self-loops (ignored), unsorted column
    indices, duplicate entries (summed), an isolated node, 64-bit indices."""
    rng = np.random.default_rng(5)
    dense = np.triu(rng.random((30, 30)) * (rng.random((30, 30)) < 0.3), 1)
    dense = dense + dense.T
    dense[4, :] = dense[:, 4] = 0.0
    np.fill_diagonal(dense, rng.random(30))
    rows, cols = np.nonzero(dense)
    values = dense[rows, cols]
    split = rng.choice(len(rows), 10, replace=False)  # ten entries stored as two halves each
    values[split] /= 2
    rows, cols, values = np.r_[rows, rows[split]], np.r_[cols, cols[split]], np.r_[values, values[split]]
    order = np.lexsort((rng.random(len(rows)), rows))  # grouped by row, shuffled within rows
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=30))])
    messy = scipy.sparse.csr_matrix((values[order], cols[order].astype(np.int64), indptr), shape=(30, 30))
    assert not messy.has_canonical_format
    np.testing.assert_allclose(messy.toarray(), dense, atol=1e-15)
    expected = scipy.sparse.csgraph.laplacian(dense, normed=True)
    lap = normalized_laplacian(messy)
    assert lap.has_canonical_format  # sorted, duplicates summed
    np.testing.assert_allclose(lap.toarray(), expected, atol=1e-12)
    assert lap[4, 4] == 0.0


def test_the_warm_start_converges_in_fewer_iterations() -> None:
    """From the previous block (guard vectors included), a slightly changed graph takes a fraction of
    the iterations of a fresh solve."""
    weights, _ = planted_partition([200] * 8, p_in=0.05, p_out=0.002, seed=8)
    other, _ = planted_partition([200] * 8, p_in=0.05, p_out=0.002, seed=9)
    wrong_shape = np.zeros((1, 1))  # not a start: a fresh LOBPCG from a random block
    previous = smallest_eigenvectors(normalized_laplacian(weights), 8, start=wrong_shape)
    lap = normalized_laplacian(0.99 * weights + 0.01 * other)
    fresh = smallest_eigenvectors(lap, 8, start=wrong_shape)
    warm = smallest_eigenvectors(lap, 8, start=previous.block)
    assert fresh.solver == "lobpcg-fresh" and warm.solver == "lobpcg-warm"
    assert warm.iterations < fresh.iterations / 2
    assert warm.residual < 1e-3 and fresh.residual < 1e-3
    projector = warm.vectors @ warm.vectors.T - fresh.vectors @ fresh.vectors.T
    assert np.linalg.norm(projector, 2) < 1e-2


def test_an_unconverged_lobpcg_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    weights, _ = planted_partition([200] * 8, p_in=0.05, p_out=0.002, seed=8)
    lap = normalized_laplacian(weights)
    reference = scipy.sparse.linalg.eigsh(lap, k=8, which="SA")[0]
    real = scipy.sparse.linalg.lobpcg

    def one_iteration(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real(*args, **{**kwargs, "maxiter": 1})

    monkeypatch.setattr(scipy.sparse.linalg, "lobpcg", one_iteration)
    start = np.random.default_rng(0).standard_normal((1600, 8))
    dense = smallest_eigenvectors(lap, 8, start=start)
    assert dense.solver == "dense" and "lobpcg-warm residual" in dense.fallback
    np.testing.assert_allclose(dense.values, np.sort(reference), atol=1e-8)
    monkeypatch.setattr("spec_lightning.spectral.eigensolve.DENSE_NODES", 100)
    sparse = smallest_eigenvectors(lap, 8, start=start)
    assert sparse.solver == "eigsh" and sparse.residual < 1e-3
    np.testing.assert_allclose(sparse.values, np.sort(reference), atol=1e-6)


def test_small_graphs_with_a_start_are_solved_densely() -> None:
    weights, _ = planted_partition([10, 10, 10], p_in=0.6, p_out=0.05, seed=2)
    lap = normalized_laplacian(weights)
    start = np.random.default_rng(0).standard_normal((30, 12))
    result = smallest_eigenvectors(lap, 8, start=start)  # 30 < 5 x (8 + 4): too small for LOBPCG
    assert (result.solver, result.fallback) == ("dense", "")
    np.testing.assert_allclose(result.values, np.linalg.eigvalsh(lap.toarray())[:8], atol=1e-10)


def galerkin_reference(weights: scipy.sparse.csr_matrix) -> np.ndarray:
    """The coarse eigenvalues as the generalised problem Pᵀ(D − W)P y = λ PᵀDP y on pyamg's aggregates,
    solved densely by SciPy."""
    aggregates = standard_aggregation(scipy.sparse.csr_array(weights))[0].toarray().astype(float)
    degree = np.asarray(weights.sum(axis=1)).ravel()
    laplacian = np.diag(degree) - weights.toarray()
    return scipy.linalg.eigh(
        aggregates.T @ laplacian @ aggregates, aggregates.T @ np.diag(degree) @ aggregates, eigvals_only=True
    )


def test_one_coarse_level_is_the_rayleigh_ritz_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    """One aggregation level, unrefined at the finest: the start block is orthonormal and its
    Rayleigh quotients are the Galerkin eigenvalues, which bound the true ones from above."""
    weights, _ = planted_partition([100] * 4, p_in=0.06, p_out=0.005, seed=3)
    monkeypatch.setattr(eigensolve, "DENSE_NODES", 200)
    start = multilevel_start(weights, 8)
    coarse = galerkin_reference(weights)
    assert len(coarse) <= 200
    lap = normalized_laplacian(weights).toarray()
    np.testing.assert_allclose(start.T @ start, np.eye(8), atol=1e-10)
    np.testing.assert_allclose(np.linalg.eigvalsh(start.T @ lap @ start), coarse[:8], atol=1e-10)
    assert (coarse[:8] >= np.linalg.eigvalsh(lap)[:8] - 1e-10).all()


def test_components_made_of_whole_aggregates_are_found_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four disconnected components: the start spans their indicators D^{1/2} 1_c (eigenvalue 0)."""
    blocks = [planted_partition([50], p_in=0.15, seed=s)[0] for s in range(4)]
    weights = scipy.sparse.block_diag(blocks).tocsr()
    monkeypatch.setattr(eigensolve, "DENSE_NODES", 100)
    start = multilevel_start(weights, 8)
    lap = normalized_laplacian(weights)
    degree = np.asarray(weights.sum(axis=1)).ravel()
    indicators = np.stack([np.sqrt(degree) * (np.arange(200) // 50 == c) for c in range(4)], axis=1)
    indicators /= np.linalg.norm(indicators, axis=0)
    basis = np.linalg.qr(start[:, :4])[0]
    assert np.linalg.norm(indicators - basis @ (basis.T @ indicators)) < 1e-8
    assert eigen_residual(lap, np.zeros(4), start[:, :4]) < 1e-8


def test_a_multilevel_solve_matches_the_dense_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two coarse levels (and an isolated node): LOBPCG from the multilevel start converges to the dense
    solve's eigenpairs."""
    weights, _ = planted_partition([200] * 8, p_in=0.05, p_out=0.002, seed=8)
    weights = scipy.sparse.block_diag([weights, scipy.sparse.csr_matrix((1, 1))]).tocsr()
    monkeypatch.setattr(eigensolve, "DENSE_NODES", 60)
    lap = normalized_laplacian(weights)
    start = multilevel_start(weights, 12)
    assert start is not None and start.shape == (1601, 12)
    solved = smallest_eigenvectors(lap, 8, start, origin="multilevel")
    values, vectors = scipy.linalg.eigh(lap.toarray(), subset_by_index=[0, 7])  # eigsh misses a repeated 0
    assert solved.solver == "lobpcg-multilevel" and solved.residual < 1e-3
    np.testing.assert_allclose(solved.values, values, atol=1e-6)
    assert abs(solved.vectors[-1]).max() > 0.99  # the isolated node's own eigenvector e_m (λ = 0)
    projector = solved.vectors @ solved.vectors.T - vectors @ vectors.T
    assert np.linalg.norm(projector, 2) < 1e-2


def test_a_graph_that_does_not_coarsen_gets_no_multilevel_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eigensolve, "DENSE_NODES", 10)
    assert multilevel_start(scipy.sparse.csr_matrix((50, 50)), 4) is None  # 50 isolated nodes


def test_a_graph_too_dense_to_coarsen_is_solved_at_its_own_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Aggregation of a dense graph would leave fewer nodes than the block needs: the level is solved
    by LOBPCG instead of giving no start (at a million nodes, no start meant 1,000 iterations)."""
    weights, _ = planted_partition([60] * 5, p_in=0.3, p_out=0.02, seed=3)
    monkeypatch.setattr(eigensolve, "DENSE_NODES", 100)
    start = multilevel_start(weights, 20)  # about 16 aggregates of 300 nodes
    assert start is not None and start.shape == (300, 20)
    lap = normalized_laplacian(weights)
    solved = smallest_eigenvectors(lap, 16, start, origin="multilevel")
    assert solved.solver == "lobpcg-multilevel"
    np.testing.assert_allclose(solved.values, np.linalg.eigvalsh(lap.toarray())[:16], atol=1e-6)
    assert eigen_residual(lap, solved.values, solved.vectors) < 1e-3


def test_certified_gap_by_hand() -> None:
    """gaps for k = 2, 3, 4: 0.01, 0.48, 0.02; k = 3 is chosen when 0.48 − r_3 − r_4 exceeds every other
    gap plus its residuals."""
    values = np.array([0.0, 0.01, 0.02, 0.5, 0.52, 0.55])
    residuals = np.full(6, 0.01)
    assert certified_gap(values, residuals, 2, 4) == 3  # 0.46 > 0.04
    residuals[3] = 0.3
    assert certified_gap(values, residuals, 2, 4) is None  # 0.48 − 0.31 = 0.17 < 0.02 + 0.31
    residuals[3] = 0.2
    assert certified_gap(values, residuals, 2, 4) == 3  # 0.27 > 0.23
    assert certified_gap(values, residuals, 3, 3) == 3  # one k: its gap only has to exceed its slack
    residuals[3] = 0.6
    assert certified_gap(values, residuals, 3, 3) is None
    assert certified_gap(values, np.zeros(6), 2, 9) == 3  # k_max capped at r − 1 = 5


def test_a_gap_range_converges_the_vectors_below_the_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight weakly coupled groups: LOBPCG told the cluster range stops once the gap after the 8th
    eigenvalue is certified, in fewer iterations than converging all 12, with the same 8-dimensional
    eigenspace as the dense solve."""
    weights, _ = planted_partition([200] * 8, p_in=0.05, p_out=0.002, seed=8)
    monkeypatch.setattr(eigensolve, "DENSE_NODES", 100)
    lap = normalized_laplacian(weights)
    start = np.random.default_rng(1).standard_normal((1600, 12))
    ranged = smallest_eigenvectors(lap, 12, start, gap_range=(6, 10))
    every = smallest_eigenvectors(lap, 12, start)
    values, vectors = scipy.linalg.eigh(lap.toarray(), subset_by_index=[0, 11])
    assert ranged.checked == 8 and every.checked == 12
    assert ranged.iterations < every.iterations
    # the same quantity, recomputed: equal up to the summation order of the sparse product
    assert ranged.residual == pytest.approx(
        eigen_residual(lap, ranged.values[:8], ranged.vectors[:, :8]), rel=1e-9
    )
    assert ranged.residual < 1e-3
    np.testing.assert_allclose(ranged.values[:8], values[:8], atol=1e-6)
    projector = ranged.vectors[:, :8] @ ranged.vectors[:, :8].T - vectors[:, :8] @ vectors[:, :8].T
    assert np.linalg.norm(projector, 2) < 1e-2
    rotation = np.linalg.qr(np.random.default_rng(2).standard_normal((16, 16)))[0]
    again = smallest_eigenvectors(lap, 12, ranged.block @ rotation, gap_range=(6, 10))  # the same span
    assert (again.iterations, again.checked, again.solver) == (0, 8, "lobpcg-warm")
    np.testing.assert_allclose(again.values[:8], values[:8], atol=1e-6)


def test_the_threaded_operator_is_the_sparse_product() -> None:
    weights, _ = planted_partition([30] * 3, seed=4)
    lap = normalized_laplacian(weights)
    vectors = np.random.default_rng(0).standard_normal((90, 5))
    operator = eigensolve.threaded(lap)
    np.testing.assert_allclose(operator @ vectors, lap.toarray() @ vectors, atol=1e-12)
    np.testing.assert_allclose(operator @ vectors[:, 0], lap.toarray() @ vectors[:, 0], atol=1e-12)
    single = eigensolve.threaded(lap, np.float32)  # what LOBPCG iterates with on large graphs
    assert (single @ vectors).dtype == np.float32 and single.dtype == np.float32
    np.testing.assert_allclose(single @ vectors, lap.toarray() @ vectors, atol=1e-5)


def test_lobpcg_iterations_are_counted_as_block_updates() -> None:
    """Counted against the operator: each update applies L once, plus the start's and the final
    Rayleigh–Ritz's products; a start that already meets SciPy's tolerance needs no update."""
    diagonal = scipy.sparse.diags(np.arange(1.0, 401.0))
    applied = []

    def product(vectors: np.ndarray) -> np.ndarray:
        applied.append(1)
        return diagonal @ vectors

    operator = scipy.sparse.linalg.LinearOperator((400, 400), matvec=product, matmat=product, dtype=float)
    start = np.random.default_rng(0).standard_normal((400, 4))
    for wanted in (1, 3, 5):
        applied.clear()
        assert eigensolve._quiet_lobpcg(operator, start, wanted)[2] == wanted == len(applied) - 2
    applied.clear()
    assert eigensolve._quiet_lobpcg(operator, np.eye(400)[:, :4], 5)[2] == 0 == len(applied) - 2


@pytest.mark.parametrize("dense_limit", [2**13, 0])  # the dense bincount and the sparse build
def test_galerkin_against_the_explicit_product(monkeypatch: pytest.MonkeyPatch, dense_limit: int) -> None:
    monkeypatch.setattr(eigensolve, "DENSE_GALERKIN", dense_limit)
    weights, _ = planted_partition([20, 25, 15], p_in=0.4, p_out=0.05, seed=6)
    membership = np.random.default_rng(1).integers(0, 9, 60)
    membership[:9] = np.arange(9)  # every aggregate used
    prolongation = scipy.sparse.csr_matrix((np.ones(60), (np.arange(60), membership)), shape=(60, 9))
    expected = (prolongation.T @ weights @ prolongation).toarray()
    np.testing.assert_allclose(eigensolve.galerkin(weights, membership, 9).toarray(), expected, atol=1e-12)


def test_a_dense_solve_keeps_the_guard_vectors_for_the_next_warm_start() -> None:
    weights, _ = planted_partition([40] * 5, seed=2)
    lap = normalized_laplacian(weights)
    solved = smallest_eigenvectors(lap, 6)
    values = scipy.linalg.eigh(lap.toarray(), eigvals_only=True)
    assert solved.solver == "dense" and solved.block.shape == (200, 6 + eigensolve.GUARD_VECTORS)
    np.testing.assert_allclose(np.diag(solved.block.T @ lap @ solved.block), values[:10], atol=1e-10)
