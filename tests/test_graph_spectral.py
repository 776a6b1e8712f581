"""The joint spectral loss of graph-spectral coordination: its value, its gradient, its logging."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity
from transformers import BertConfig, BertForSequenceClassification

from spec_lightning import (
    FullFineTuning,
    GLUEDataModule,
    GraphConfig,
    GraphSpectral,
    LoRA,
    SequenceClassificationModule,
)
from spec_lightning.methods import FineTuningMethod
from spec_lightning.naming import layer_role

TARGETS = ("query", "intermediate.dense")
GRAPH = GraphConfig(targets=TARGETS, edge_weights="weight_cosine", neighbors=None)


def tiny_encoder(layers: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=16
    )
    return BertForSequenceClassification(config)


def pairwise(
    params: dict[str, torch.Tensor], weights_from: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σ_roles Σ_ij W_ij ||Δθ_i − Δθ_j||² with W the clipped cosine of ``weights_from`` (complete graph)
    and Δθ = params − reference, written out pair by pair."""
    roles: dict[str, list[str]] = {}
    for name in params:
        split = layer_role(name)
        if split and any(name.endswith(f"{t}.weight") for t in TARGETS):
            roles.setdefault(split[0], []).append(name)
    total = torch.zeros((), dtype=torch.float64)
    for names in roles.values():
        w = np.clip(
            cosine_similarity(np.stack([weights_from[n].flatten().double().numpy() for n in names])), 0, 1
        )
        np.fill_diagonal(w, 0)
        delta = [(params[n] - reference[n]).double() for n in names]
        for i in range(len(names)):
            for j in range(len(names)):
                total = total + w[i, j] * (delta[i] - delta[j]).pow(2).sum()
    return total


def perturb(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_spectral_loss_is_the_pairwise_sum_of_updates() -> None:
    method = GraphSpectral(FullFineTuning(), GRAPH, spectral_weight=0.5)
    model = method.apply(tiny_encoder())
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert method.regularization(model).value.abs() < 1e-6  # Δθ = 0 at the start
    params = perturb(model)
    term = method.regularization(model)
    assert (term.name, term.weight, term.task_weight) == ("spectral_loss", 0.5, 1.0)
    torch.testing.assert_close(
        term.value.double(), pairwise(params, pretrained, pretrained), rtol=1e-4, atol=1e-6
    )


def test_raw_theta_variant_regularises_the_weights_themselves() -> None:
    method = GraphSpectral(FullFineTuning(), GRAPH, reference="zero")
    model = method.apply(tiny_encoder())
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in pretrained.items()}
    torch.testing.assert_close(
        method.regularization(model).value.double(),
        pairwise(pretrained, pretrained, zeros),
        rtol=1e-4,
        atol=1e-6,
    )
    params = perturb(model)  # W stays that of the pretrained weights
    torch.testing.assert_close(
        method.regularization(model).value.double(), pairwise(params, pretrained, zeros), rtol=1e-4, atol=1e-6
    )


def test_gradient_is_four_laplacian_times_update() -> None:
    """∂/∂Δθ of 2 tr(Δθᵀ L Δθ) is 4 L Δθ for each graph's stacked nodes."""
    method = GraphSpectral(FullFineTuning(), GraphConfig(targets=("query",), neighbors=1))
    model = method.apply(tiny_encoder())
    group = method.graphs.groups[0]
    pretrained = group.stack(dict(model.named_parameters())).detach().clone()
    perturb(model)
    method.regularization(model).value.backward()
    params = dict(model.named_parameters())
    grads = group.stack({n: p.grad for n, p in params.items() if p.grad is not None})
    chain = torch.tensor([[1.0, -1, 0, 0], [-1, 2, -1, 0], [0, -1, 2, -1], [0, 0, -1, 1]])
    expected = 4 * chain @ (group.stack(params).detach() - pretrained)
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("objective", "weight", "task_weight"), [("task", 0.0, 1.0), ("spectral", 0.3, 0.0)])
def test_ablation_objectives(objective: str, weight: float, task_weight: float) -> None:
    method = GraphSpectral(FullFineTuning(), spectral_weight=0.3, objective=objective)  # type: ignore[arg-type]
    model = method.apply(tiny_encoder())
    term = method.regularization(model)
    assert (term.weight, term.task_weight) == (weight, task_weight)


def test_adapter_tensors_form_nodes_and_everything_else_is_the_wrapped_method() -> None:
    lora = LoRA(target_modules=["query", "value"], r=2, dropout=0.0)
    method = GraphSpectral(lora)
    model = method.apply(tiny_encoder())
    assert [g.name for g in method.graphs.groups] == [
        "base_model.model.bert.encoder.layer.*.attention.self.query.lora_A.default.weight",
        "base_model.model.bert.encoder.layer.*.attention.self.query.lora_B.default.weight",
        "base_model.model.bert.encoder.layer.*.attention.self.value.lora_A.default.weight",
        "base_model.model.bert.encoder.layer.*.attention.self.value.lora_B.default.weight",
    ]
    assert method.parameter_efficient and method.mergeable
    assert method.adapter_state_dict(model).keys() == lora.adapter_state_dict(model).keys()


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="graph.edge_weights=grad_cosine"):
        GraphSpectral(graph=GraphConfig(edge_weights="grad_cosine"))
    with pytest.raises(ValueError, match="spectral_weight must be >= 0"):
        GraphSpectral(spectral_weight=-1.0)
    with pytest.raises(ValueError, match="reference must be pretrained or zero"):
        GraphSpectral(reference="init")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="objective must be joint, task or spectral"):
        GraphSpectral(objective="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'keys' matches no trainable matrix"):
        GraphSpectral(graph=GraphConfig(targets=("keys",))).apply(tiny_encoder())


def test_the_module_logs_task_and_spectral_terms_apart(tiny_bert: str, sst2_dir: str) -> None:
    method = GraphSpectral(FullFineTuning(), spectral_weight=100.0)
    module = SequenceClassificationModule(tiny_bert, method, learning_rate=0.01)
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    logged = trainer.callback_metrics
    assert logged["train/spectral_loss"] > 0
    assert logged["train/spectral_loss_weight"] == 100.0
    torch.testing.assert_close(
        logged["train/loss"], logged["train/task_loss"] + 100.0 * logged["train/spectral_loss"]
    )


def test_spectral_loss_keeps_float32_under_autocast() -> None:
    method = GraphSpectral(FullFineTuning(), GRAPH)
    model = method.apply(tiny_encoder())
    perturb(model)
    exact = method.spectral_loss(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = method.spectral_loss(model)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, exact)


def test_lora_cosine_edges_come_from_the_wrapped_pretrained_weights() -> None:
    """B is zero at init: edges from the adapter's initial values would leave it no edges and L_spec 0.
    The edges are the cosines of the layers' pretrained weights, and L_spec over B moves with B."""
    pretrained = {n: p.detach().clone() for n, p in tiny_encoder().named_parameters()}
    method = GraphSpectral(
        LoRA(target_modules=["query"], r=2, dropout=0.0),
        GraphConfig(edge_weights="weight_cosine", neighbors=None),
    )
    model = method.apply(tiny_encoder())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(4)]
    w = np.clip(cosine_similarity(np.stack([pretrained[n].flatten().double().numpy() for n in names])), 0, 1)
    np.fill_diagonal(w, 0)
    expected = torch.zeros((), dtype=torch.float64)
    for factor in ("lora_A", "lora_B"):
        keys = [f"base_model.model.{n[: -len('.weight')]}.{factor}.default.weight" for n in names]
        delta = [(moved[k] - params[k]).double() for k in keys]
        for i in range(4):
            for j in range(4):
                expected = expected + w[i, j] * (delta[i] - delta[j]).pow(2).sum()
    value = method.regularization(model).value.double()
    assert value > 0
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-8)


def test_cosine_edges_that_no_pretrained_weight_backs_are_refused() -> None:
    rows = GraphSpectral(
        LoRA(target_modules=["query"], r=2), GraphConfig(kind="rows", edge_weights="weight_cosine")
    )
    with pytest.raises(ValueError, match="an adapter factor's rows are not the pretrained weight's rows"):
        rows.apply(tiny_encoder())
    adapter = GraphSpectral(FreshPerLayer(), GraphConfig(edge_weights="weight_cosine"))
    with pytest.raises(ValueError, match="wrap no pretrained layer"):
        adapter.apply(tiny_encoder())


class FreshPerLayer(FineTuningMethod):
    """Trains a freshly initialised matrix per layer that wraps nothing (no pretrained weight behind it)."""

    def apply(self, model: torch.nn.Module, head=(), total_steps=None):  # type: ignore[no-untyped-def]
        model.requires_grad_(False)
        for layer in model.bert.encoder.layer:
            layer.extra = torch.nn.Linear(8, 8)
        return model


def test_normalized_laplacian_end_to_end() -> None:
    """With L_sym, 2 tr(Δθᵀ L_sym Δθ) = Σ_ij W_ij ||Δθ_i/√d_i − Δθ_j/√d_j||², written out pair by pair."""
    graph = GraphConfig(targets=("query",), edge_weights="weight_cosine", neighbors=None, normalized=True)
    method = GraphSpectral(FullFineTuning(), graph)
    model = method.apply(tiny_encoder())
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = perturb(model)
    names = [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(4)]
    w = np.clip(cosine_similarity(np.stack([pretrained[n].flatten().double().numpy() for n in names])), 0, 1)
    np.fill_diagonal(w, 0)
    degree = w.sum(axis=1)
    delta = [(params[n] - pretrained[n]).double() / np.sqrt(degree[i]) for i, n in enumerate(names)]
    expected = sum(w[i, j] * (delta[i] - delta[j]).pow(2).sum() for i in range(4) for j in range(4))
    torch.testing.assert_close(method.regularization(model).value.double(), expected, rtol=1e-4, atol=1e-8)
