"""The spectral callbacks on a user's LightningModule under FSDP2 (2 CPU processes, gloo) against one
process with the whole batch: the gradient filter (cross_layer with gradient-cosine edges, rows graphs),
DSCA + ModuleSearch through the search and the export, and a run resumed from a gathered checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_script
from tests.run_callbacks_fsdp2 import SCENARIOS, run

#: The tiny stacks' biases and norms lie outside every block, and the search freezes what it did not select:
#: ModuleSearch and DynamicSpectralClustering say so (asserted with pytest.warns in test_mftc_callbacks);
#: here it is expected, not checked.
pytestmark = pytest.mark.filterwarnings(
    "ignore:ModuleSearch. .* outside every block:UserWarning",
    "ignore:DynamicSpectralClustering. .* have no gradient:UserWarning",
)

#: Half batches reduce-scattered against whole ones: the same sums in another order.
ATOL = 1e-6


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every scenario's state from both FSDP2 ranks."""
    out = tmp_path_factory.mktemp("fsdp2")
    run_script("run_callbacks_fsdp2.py", str(out), cwd=out)
    return {s: [torch.load(out / f"{s}-rank{r}.pt", weights_only=False) for r in (0, 1)] for s in SCENARIOS}


def assert_weights(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    for name, value in single["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], ranks[0]["params"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("scenario", ["filter_cross_layer", "filter_rows"])
def test_gradient_filter_under_fsdp2_equals_one_process(sharded, scenario: str, tmp_path: Path) -> None:
    single = run(scenario, None, tmp_path)
    unfiltered = run("mftc", None, tmp_path)["params"]  # not filtered: the filter changed the weights
    assert_weights(sharded[scenario], single)
    assert not torch.allclose(single["params"]["blocks.0.fc1.weight"], unfiltered["blocks.0.fc1.weight"])
    graphs = sharded[scenario][0]["filter"]["graphs"]
    for key in ("weights", "similarity"):
        assert set(graphs[key]) == set(single["filter"]["graphs"][key])
        for group, value in single["filter"]["graphs"][key].items():
            torch.testing.assert_close(graphs[key][group], value, rtol=0, atol=ATOL)


@pytest.mark.parametrize("scenario", ["mftc", "mftc_resumed"])
def test_clustering_and_search_under_fsdp2_equal_one_process(sharded, scenario: str, tmp_path: Path) -> None:
    """Sketches from each rank's rows (one row block straddles the two shards), probes that train on
    both ranks' halves, masks on local rows, the export gathered; resumed: the same after a restart."""
    single = run(scenario, None, tmp_path)
    ranks = sharded[scenario]
    assert_weights(ranks, single)
    for rank in ranks:
        assert rank["selected"] == single["selected"]
        np.testing.assert_array_equal(
            rank["clustering"]["clusterer"]["labels"], single["clustering"]["clusterer"]["labels"]
        )
        torch.testing.assert_close(
            rank["clustering"]["sketches"], single["clustering"]["sketches"], atol=ATOL, rtol=0
        )
    if scenario == "mftc":
        assert single["selected"], "the search selected nothing: the probes' comparison would be weak"
        report, expected = ranks[0]["report"], single["report"]
        gains = [c["b_accuracy"] for c in report["candidates"]]
        np.testing.assert_allclose(gains, [c["b_accuracy"] for c in expected["candidates"]], atol=1e-6)
    exported, expected = load_file(ranks[0]["exported"]), load_file(single["exported"])
    assert set(exported) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=ATOL)


def test_what_fsdp2_cannot_take_is_refused_with_the_reason(tiny_bert: str) -> None:
    """A global LoRSA budget (it would replace parameters FSDP2 has sharded) and a 2-D (HSDP or tensor
    parallel) mesh, whose shards are not one rank's rows, are configuration errors naming the fix."""
    stdout = run_script("run_fsdp2_refusals.py", tiny_bert, cwd=Path(tiny_bert), timeout=300)
    outcome = dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)
    assert outcome["importance_global"].startswith(
        "MisconfigurationException: SpectralImportance(budget='global')"
    )
    assert "budget='per_layer'" in outcome["importance_global"]
    assert outcome["hsdp_mesh"].startswith(
        "MisconfigurationException: SpectralGradientFilter: a parameter is"
    )
    assert "tensor_parallel_size=1" in outcome["hsdp_mesh"]
