"""DSCA maths against SciPy and scikit-learn references (METHODS.md §4)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from spec_lightning.spectral import similarity
from spec_lightning.spectral.clustering import (
    SpectralClusterer,
    align_labels,
    bound_sizes,
    default_neighbors,
    eigengap_clusters,
    ema_weights,
    embed_rows,
    keep_strongest,
    kmeans_labels,
    knn_similarity,
    module_library,
    stability,
)
from spec_lightning.spectral.eigensolve import normalized_laplacian, smallest_eigenvectors


def planted_partition(
    sizes: list[int], p_in: float = 0.4, p_out: float = 0.01, seed: int = 0
) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """A random symmetric similarity matrix with dense blocks on the diagonal, and its true labels."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    same = truth[:, None] == truth[None, :]
    edges = rng.random((len(truth), len(truth))) < np.where(same, p_in, p_out)
    weights = np.triu(edges * rng.uniform(0.5, 1.0, edges.shape), 1)
    return scipy.sparse.csr_matrix(weights + weights.T), truth


def test_planted_partition_matches_sklearn_spectral_clustering() -> None:
    weights, truth = planted_partition([30, 25, 40, 20, 35, 30, 25, 30])
    values, vectors, *_ = smallest_eigenvectors(normalized_laplacian(weights), 16)
    k = eigengap_clusters(values, 4, 12)
    ours = kmeans_labels(embed_rows(vectors, k), k, seed=0)
    reference = SpectralClustering(8, affinity="precomputed", random_state=0).fit_predict(weights.toarray())
    assert k == 8
    assert adjusted_rand_score(reference, ours) >= 0.95
    assert adjusted_rand_score(truth, ours) >= 0.95


def test_knn_similarity_is_symmetric_sparse_and_keeps_neighbours() -> None:
    points = np.random.default_rng(0).standard_normal((50, 8))
    for kernel in ("cosine", "gaussian"):
        graph = knn_similarity(points, 5, kernel)
        dense = graph.toarray()
        np.testing.assert_array_equal(dense, dense.T)
        assert np.all(np.diag(dense) == 0) and dense.min() >= 0 and dense.max() <= 1
        assert ((dense > 0).sum(axis=1) >= 1).all() and graph.nnz <= 2 * 5 * 50
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    cosine = unit @ unit.T
    graph = knn_similarity(points, 5, "cosine").toarray()
    i, j = np.nonzero(graph)
    np.testing.assert_allclose(graph[i, j], np.clip(cosine[i, j], 0, 1), atol=1e-6)
    ivf = knn_similarity(points, 5, "cosine", search="ivf")  # half-precision index: cosines within 1e-3
    assert ivf.has_sorted_indices
    i, j = ivf.nonzero()
    np.testing.assert_allclose(ivf.toarray()[i, j], np.clip(cosine[i, j], 0, 1), atol=1e-3)
    np.testing.assert_array_equal(ivf.toarray(), ivf.toarray().T)


def test_ema_weights_follow_the_formula_and_stay_sparse() -> None:
    rng = np.random.default_rng(0)
    first = knn_similarity(rng.standard_normal((40, 6)), 4)
    second = knn_similarity(rng.standard_normal((40, 6)), 4)
    assert ema_weights(None, first, 0.9, 4) is first
    combined = ema_weights(first, second, 0.9, 40)  # no pruning: exactly αW + (1−α)S
    np.testing.assert_allclose(combined.toarray(), (0.9 * first + 0.1 * second).toarray())
    pruned = keep_strongest(0.9 * first + 0.1 * second, 3)
    dense = (0.9 * first + 0.1 * second).toarray()
    for i in range(40):  # every node keeps its 3 strongest edges
        strongest = np.argsort(-dense[i])[:3]
        assert np.all(pruned.toarray()[i, strongest[dense[i, strongest] > 0]] > 0)
    np.testing.assert_array_equal(pruned.toarray(), pruned.toarray().T)


def test_bound_sizes_merges_small_and_splits_large_clusters() -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [rng.normal(0, 0.1, (2, 2)), rng.normal(5, 0.1, (30, 2)), rng.normal(-5, 0.1, (10, 2))]
    )
    labels = np.repeat([0, 1, 2], [2, 30, 10])
    bounded = bound_sizes(points, labels, min_size=3, max_size=16, seed=0)
    sizes = np.bincount(bounded)
    assert sizes.min() >= 3 and sizes.max() <= 16
    assert len(np.unique(bounded[:2])) == 1  # the small cluster moved as a whole
    with pytest.raises(ValueError, match="max_size 8 must be at least twice min_size 5"):
        bound_sizes(points, labels, 5, 8, 0)


def test_align_labels_keeps_ids_of_permuted_clusters() -> None:
    previous = np.array([0, 0, 1, 1, 2, 2])
    assert align_labels(np.array([2, 2, 0, 0, 1, 1]), previous).tolist() == previous.tolist()
    grown = align_labels(np.array([1, 1, 0, 0, 2, 3]), previous)
    assert grown[:4].tolist() == [0, 0, 1, 1] and len(set(grown[4:])) == 2
    assert stability(previous, previous) == (1.0, 1.0)
    nmi, ari = stability(np.array([0, 1, 0, 1, 0, 1]), previous)
    assert nmi < 0.5 and ari < 0.5


def test_module_library_sizes_energy_and_stability() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    library = module_library(
        labels, np.array([0, 1, 1, 1, 1]), np.array([10, 10, 20, 20, 20]), np.arange(5.0)
    )
    assert [m.blocks for m in library] == [[0, 1], [2, 3, 4]]
    assert [m.parameters for m in library] == [20, 60]
    assert [m.energy for m in library] == [0.5, 3.0]
    assert library[0].stability == pytest.approx(0.5) and library[1].stability == pytest.approx(3 / 4)


def test_clusterer_recovers_planted_gradient_groups_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((8, 32))
    truth = np.repeat(np.arange(8), 25)
    clusterer = SpectralClusterer(alpha=0.9, clusters=(6, 10), min_size=5, full_recompute_every=5)
    for _ in range(4):
        sketches = directions[truth] + 0.3 * rng.standard_normal((200, 32))
        update = clusterer.update(sketches, np.ones(200), np.full(200, 12))
    assert update.modules == 8 and not update.full_recompute and update.eigen_residual < 1e-3
    assert adjusted_rand_score(truth, clusterer.labels) >= 0.95
    assert update.nmi > 0.95 and update.ari > 0.95
    restored = SpectralClusterer()
    restored.load_state_dict(clusterer.state_dict())
    np.testing.assert_array_equal(restored.weights.toarray(), clusterer.weights.toarray())
    np.testing.assert_array_equal(restored.labels, clusterer.labels)
    assert restored.library == clusterer.library and restored.updates == 4


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="kernel must be cosine or gaussian"):
        knn_similarity(np.ones((4, 2)), 2, "rbf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need more than 8 eigenvalues"):
        eigengap_clusters(np.arange(5.0), 8, 12)


def brute_force_knn(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every point's k nearest other points and their distances, by sorting all pairwise distances."""
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :k]
    return nearest, np.take_along_axis(distances, nearest, axis=1)


def test_gaussian_kernel_against_a_direct_computation() -> None:
    points = np.random.default_rng(4).standard_normal((30, 5))
    nearest, distances = brute_force_knn(points, 4)
    sigma = np.median(distances)
    expected = np.zeros((30, 30))
    for i in range(30):
        expected[i, nearest[i]] = np.exp(-(distances[i] ** 2) / (2 * sigma**2))
    expected = np.maximum(expected, expected.T)
    np.testing.assert_allclose(knn_similarity(points, 4, "gaussian").toarray(), expected, atol=1e-12)


def test_cosine_knn_against_a_direct_computation() -> None:
    points = np.random.default_rng(5).standard_normal((30, 5))
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    nearest, _ = brute_force_knn(unit, 4)
    cosine = unit @ unit.T
    expected = np.zeros((30, 30))
    for i in range(30):
        expected[i, nearest[i]] = np.clip(cosine[i, nearest[i]], 0, 1)
    expected = np.maximum(expected, expected.T)
    np.testing.assert_allclose(knn_similarity(points, 4, "cosine").toarray(), expected, atol=1e-12)


def test_opposite_neighbours_get_no_stored_edge() -> None:
    """[1, 0]'s second nearest direction is [−1, 0] (cosine −1 → weight 0): no explicit zero is stored,
    so that pruning and degrees see only real edges."""
    points = np.array([[1.0, 0.0], [-1.0, 0.0], [0.9, 0.1]])
    graph = knn_similarity(points, 2, "cosine")
    assert graph.nnz == np.count_nonzero(graph.toarray()) == 2  # the pair {0, 2}, both ways
    assert graph[0, 2] == pytest.approx(0.9 / np.hypot(0.9, 0.1))


@pytest.mark.parametrize("kernel", ["cosine", "gaussian"])
def test_a_zero_sketch_gets_no_edges_and_is_nobodys_neighbour(kernel: str) -> None:
    points = np.random.default_rng(6).standard_normal((12, 4))
    points[3] = 0.0
    graph = knn_similarity(points, 3, kernel).toarray()  # type: ignore[arg-type]
    assert not graph[3].any() and not graph[:, 3].any()
    others = knn_similarity(np.delete(points, 3, 0), 3, kernel).toarray()  # type: ignore[arg-type]
    np.testing.assert_allclose(np.delete(np.delete(graph, 3, 0), 3, 1), others, atol=1e-12)


def test_keep_strongest_against_a_direct_computation() -> None:
    rng = np.random.default_rng(7)
    dense = np.triu(rng.random((25, 25)) * (rng.random((25, 25)) < 0.5), 1)
    dense = dense + dense.T
    keep = np.zeros_like(dense, dtype=bool)
    for i in range(25):
        row = np.flatnonzero(dense[i])
        keep[i, row[np.argsort(-dense[i, row])[:3]]] = True
    expected = np.where(keep | keep.T, dense, 0.0)
    np.testing.assert_allclose(keep_strongest(scipy.sparse.csr_matrix(dense), 3).toarray(), expected)


def test_keep_strongest_over_rows_of_every_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hubs and leaves: rows of 1 to ~150 edges fall into different padded groups, each cut into
    several ``topk`` chunks; the result against a per-row argsort, with W's sorted indices kept."""
    monkeypatch.setattr(similarity, "TOPK_CHUNK", 256)
    rng = np.random.default_rng(11)
    m = 300
    degree = np.minimum(rng.zipf(1.6, m), m // 2)
    dense = np.zeros((m, m))
    for i, d in enumerate(degree):
        dense[i, rng.choice(np.delete(np.arange(m), i), d, replace=False)] = rng.random(d)
    dense = np.maximum(dense, dense.T)
    keep = np.zeros_like(dense, dtype=bool)
    for i in range(m):
        row = np.flatnonzero(dense[i])
        keep[i, row[np.argsort(-dense[i, row])[:5]]] = True
    pruned = keep_strongest(scipy.sparse.csr_matrix(dense), 5)
    assert pruned.has_sorted_indices
    np.testing.assert_array_equal(pruned.toarray(), np.where(keep | keep.T, dense, 0.0))
    assert np.diff(scipy.sparse.csr_matrix(dense).indptr).max() > 64  # the groups went that far


def test_knn_edge_cases_two_points_and_more_neighbours_than_points() -> None:
    two = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # two non-zero rows: they are each other's neighbour
    graph = knn_similarity(two, 4).toarray()
    assert graph[0, 2] == pytest.approx(np.cos(np.pi / 4)) and graph[0, 2] == graph[2, 0]
    points = np.random.default_rng(9).standard_normal((5, 3))
    complete = knn_similarity(points, 10, "gaussian").toarray()  # k capped at m − 1: every pair joined
    assert (complete + np.eye(5) > 0).all()
    assert default_neighbors(3) == 2 and default_neighbors(1000) == 10 and default_neighbors(8) == 4


def test_eigengap_bounds_are_inclusive_and_capped() -> None:
    values = np.array([0.0, 0.01, 0.02, 0.2, 0.21, 0.9])
    assert eigengap_clusters(values, 3, 3) == 3  # k_min = k_max is a fixed k
    assert eigengap_clusters(values, 2, 10) == 5  # k_max capped at r − 1 = 5: the gap 0.9 − 0.21 wins
    assert eigengap_clusters(values, 2, 4) == 3


def test_embed_rows_are_unit_rows_of_the_first_k_columns() -> None:
    vectors = np.array([[3.0, 4.0, 9.0], [0.0, 2.0, 9.0], [0.0, 0.0, 9.0]])
    np.testing.assert_allclose(embed_rows(vectors, 2), [[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]])


def test_bound_sizes_edges() -> None:
    points = np.concatenate([np.full((3, 2), 0.0), np.full((10, 2), 5.0)])
    labels = np.repeat([0, 1], [3, 10])
    on_bounds = bound_sizes(points, labels, min_size=3, max_size=10, seed=0)
    assert on_bounds.tolist() == labels.tolist()  # sizes exactly on the bounds stay
    assert np.bincount(bound_sizes(points, labels, min_size=3, max_size=6, seed=0)).max() <= 6  # max = 2 min
    merged = bound_sizes(points, labels, min_size=4, max_size=20, seed=0)  # two clusters, one too small
    assert len(np.unique(merged)) == 1
    near = np.concatenate([np.full((2, 2), 4.0), np.full((10, 2), 5.0), np.full((10, 2), -5.0)])
    moved = bound_sizes(near, np.repeat([0, 1, 2], [2, 10, 10]), min_size=3, max_size=30, seed=0)
    assert len(np.unique(moved[:12])) == 1 and moved[0] != moved[-1]  # into the nearest centroid's cluster


def test_update_timings_are_consistent() -> None:
    rng = np.random.default_rng(0)
    update = SpectralClusterer(clusters=(2, 4), eigenvectors=6).update(
        rng.standard_normal((60, 8)), np.ones(60), np.ones(60)
    )
    assert 0.0 <= update.eigen_seconds <= update.seconds


def test_a_split_kmeans_cannot_balance_falls_back_to_the_principal_axis() -> None:
    """An outlier makes 2-means split 1 vs 8; the fallback cuts at the median of the centred principal
    axis (here x), whatever the offset of the points from the origin."""
    x = np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 60])
    points = np.stack([x, np.full_like(x, 500.0)], axis=1)
    labels = bound_sizes(points, np.zeros(9, dtype=int), min_size=3, max_size=6, seed=0)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[-1]


def test_a_small_cluster_merges_into_the_nearest_centroid_not_the_nearest_rest() -> None:
    """The centroid of each cluster's own points decides: 2 points at 4 join the 20 at 5, not the 3 at −5."""
    x = np.concatenate([np.full(2, 4.0), np.full(20, 5.0), np.full(3, -5.0)])
    points = np.stack([x, np.zeros_like(x)], axis=1)
    labels = bound_sizes(points, np.repeat([0, 1, 2], [2, 20, 3]), min_size=3, max_size=30, seed=0)
    assert labels[0] == labels[2] != labels[-1]


def test_the_large_graph_path_agrees_with_the_exact_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """IVF neighbours and a multilevel first solve (forced at 960 blocks) give the modules of the exact
    path: ARI >= 0.95 with it and with the planted groups, update after update."""
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 8, 960)
    directions = rng.standard_normal((8, 16))
    exact = SpectralClusterer(clusters=(6, 10), eigenvectors=12, neighbor_search="exact")
    monkeypatch.setattr("spec_lightning.spectral.neighbors.CELL_SIZE", 60)
    monkeypatch.setattr("spec_lightning.spectral.clustering.DENSE_NODES", 100)
    monkeypatch.setattr("spec_lightning.spectral.eigensolve.DENSE_NODES", 100)
    large = SpectralClusterer(clusters=(6, 10), eigenvectors=12, neighbor_search="ivf")
    solvers = []
    for _ in range(3):
        sketches = directions[truth] + 0.6 * rng.standard_normal((960, 16))
        plain = exact.update(sketches, np.ones(960), np.ones(960))
        approximate = large.update(sketches, np.ones(960), np.ones(960))
        solvers.append(approximate.eigen_solver)
        assert adjusted_rand_score(exact.labels, large.labels) >= 0.95
        assert adjusted_rand_score(truth, large.labels) >= 0.95
        # the update reports the search: exact (recall 1, no probes), or the calibrated recall reached
        assert (plain.neighbor_recall, plain.neighbor_probes) == (1.0, 0)
        assert approximate.neighbor_recall >= 0.99 and 1 <= approximate.neighbor_probes <= 16  # 16 cells
    assert solvers == ["lobpcg-multilevel", "lobpcg-warm", "lobpcg-warm"]
    with pytest.raises(ValueError, match=r"neighbor_recall must lie in \(0, 1\], got 0"):
        SpectralClusterer(neighbor_recall=0)


def test_a_stalled_multilevel_start_is_reported_as_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Most blocks without gradient: aggregation cannot coarsen the graph, the full solve starts from a
    random block, and the update says so instead of passing it off as a multilevel solve."""
    monkeypatch.setattr("spec_lightning.spectral.clustering.DENSE_NODES", 100)
    monkeypatch.setattr("spec_lightning.spectral.eigensolve.DENSE_NODES", 100)
    rng = np.random.default_rng(5)
    sketches = np.zeros((600, 8))
    sketches[:100] = rng.standard_normal((2, 8))[rng.integers(0, 2, 100)] + 0.1 * rng.standard_normal(
        (100, 8)
    )
    result = SpectralClusterer(clusters=(2, 4), eigenvectors=6).update(sketches, np.ones(600), np.ones(600))
    assert result.eigen_solver == "lobpcg-fresh"
    assert result.eigen_fallback.startswith("no multilevel start (aggregation stalled")
    assert result.eigen_fallback.endswith("solved by lobpcg-fresh")
