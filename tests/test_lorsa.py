"""LoRSA's maths on small tensors: the vectorised forward against the explicit per-component W'."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from spec_lightning.methods import LoRSA
from spec_lightning.methods.lorsa import LoRSALinear
from spec_lightning.methods.lorsa.function import LoRSADelta
from spec_lightning.methods.lorsa.layer import projections
from spec_lightning.methods.lorsa.method import lorsa_layers
from spec_lightning.methods.targets import weight_matrix
from spec_lightning.spectral import top_k_svd
from tests.conftest import assert_bf16_autocast_gradients


def randomised(layer: LoRSALinear, seed: int = 0) -> LoRSALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.delta_sigma, layer.p, layer.q):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def explicit_weight(layer: LoRSALinear, w: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """W' = W − Σ_{i∈S} σ_i u_i v_iᵀ + Σ_{i∈S} (σ_i + Δσ_i) u_i' v_i'ᵀ, one component at a time."""
    spectrum = top_k_svd(w, k, seed)
    p_proj, q_proj = projections(w.shape[0], w.shape[1], layer.rank, seed)
    out = w.clone()
    for j, i in enumerate(layer.index.tolist()):
        u, s, v = spectrum.U[:, i], spectrum.S[i], spectrum.V[:, i]
        u_new = u + p_proj @ layer.p[:, j]
        v_new = v + q_proj @ layer.q[:, j]
        out += (s + layer.delta_sigma[j]) * torch.outer(u_new, v_new) - s * torch.outer(u, v)
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_the_explicit_adapted_weight(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 40) if kind == "linear" else Conv1D(40, 24)  # both map 24 -> 40
    w = weight_matrix(base).detach().clone()
    spectrum = top_k_svd(w, 12, seed=3)
    layer = randomised(LoRSALinear(base, spectrum, torch.tensor([0, 2, 5, 11]), rank=3, seed=3))
    x = torch.randn(2, 7, 24)
    expected = x @ explicit_weight(layer, w, 12, 3).T + base.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            layer.effective_weight(), explicit_weight(layer, w, 12, 3), atol=1e-5, rtol=1e-5
        )


def test_hand_written_backward_passes_gradcheck() -> None:
    """LoRSADelta's backward against finite differences (float64), for x, Δσ, p and q."""
    g = torch.Generator().manual_seed(1)
    n, m, s, r = 6, 5, 3, 2
    tensors = [
        torch.randn(shape, generator=g, dtype=torch.float64)
        for shape in [(4, n), (n, s + r), (m, s + r), (s,)]
    ]
    trained = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in [(s,), (r, s), (r, s)]]
    inputs = [tensors[0].requires_grad_(), *tensors[1:], *(t.requires_grad_() for t in trained)]
    assert torch.autograd.gradcheck(LoRSADelta.apply, inputs)


def test_gradients_equal_those_of_the_explicit_adapted_weight() -> None:
    """∂L/∂(x, Δσ, p, q) through the layer equal autograd through W' built component by component."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40).double()
    w = weight_matrix(base).detach().clone()
    layer = randomised(
        LoRSALinear(base, top_k_svd(w, 12, seed=3), torch.tensor([0, 2, 5, 11]), rank=3, seed=3)
    )
    layer.double()
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 7, 40, dtype=torch.float64)
    trained = [x, layer.delta_sigma, layer.p, layer.q]
    ours = torch.autograd.grad(((layer(x) - target) ** 2).sum(), trained)
    p_proj, q_proj = (t.double() for t in projections(40, 24, 3, 3))
    adapted = w.clone()
    for j in range(4):  # W' from the layer's stored factors, one component at a time
        u, sigma, v = layer.u_s[:, j], layer.sigma_s[j], layer.v_s[:, j]
        u_new, v_new = u + p_proj @ layer.p[:, j], v + q_proj @ layer.q[:, j]
        adapted = (
            adapted + (sigma + layer.delta_sigma[j]) * torch.outer(u_new, v_new) - sigma * torch.outer(u, v)
        )
    reference = x @ adapted.T + base.bias
    theirs = torch.autograd.grad(((reference - target) ** 2).sum(), trained)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_under_bf16_autocast_the_gradients_keep_their_dtype_and_values() -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = randomised(
        LoRSALinear(base, top_k_svd(base.weight.detach(), 12, 0), torch.arange(4), rank=3, seed=0)
    )
    x = torch.randn(16, 24, requires_grad=True)
    assert_bf16_autocast_gradients(layer, x, [x, layer.delta_sigma, layer.p, layer.q])


def test_identity_at_init_is_exact() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRSALinear(base, top_k_svd(base.weight.detach(), 8), torch.arange(4), rank=2, seed=0)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))


def test_trainable_count_is_s_times_one_plus_2r(tiny_bert: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    LoRSA(target_modules=["query", "value"], num_components=5, rank=3).apply(model, head=["classifier"])
    layers = lorsa_layers(model)
    assert len(layers) == 4  # 2 layers x (query, value)
    adapter = sum(p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad)
    assert adapter == 4 * 5 * (1 + 2 * 3)


def test_state_reloads_with_another_component_count(tiny_bert: str) -> None:
    """A layer resizes to the saved |S| (as after a global-budget selection) and gets the same output."""
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    spectrum = top_k_svd(base.weight.detach(), 16)
    trained = randomised(LoRSALinear(base, spectrum, torch.tensor([1, 4, 9]), rank=2, seed=5))
    fresh = LoRSALinear(base, spectrum, torch.arange(6), rank=2, seed=0)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.num_components == 3 and int(fresh.projection_seed) == 5
    x = torch.randn(4, 32)
    torch.testing.assert_close(fresh(x), trained(x))
    assert "in_basis" not in trained.state_dict()  # P, Q are regenerated from the seed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 64}, r"method.init_args.top_k=64 does not fit .*query \(32 x 32\)"),
        ({"rank": 40}, r"method.init_args.rank=40 does not fit"),
        ({"num_components": 20, "top_k": 16}, r"num_components=20 does not fit .*\[1, top_k=16\]"),
        ({"target_modules": []}, r"target_modules is empty"),
        ({"target_modules": ["qkv"]}, r"'qkv' matches no linear layer"),
    ],
)
def test_bad_configuration_is_named(tiny_bert: str, kwargs: dict, match: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    with pytest.raises(ValueError, match=match):
        LoRSA(**kwargs).apply(model, head=["classifier"])


def test_default_top_k_is_capped_by_the_matrix(tiny_bert: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    LoRSA(num_components=4, rank=2).apply(model, head=["classifier"])
    assert {layer.top_k for layer in lorsa_layers(model).values()} == {32}


def test_projection_scale_follows_the_spec() -> None:
    """P (m x r) has entries N(0, 1/m) and Q (n x r) entries N(0, 1/n), so P p_i and u_i are of one scale."""
    p, q = projections(800, 300, 64, seed=5)
    assert p.shape == (800, 64) and q.shape == (300, 64)
    for matrix, fan in ((p, 800), (q, 300)):
        assert abs(matrix.mean().item()) < 4 / (fan * matrix.numel()) ** 0.5
        assert matrix.var().item() * fan == pytest.approx(1.0, rel=0.05)
    again = projections(800, 300, 64, seed=5)
    assert torch.equal(again[0], p) and torch.equal(again[1], q)
    assert not torch.equal(projections(800, 300, 64, seed=6)[0], p)
