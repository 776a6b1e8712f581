"""Parameter graphs, Laplacians, eigenpairs, the smoothness term and the filters, against references."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
import torch
from sklearn.metrics.pairwise import cosine_similarity

from spec_lightning.spectral import (
    GraphConfig,
    NodeFilter,
    ParameterGraphs,
    eigendecompose,
    filter_node_gradients,
    group_nodes,
    laplacian,
    spectral_smoothness,
)
from spec_lightning.spectral.graph import cosine_weights, gram, knn_sparsify, structural_weights


def random_weights(m: int, seed: int = 0, isolated: bool = False) -> torch.Tensor:
    """A symmetric non-negative weight matrix with a zero diagonal (and optionally one isolated node)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(m, m, generator=g, dtype=torch.float64)
    w = (w + w.T) * (torch.rand(m, m, generator=g, dtype=torch.float64) < 0.5)
    w = torch.maximum(w, w.T).fill_diagonal_(0.0)
    if isolated:
        w[0], w[:, 0] = 0.0, 0.0
    return w


@pytest.mark.parametrize("normalized", [False, True])
def test_laplacian_matches_scipy(normalized: bool) -> None:
    w = random_weights(9, isolated=True)
    expected = scipy.sparse.csgraph.laplacian(w.numpy(), normed=normalized)
    np.testing.assert_allclose(laplacian(w, normalized).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("solver", ["dense", "eigsh", "lobpcg"])
def test_eigenpairs_match_scipy_eigsh(solver: str) -> None:
    w = random_weights(60, seed=1)
    lap = laplacian(w)
    k = 5
    values, vectors = scipy.sparse.linalg.eigsh(
        scipy.sparse.csr_matrix(scipy.sparse.csgraph.laplacian(w.numpy())), k=k, which="SA", tol=1e-12
    )
    spectrum = eigendecompose(lap, k, solver)  # type: ignore[arg-type]
    np.testing.assert_allclose(spectrum.values.numpy(), np.sort(values), atol=1e-7)
    order = np.argsort(values)
    overlap = np.abs(spectrum.vectors.numpy().T @ vectors[:, order])  # same vectors up to sign
    np.testing.assert_allclose(overlap, np.eye(k), atol=1e-5)
    residual = lap @ spectrum.vectors - spectrum.vectors * spectrum.values
    assert residual.abs().max() < 1e-6


def test_eigendecompose_refuses_impossible_requests() -> None:
    lap = laplacian(random_weights(5))
    with pytest.raises(ValueError, match="cannot compute 6 eigenpairs"):
        eigendecompose(lap, 6)
    with pytest.raises(ValueError, match="use dense"):
        eigendecompose(lap, 4, "eigsh")


@pytest.mark.parametrize("normalized", [False, True])
def test_spectral_smoothness_is_the_pairwise_sum_and_the_trace(normalized: bool) -> None:
    w = random_weights(7, seed=2)
    delta = torch.randn(7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lap = laplacian(w, normalized)
    spectral = spectral_smoothness(delta, eigendecompose(lap))
    trace = 2 * torch.trace(delta.T @ lap @ delta)
    if normalized:  # the normalised Laplacian is the combinatorial one of the degree-scaled signal
        degree = w.sum(1)
        scaled = delta / degree.sqrt()[:, None]
    else:
        scaled = delta
    pairwise = sum(w[i, j] * (scaled[i] - scaled[j]).pow(2).sum() for i in range(7) for j in range(7))
    torch.testing.assert_close(spectral, trace)
    torch.testing.assert_close(spectral, torch.as_tensor(pairwise, dtype=torch.float64))


def test_smoothness_needs_the_whole_spectrum() -> None:
    with pytest.raises(ValueError, match="every eigenpair"):
        spectral_smoothness(torch.zeros(40, 2), eigendecompose(laplacian(random_weights(40)), 3))


def test_ideal_lowpass_removes_a_planted_high_frequency_and_keeps_the_constant() -> None:
    spectrum = eigendecompose(laplacian(structural_weights(6, 1)))  # a chain of 6 layers
    constant = torch.ones(6, 1, dtype=torch.float64) * torch.randn(1, 5, dtype=torch.float64)
    high = spectrum.vectors[:, -1:] * torch.randn(1, 5, dtype=torch.float64)
    lowpass = NodeFilter.from_spectrum(spectrum, "ideal_lowpass", cutoff=1)
    torch.testing.assert_close(lowpass.apply(constant + high), constant)
    heat = NodeFilter.from_spectrum(spectrum, "heat", tau=0.5)
    torch.testing.assert_close(heat.apply(constant), constant)
    torch.testing.assert_close(heat.apply(high), high * np.exp(-0.5 * spectrum.values[-1].item()))
    tikhonov = NodeFilter.from_spectrum(spectrum, "tikhonov", tau=2.0)
    torch.testing.assert_close(tikhonov.apply(high), high / (1 + 2.0 * spectrum.values[-1]))


def test_filters_refuse_a_partial_spectrum_they_cannot_use() -> None:
    partial = eigendecompose(laplacian(random_weights(40)), 3, "eigsh")
    with pytest.raises(ValueError, match="heat filter needs every eigenpair"):
        NodeFilter.from_spectrum(partial, "heat")
    with pytest.raises(ValueError, match="cutoff 4 exceeds the 3 eigenpairs"):
        NodeFilter.from_spectrum(partial, "ideal_lowpass", cutoff=4)


def test_partial_lowpass_equals_the_dense_one() -> None:
    lap = laplacian(random_weights(50, seed=4))
    nodes = torch.randn(50, 3, dtype=torch.float64)
    dense = NodeFilter.from_spectrum(eigendecompose(lap), "ideal_lowpass", cutoff=4)
    partial = NodeFilter.from_spectrum(eigendecompose(lap, 4, "eigsh"), "ideal_lowpass", cutoff=4)
    torch.testing.assert_close(partial.apply(nodes), dense.apply(nodes))


def test_gram_is_exactly_symmetric_and_sums_over_row_shards() -> None:
    """float32 θ θᵀ is not exactly symmetric for every shape on every BLAS (4 x 18 is not here); an
    asymmetric W gives L a spurious negative eigenvalue. Shards of the node columns sum to the Gram."""
    nodes = torch.randn(4, 18, generator=torch.Generator().manual_seed(2))
    k = gram(nodes)
    assert torch.equal(k, k.T)
    # float32 rounding of sums of 18 products of size ~1: absolute, not relative to a small entry
    np.testing.assert_allclose(
        k.numpy(), nodes.double().numpy() @ nodes.double().numpy().T, rtol=1e-6, atol=1e-5
    )
    torch.testing.assert_close(gram(nodes[:, :7]) + gram(nodes[:, 7:]), k, rtol=1e-6, atol=1e-6)


def test_edge_weights() -> None:
    assert structural_weights(4, 1).tolist() == [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert structural_weights(4, None).sum() == 12
    nodes = torch.randn(8, 20, generator=torch.Generator().manual_seed(5))
    nodes[3] = 0.0  # a zero node has no direction: no edges
    expected = np.clip(cosine_similarity(nodes.numpy()), 0.0, 1.0)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(cosine_weights(gram(nodes)).numpy(), expected, atol=1e-6)
    w = cosine_weights(gram(nodes))
    sparse = knn_sparsify(w, 2)
    torch.testing.assert_close(sparse, sparse.T)
    for i in range(8):
        for j in w[i].topk(2).indices.tolist():
            if w[i, j] > 0:
                assert sparse[i, j] == w[i, j]
    assert ((sparse > 0).sum(1) >= (w > 0).sum(1).clamp(max=2)).all()
    assert (sparse > 0).sum() < (w > 0).sum()


SHAPES = {
    "embeddings.weight": (30, 4),
    "layer.0.query.weight": (4, 4),
    "layer.0.query.bias": (4,),
    "layer.0.ffn.weight": (8, 4),
    "layer.1.query.weight": (4, 4),
    "layer.1.query.bias": (4,),
    "layer.1.ffn.weight": (8, 4),
    "layer.2.query.weight": (4, 4),
    "layer.2.ffn.weight": (8, 4),
    "classifier.weight": (2, 4),
}


def test_cross_layer_groups_one_graph_per_role_in_layer_order() -> None:
    groups = group_nodes(SHAPES, "cross_layer", None)
    assert [(g.name, g.params) for g in groups] == [
        ("layer.*.query.weight", ("layer.0.query.weight", "layer.1.query.weight", "layer.2.query.weight")),
        ("layer.*.ffn.weight", ("layer.0.ffn.weight", "layer.1.ffn.weight", "layer.2.ffn.weight")),
    ]
    assert [g.name for g in group_nodes(SHAPES, "cross_layer", ["query"])] == ["layer.*.query.weight"]
    rows = group_nodes(SHAPES, "rows", ["query.weight"])
    assert [g.params for g in rows] == [(f"layer.{i}.query.weight",) for i in range(3)]
    tensors = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    stacked = groups[1].stack(tensors)
    assert stacked.shape == (3, 32)
    groups[1].write(stacked * 2, tensors)
    torch.testing.assert_close(groups[1].stack(tensors), stacked * 2)


def test_group_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="'keys' matches no trainable matrix.*layer.\\*.query.weight"):
        group_nodes(SHAPES, "cross_layer", ["keys"])
    with pytest.raises(ValueError, match="no cross_layer graph has two nodes"):
        group_nodes(SHAPES, "cross_layer", ["classifier"])
    with pytest.raises(ValueError, match="different shapes.*exclude it from graph.targets"):
        group_nodes({"h.0.w": (2, 2), "h.1.w": (3, 2)}, "cross_layer", ["w"])
    with pytest.warns(UserWarning, match="differ in shape"), pytest.raises(ValueError, match="graph.groups"):
        group_nodes({"h.0.w": (2, 2), "h.1.w": (3, 2)}, "cross_layer", None)
    with pytest.raises(ValueError, match="one shape"):
        group_nodes({"a.w": (2, 2), "b.w": (3, 2)}, "cross_layer", None, {"g": ["a.w", "b.w"]})
    with pytest.raises(ValueError, match="'c' matches no trainable matrix"):
        group_nodes({"a.w": (2, 2), "b.w": (2, 2)}, "cross_layer", None, {"g": ["a", "c"]})
    with pytest.raises(ValueError, match="leave graph.targets unset"):
        GraphConfig(groups={"g": ("a", "b")}, targets=("a",))
    with pytest.raises(ValueError, match="rows of a matrix have none"):
        GraphConfig(kind="rows", edge_weights="structural")
    with pytest.raises(ValueError, match="graph.ema"):
        GraphConfig(ema=1.0)
    with pytest.raises(TypeError, match="list of names"):
        GraphConfig(targets="query")  # type: ignore[arg-type]


def test_gradient_cosine_is_an_exponential_average_and_survives_a_round_trip() -> None:
    config = GraphConfig(edge_weights="grad_cosine", neighbors=None, ema=0.75, targets=("query",))
    graphs = ParameterGraphs(SHAPES, config)
    steps = [{n: torch.randn(s) for n, s in SHAPES.items()} for _ in range(2)]
    for grads in steps:
        graphs.observe_gradients(grads)
    group = graphs.groups[0]
    first, second = (cosine_weights(gram(group.stack(g))) for g in steps)
    torch.testing.assert_close(graphs.weights[group.name], 0.75 * first + 0.25 * second)
    graphs.refresh()
    restored = ParameterGraphs(SHAPES, config)
    restored.load_state_dict(graphs.state_dict())
    torch.testing.assert_close(restored.spectra[group.name].values, graphs.spectra[group.name].values)
    with pytest.raises(KeyError, match="lacks the graphs"):
        ParameterGraphs(SHAPES, GraphConfig()).load_state_dict(graphs.state_dict())


def test_filter_node_gradients_reports_the_energy_removed() -> None:
    graphs = ParameterGraphs(SHAPES, GraphConfig())
    graphs.initialise({n: torch.zeros(s) for n, s in SHAPES.items()})
    graphs.refresh()
    filters = {
        n: NodeFilter.from_spectrum(s, "ideal_lowpass", 1).to(torch.device("cpu"), torch.float32)
        for n, s in graphs.spectra.items()
    }
    grads = {n: torch.randn(s) for n, s in SHAPES.items()}
    before = {n: g.clone() for n, g in grads.items()}
    total, removed = filter_node_gradients(graphs.groups, filters, grads)
    for group in graphs.groups:  # ideal low-pass at cutoff 1 on a connected graph: the mean over layers
        mean = group.stack(before).mean(0, keepdim=True).expand(3, -1)
        torch.testing.assert_close(group.stack(grads), mean)
    kept = sum(group.stack(grads).pow(2).sum() for group in graphs.groups)
    torch.testing.assert_close(removed, total - kept)
    for name in ("embeddings.weight", "layer.0.query.bias", "classifier.weight"):
        assert torch.equal(grads[name], before[name])


def test_a_clearly_negative_eigenvalue_is_refused_not_clamped() -> None:
    w = random_weights(6, seed=2)
    lap = laplacian(w)
    assert 0.0 <= eigendecompose(lap).values.min() < 1e-12  # round-off negatives would become 0
    w[0, 1] = w[1, 0] = -3.0  # a negative edge: L is then indefinite
    with pytest.raises(ValueError, match=r"eigenvalue -.* < 0: .* not symmetric and non-negative"):
        eigendecompose(laplacian(w))


def test_auto_takes_the_dense_solver_for_m_minus_one_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lanczos computes fewer than m − 1 pairs: ``auto`` must go dense for m − 1 even on large graphs."""
    monkeypatch.setattr(importlib.import_module("spec_lightning.spectral.laplacian"), "DENSE_NODES", 10)
    lap = laplacian(random_weights(20, seed=3))
    spectrum = eigendecompose(lap, 19)
    np.testing.assert_allclose(spectrum.values.numpy(), np.linalg.eigvalsh(lap.numpy())[:19], atol=1e-10)
    with pytest.raises(ValueError, match="computes fewer than m - 1 = 19 pairs; use dense"):
        eigendecompose(lap, 19, "eigsh")


def test_auto_targets_leave_out_roles_whose_layers_differ_in_shape() -> None:
    """LoRSA with a global budget: one role's layers differ, the others still form graphs."""
    shapes = {"h.0.p": (2, 4), "h.1.p": (3, 4), "h.0.q": (2, 2), "h.1.q": (2, 2), "h.2.q": (2, 2)}
    with pytest.warns(UserWarning, match=r"1 parameter role\(s\) left out.*h\.\*\.p"):
        groups = group_nodes(shapes, "cross_layer", None)
    assert [(g.name, g.params) for g in groups] == [("h.*.q", ("h.0.q", "h.1.q", "h.2.q"))]


def test_explicit_groups_name_nodes_of_models_without_numbered_layers() -> None:
    shapes = {
        "enc_a.fc.weight": (3, 2),
        "enc_b.fc.weight": (3, 2),
        "enc_c.fc.weight": (3, 2),
        "out.weight": (1, 3),
    }
    groups = group_nodes(shapes, "cross_layer", None, {"fc": ["enc_c.fc", "enc_a.fc", "enc_b.fc"]})
    assert [(g.name, g.kind, g.params) for g in groups] == [
        ("fc", "cross_layer", ("enc_c.fc.weight", "enc_a.fc.weight", "enc_b.fc.weight"))
    ]


def test_targets_name_modules_that_hold_peft_adapter_tensors() -> None:
    """peft names LoRA factors ``<layer>.lora_A.<adapter>.weight``: ``lora_A`` and the layer's name match."""
    shapes = {
        f"l.{i}.query.lora_{f}.default.weight": (2, 4) if f == "A" else (4, 2) for i in range(3) for f in "AB"
    }
    by_factor = group_nodes(shapes, "cross_layer", ["lora_A"])
    assert [g.name for g in by_factor] == ["l.*.query.lora_A.default.weight"]
    by_layer = group_nodes(shapes, "cross_layer", ["query"])
    assert sorted(g.name for g in by_layer) == [
        "l.*.query.lora_A.default.weight",
        "l.*.query.lora_B.default.weight",
    ]
