"""SpecLoRA's maths: the Hadamard-form forward against the explicit W', and against peft's LoRA."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spec_lightning.methods import SpecLoRA
from spec_lightning.methods.speclora import SpecLoRALinear
from spec_lightning.methods.speclora.function import SpecLoRADelta
from spec_lightning.spectral import top_k_svd
from tests.conftest import assert_bf16_autocast_gradients


def randomised_layer(n: int, m: int, dropout: float) -> SpecLoRALinear:
    """SpecLoRA (k=6, r=3, α=6: s = 2) on a seeded n -> m Linear, with a random mask and B (both are
    zero at init, which would hide their terms)."""
    torch.manual_seed(0)
    base = nn.Linear(n, m)
    layer = SpecLoRALinear(base, top_k_svd(base.weight.detach(), 6), r=3, alpha=6, dropout=dropout)
    with torch.no_grad():
        layer.mask.copy_(torch.randn(6))
        layer.lora_B.copy_(torch.randn(m, 3))
    return layer


def test_forward_equals_the_explicit_adapted_weight() -> None:
    layer = randomised_layer(20, 36, dropout=0.0)
    base = layer.base
    u, s, v = layer.u_k, layer.sigma_k, layer.v_k  # the randomized top-6 SVD (tested in test_spectral_svd)
    w_new = base.weight + (u * (layer.mask * s)) @ v.T + 2.0 * layer.lora_B @ layer.lora_A
    x = torch.randn(4, 5, 20)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w_new.T + base.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.effective_weight(), w_new, atol=1e-5, rtol=1e-5)


def delta_inputs(shared: bool) -> list[torch.Tensor]:
    """x, x_d (x itself when ``shared``), V_k, U_k, σ_k, m, A, B in float64, the trained ones with
    gradients (n=6 in, m=5 out, k=3, r=2)."""
    g = torch.Generator().manual_seed(1)
    x, x_d, v, u, sigma, mask, a, b = (
        torch.randn(shape, generator=g, dtype=torch.float64)
        for shape in [(4, 6), (4, 6), (6, 3), (5, 3), (3,), (3,), (2, 6), (5, 2)]
    )
    return [
        x.requires_grad_(),
        x if shared else x_d.requires_grad_(),
        v,
        u,
        sigma,
        *(t.requires_grad_() for t in (mask, a, b)),
    ]


@pytest.mark.parametrize("shared", [False, True])
def test_hand_written_backward_passes_gradcheck(shared: bool) -> None:
    """SpecLoRADelta's backward against finite differences (float64) for x, x_d, m, A and B; with x_d = x
    (no dropout) the two input gradients come out added, as one."""
    x, x_d, *rest = delta_inputs(shared)
    if shared:
        assert torch.autograd.gradcheck(lambda x, *r: SpecLoRADelta.apply(x, x, *r, 0.7), [x, *rest])
    else:
        assert torch.autograd.gradcheck(lambda *t: SpecLoRADelta.apply(*t, 0.7), [x, x_d, *rest])


def test_gradients_with_dropout_equal_those_of_the_composed_maths() -> None:
    """The layer in training (dropout 0.5) against y = base(x) + ((x V_k) ⊙ (m ⊙ σ_k)) U_kᵀ + s x_d Aᵀ Bᵀ
    composed of torch operations with the same dropout mask: outputs and the gradients of x, m, A, B."""
    layer = randomised_layer(20, 36, dropout=0.5).train()
    base = layer.base
    x = torch.randn(4, 5, 20, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.square().sum().backward()
    ours = [x.grad, layer.mask.grad, layer.lora_A.grad, layer.lora_B.grad]
    x_ref = x.detach().clone().requires_grad_()
    mask, a, b = (t.detach().clone().requires_grad_() for t in (layer.mask, layer.lora_A, layer.lora_B))
    torch.manual_seed(7)
    x_d = nn.functional.dropout(x_ref, 0.5, training=True)
    spectral = ((x_ref @ layer.v_k) * (mask * layer.sigma_k)) @ layer.u_k.T
    reference = base(x_ref) + spectral + 2.0 * (x_d @ a.T) @ b.T
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    reference.square().sum().backward()
    for got, want in zip(ours, [x_ref.grad, mask.grad, a.grad, b.grad], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_under_bf16_autocast_the_gradients_keep_their_dtype_and_values() -> None:
    """The fused backward replays the forward's autocast: bf16 matmuls, float32 gradients within bf16
    rounding of the exact ones."""
    layer = randomised_layer(24, 40, dropout=0.0)
    x = torch.randn(16, 24, requires_grad=True)
    assert_bf16_autocast_gradients(layer, x, [x, layer.mask, layer.lora_A, layer.lora_B])


def test_with_zero_mask_it_is_peft_lora(tiny_bert: str) -> None:
    """Same A and B as peft's LoRA layer: equal logits while m = 0, different once m moves."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    ours = SpecLoRA(target_modules=["query", "value"], r=4, alpha=8, dropout=0.0, top_k=8).apply(
        copy.deepcopy(base), head=["classifier"]
    )
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(1)
    for name, module in ours.named_modules():
        if isinstance(module, SpecLoRALinear):
            lora = reference.base_model.model.get_submodule(name)
            with torch.no_grad():
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g))
                lora.lora_A["default"].weight.copy_(module.lora_A)
                lora.lora_B["default"].weight.copy_(module.lora_B)
    inputs = AutoTokenizer.from_pretrained(tiny_bert)(
        ["the movie was good", "bad"], padding=True, return_tensors="pt"
    )

    def hidden(model: nn.Module) -> torch.Tensor:
        return model(**inputs, output_hidden_states=True).hidden_states[-1]

    with torch.no_grad():
        torch.testing.assert_close(hidden(ours), hidden(reference), atol=1e-5, rtol=1e-5)
        for module in ours.modules():
            if isinstance(module, SpecLoRALinear):
                module.mask.fill_(0.5)
        assert (hidden(ours) - hidden(reference)).abs().max() > 1e-2


def test_trainable_count(tiny_bert: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    SpecLoRA(target_modules=["query"], r=4, top_k=8).apply(model, head=["classifier"])
    layers = [m for m in model.modules() if isinstance(m, SpecLoRALinear)]
    assert sum(p.numel() for m in layers for p in m.parameters() if p.requires_grad) == 2 * (
        4 * (32 + 32) + 8
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 33}, r"method.init_args.top_k=33 does not fit"),
        ({"r": 64}, r"method.init_args.r=64 does not fit"),
        ({"target_modules": []}, r"target_modules is empty"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configuration_is_named(tiny_bert: str, kwargs: dict, match: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    with pytest.raises(ValueError, match=match):
        SpecLoRA(**kwargs).apply(model, head=["classifier"])


def test_adapter_means_the_same_update_under_another_svd_seed(tiny_bert: str) -> None:
    """The basis travels with the adapter: a model built with another SVD seed (standing for another
    device or BLAS) that loads it reproduces the outputs and the merged weights."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    trained_method = SpecLoRA(r=4, alpha=8, dropout=0.0, top_k=8, seed=0)
    trained = trained_method.apply(copy.deepcopy(base), head=["classifier"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in trained.modules():
            if isinstance(module, SpecLoRALinear):
                module.mask.copy_(torch.randn(module.mask.shape, generator=g))
                module.lora_B.copy_(0.1 * torch.randn(module.lora_B.shape, generator=g))
    state = trained_method.adapter_state_dict(trained)
    other_method = SpecLoRA(r=4, alpha=8, dropout=0.0, top_k=8, seed=123)
    other = other_method.apply(copy.deepcopy(base), head=["classifier"])
    name = next(n for n, m in other.named_modules() if isinstance(m, SpecLoRALinear))
    # The seeds give other directions: recomputing the basis would change the mask part of the update.
    mine, theirs = trained.get_submodule(name), other.get_submodule(name)
    mask = mine.mask.detach()
    part_mine = (mine.u_k * (mask * mine.sigma_k)) @ mine.v_k.T
    part_theirs = (theirs.u_k * (mask * theirs.sigma_k)) @ theirs.v_k.T
    assert (part_mine - part_theirs).norm() / part_mine.norm() > 1e-4

    other_method.load_adapter_state_dict(other, state)
    inputs = AutoTokenizer.from_pretrained(tiny_bert)(
        ["a fine film", "dull"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs).logits, trained(**inputs).logits, atol=1e-6, rtol=1e-5)
        delta_trained = mine.delta_weight()
        delta_other = other.get_submodule(name).delta_weight()
    assert ((delta_other - delta_trained).norm() / delta_trained.norm()).item() < 1e-7  # the same tensors
    merged_trained = dict(trained_method.merge(copy.deepcopy(trained)).named_parameters())
    merged_other = dict(other_method.merge(copy.deepcopy(other)).named_parameters())
    for key, value in merged_trained.items():
        torch.testing.assert_close(merged_other[key], value, atol=1e-6, rtol=1e-6)


def test_adapter_without_basis_is_refused_with_the_reason(tiny_bert: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    method = SpecLoRA(top_k=8)
    method.apply(model, head=["classifier"])
    state = {
        k: v for k, v in method.adapter_state_dict(model).items() if not k.endswith(("u_k", "sigma_k", "v_k"))
    }
    with pytest.raises(KeyError, match="no singular basis"):
        method.load_adapter_state_dict(model, state)
