"""faiss and pyamg (the ``scale`` extra) are loaded only by DSCA's large path; without them everything
else works and the large path refuses to start, naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spec_lightning import DynamicSpectralClustering
from spec_lightning.spectral import neighbors, optional
from spec_lightning.spectral.clustering import SpectralClusterer
from spec_lightning.spectral.neighbors import nearest_neighbours
from tests.test_mftc_callbacks import RULES, ProbedStack, trainer

EXTRA = "pip install 'spec-lightning[scale]'"


@pytest.fixture
def without_large_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss and pyamg as if not installed (an import of either raises ImportError)."""
    for module in ("faiss", "pyamg", "pyamg.aggregation"):
        monkeypatch.setitem(sys.modules, module, None)


def test_import_and_every_public_name_load_neither_faiss_nor_pyamg() -> None:
    code = (
        "import sys, spec_lightning, spec_lightning.spectral.clustering, spec_lightning.callbacks\n"
        "[getattr(spec_lightning, n) for n in spec_lightning.__all__]\n"
        "print(sorted(m for m in ('faiss', 'pyamg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_does_not_import(without_large_path: None) -> None:
    assert not optional.available("faiss") and not optional.available("pyamg.aggregation")
    assert optional.available("scipy")


def test_the_approximate_search_names_the_extra(without_large_path: None) -> None:
    points = np.random.default_rng(0).standard_normal((50, 4))
    with pytest.raises(
        ImportError,
        match=r"needs faiss-cpu, which is not installed; install the extra: "
        + EXTRA.replace("[", r"\[").replace("]", r"\]"),
    ):
        nearest_neighbours(points, 3, "ivf")
    distances, found = nearest_neighbours(points, 3, "exact")  # the exact path needs neither
    assert found.shape == (50, 3)


def test_the_callback_refuses_the_large_path_at_fit_start(tmp_path: Path, without_large_path: None) -> None:
    """Before the first step, not at the first update steps into a run."""
    callback = DynamicSpectralClustering(
        RULES, sketch_dim=8, eigenvectors=6, clusters=(2, 4), min_module_size=2, neighbor_search="ivf"
    )
    model = ProbedStack()
    with pytest.raises(
        ImportError,
        match=r"DynamicSpectralClustering at 24 blocks .* needs faiss-cpu.*spec-lightning\[scale\]",
    ):
        trainer(tmp_path, [callback], 4).fit(model)
    assert callback.steps == 0


def test_above_the_exact_size_both_packages_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, without_large_path: None
) -> None:
    monkeypatch.setitem(neighbors.EXACT_NODES, "cpu", 20)
    callback = DynamicSpectralClustering(
        RULES, sketch_dim=8, eigenvectors=6, clusters=(2, 4), min_module_size=2
    )
    with pytest.raises(ImportError, match=r"needs faiss-cpu and pyamg, which are not installed"):
        trainer(tmp_path, [callback], 4).fit(ProbedStack())


def test_without_pyamg_the_exact_path_clusters_from_a_random_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, without_large_path: None
) -> None:
    """Between the dense size and the exact-search size, a full solve without pyamg starts LOBPCG from a
    random block and finds the planted groups; the callback says so once."""
    monkeypatch.setattr("spec_lightning.spectral.clustering.DENSE_NODES", 100)
    monkeypatch.setattr("spec_lightning.spectral.eigensolve.DENSE_NODES", 100)
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 8, 600)
    directions = rng.standard_normal((8, 16))
    clusterer = SpectralClusterer(clusters=(6, 10), eigenvectors=12, neighbor_search="exact")
    result = clusterer.update(
        directions[truth] + 0.6 * rng.standard_normal((600, 16)), np.ones(600), np.ones(600)
    )
    assert result.eigen_solver == "lobpcg-fresh" and result.eigen_fallback == ""
    assert adjusted_rand_score(truth, clusterer.labels) >= 0.95
    monkeypatch.setattr("spec_lightning.callbacks.dynamic_spectral_clustering.DENSE_NODES", 10)
    callback = DynamicSpectralClustering(
        RULES, sketch_dim=8, eigenvectors=6, clusters=(2, 4), min_module_size=2, update_every_n_steps=2
    )
    with pytest.warns(UserWarning, match="pyamg is not installed") as record:
        trainer(tmp_path, [callback], 4).fit(ProbedStack())
    assert sum("pyamg" in str(w.message) for w in record) == 1
    assert callback.clusterer.updates == 2
