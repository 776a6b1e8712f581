"""k-NN search of gradient sketches: the exact path against numpy, the IVF index against the exact one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spec_lightning.spectral import neighbors
from spec_lightning.spectral.neighbors import nearest_neighbours, neighbour_recall


def brute_force(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pairwise distance, each point's own left out, the k smallest in order."""
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1)[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def planted(m: int, groups: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, groups, m)
    return rng.standard_normal((groups, 16))[truth] + 0.3 * rng.standard_normal((m, 16)), truth


def test_exact_search_against_numpy_brute_force() -> None:
    points = np.random.default_rng(1).standard_normal((60, 5))
    distances, found = nearest_neighbours(points, 4, "exact")
    expected_distances, expected = brute_force(points, 4)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-6)


@pytest.mark.parametrize("rows_per_block", [1, 7, 64])
def test_blocked_exact_search_in_any_block_size_against_brute_force(rows_per_block: int) -> None:
    """Blocks of 1, 7 (a ragged last block) and all 60 rows give the brute-force neighbours, also for
    points far from the origin, where float32's ||a||² + ||b||² − 2a·b alone would cancel (centring and
    the float64 re-ranking keep them exact)."""
    rng = np.random.default_rng(2)
    for points in (rng.standard_normal((60, 5)), 1e4 + rng.standard_normal((60, 5))):
        distances, found = neighbors.blocked_exact_neighbours(points, 5, rows_per_block=rows_per_block)
        expected_distances, expected = brute_force(points, 5)
        np.testing.assert_array_equal(found, expected)
        np.testing.assert_allclose(distances, expected_distances, rtol=1e-9)


def test_blocked_exact_search_keeps_duplicates_and_leaves_out_each_point_itself() -> None:
    """Three copies of a point: each one's nearest are the two others (distance 0, lower index first),
    never itself."""
    rng = np.random.default_rng(3)
    points = np.vstack([rng.standard_normal((10, 4)), np.repeat(rng.standard_normal((1, 4)), 3, axis=0)])
    distances, found = neighbors.blocked_exact_neighbours(points, 2, rows_per_block=4)
    assert (
        found[10].tolist() == [11, 12] and found[11].tolist() == [10, 12] and found[12].tolist() == [10, 11]
    )
    np.testing.assert_array_equal(distances[10:], 0.0)
    assert all(i not in row for i, row in enumerate(found))


def test_ivf_with_a_single_cell_scans_everything_in_half_precision() -> None:
    """One cell: every point is scanned; the points are stored in half precision, so near ties may
    swap, but the neighbours found are the nearest within 2⁻¹⁰ relative and so are their distances."""
    points = np.random.default_rng(2).standard_normal((200, 8))  # 200 < CELL_SIZE: one cell
    distances, found = nearest_neighbours(points, 5, "ivf")
    expected_distances, expected = brute_force(points, 5)
    assert (found == expected).mean() > 0.95  # only near ties differ
    true_distances = np.linalg.norm(points[found] - points[:, None, :], axis=-1)
    np.testing.assert_allclose(np.sort(true_distances, axis=1), expected_distances, rtol=2**-10)
    np.testing.assert_allclose(distances, true_distances, rtol=2**-10)


def test_ivf_recall_and_planted_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 40 cells of 100 points and 4 probed, most exact neighbours are found and every found one
    lies in the point's planted group (what the clustering needs)."""
    monkeypatch.setattr(neighbors, "CELL_SIZE", 100)
    points, truth = planted(4000)
    _, exact = nearest_neighbours(points, 12, "exact")
    distances, found = nearest_neighbours(points, 12, "ivf", probes=4)
    assert neighbour_recall(found, exact) >= 0.8
    assert (found >= 0).all() and (truth[found] == truth[:, None]).all()
    assert (found != np.arange(4000)[:, None]).all()
    assert (np.diff(distances, axis=1) >= -1e-6).all()  # nearest first
    more = nearest_neighbours(points, 12, "ivf", probes=16)[1]
    assert neighbour_recall(more, exact) > neighbour_recall(found, exact)


def test_ivf_leaves_out_each_point_even_among_duplicates() -> None:
    points = np.repeat(np.random.default_rng(3).standard_normal((50, 4)), 3, axis=0)
    _, found = nearest_neighbours(points, 4, "ivf")
    assert (found != np.arange(150)[:, None]).all()
    # The two copies of each point are its nearest neighbours, at distance 0.
    copies = np.sort(found[:, :2], axis=1)
    expected = np.array([[j for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i] for i in range(150)])
    np.testing.assert_array_equal(copies, expected)


def test_auto_is_exact_up_to_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    points, _ = planted(600)
    monkeypatch.setattr(neighbors, "CELL_SIZE", 50)
    exact = nearest_neighbours(points, 6, "exact")[1]
    np.testing.assert_array_equal(nearest_neighbours(points, 6, "auto")[1], exact)
    monkeypatch.setitem(neighbors.EXACT_NODES, "cpu", 500)
    assert neighbour_recall(nearest_neighbours(points, 6, "auto", probes=1)[1], exact) < 1.0
    assert neighbors.exact_nodes("cpu") == 500 and neighbors.exact_nodes("meta") == 500  # others: the CPU's
    assert neighbors.exact_nodes("cuda") == neighbors.EXACT_NODES["cuda"] > 500


@pytest.mark.parametrize("target", [0.9, 0.99])
def test_calibrated_probes_reach_the_target_recall(monkeypatch: pytest.MonkeyPatch, target: float) -> None:
    """Weakly clustered points (noise as wide as the groups) in 80 cells: the calibrated search finds at
    least the target fraction of the brute-force neighbours over every point (not only the 500
    sampled), its estimate is within 0.02 of that, and a higher target takes more probes."""
    monkeypatch.setattr(neighbors, "CELL_SIZE", 50)
    rng = np.random.default_rng(5)
    points = rng.standard_normal((4, 16))[rng.integers(0, 4, 4000)] + rng.standard_normal((4000, 16))
    exact = brute_force(points, 10)[1]
    found = neighbors.search_neighbours(points, 10, "ivf", recall=target)
    true_recall = neighbour_recall(found.indices, exact)
    assert true_recall >= target - 0.01 and abs(found.recall - true_recall) < 0.02
    fixed = neighbors.search_neighbours(points, 10, "ivf", probes=neighbors.FIRST_PROBES)
    assert fixed.probes == neighbors.FIRST_PROBES and neighbour_recall(fixed.indices, exact) < 0.9
    assert found.probes > neighbors.FIRST_PROBES
    exact_search = neighbors.search_neighbours(points, 10, "exact")
    assert (exact_search.recall, exact_search.probes) == (1.0, 0)


def test_neighbour_recall_by_hand() -> None:
    exact = np.array([[1, 2], [0, 2]])
    assert neighbour_recall(np.array([[2, 1], [0, 3]]), exact) == 0.75
    assert neighbour_recall(np.array([[-1, 1], [-1, -1]]), exact) == 0.25


def test_errors_name_the_problem() -> None:
    with pytest.raises(
        ValueError, match=r"neighbor search must be one of \('auto', 'exact', 'ivf'\), got 'hnsw'"
    ):
        nearest_neighbours(np.ones((4, 2)), 2, "hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot find 4 neighbours among 4 points; use 1 to 3"):
        nearest_neighbours(np.ones((4, 2)), 4)
    with pytest.raises(ValueError, match=r"the target recall must lie in \(0, 1\], got 1.5"):
        nearest_neighbours(np.ones((4, 2)), 2, recall=1.5)
    with pytest.raises(ValueError, match="probes must be at least 1"):
        nearest_neighbours(np.ones((4, 2)), 2, "ivf", probes=0)


def test_the_neighbour_benchmark_runs_and_its_calibrated_search_reaches_its_target(tmp_path: Path) -> None:
    """``benchmarks/neighbor_search.py`` at tiny sizes: its rows hold the recall the calibrated search
    reached against scikit-learn's exact neighbours (at least the target less the sample's error), and
    the fixed-probe sweep and the exact-only mode write their tables."""
    from benchmarks import neighbor_search

    output = tmp_path / "search"
    neighbor_search.main(
        ["--blocks", "3000", "--repeats", "1", "--recall", "0.95", "--sweep-blocks", "3000",
         "--sweep-probes", "1", "11", "--output", str(output)]
    )  # fmt: skip
    rows = json.loads(output.with_suffix(".json").read_text())["rows"]
    (row, *sweep) = rows
    assert row["recall_over"] == 3000 and row["ivf_recall"] >= 0.93 and row["ivf_recall_estimate"] >= 0.95
    assert [r["probes"] for r in sweep] == [1, 11] and sweep[1]["ivf_recall"] > 0.999  # all 11 cells
    assert "| 3,000 |" in output.with_suffix(".md").read_text()
    neighbor_search.main(["--exact-only", "--blocks", "1500", "--repeats", "1", "--output", str(output)])
    (exact,) = json.loads(output.with_suffix(".json").read_text())["rows"]
    assert exact["blocks"] == 1500 and exact["device"] == "cpu" and exact["blocked_exact_s"] > 0
