"""SpectralGradientFilter on a user-written LightningModule: exact filtering, scope, logging, resume, DDP."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sklearn.metrics.pairwise import cosine_similarity

from spec_lightning import (
    FullFineTuning,
    GLUEDataModule,
    GraphConfig,
    GraphSpectral,
    SequenceClassificationModule,
    SpectralGradientFilter,
)
from tests.conftest import run_script
from tests.run_filter_ddp import STEPS, make_filter
from tests.user_model import LayerStack


class GradRecorder(L.Callback):
    """Copies every gradient in ``on_before_optimizer_step`` (placed before and after the filter)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def fit(
    callbacks: list[L.Callback], steps: int, tmp_path: Path, **kwargs: Any
) -> tuple[L.Trainer, LayerStack]:
    module = LayerStack()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    trainer.fit(module)
    return trainer, module


def heat_operator(weights: np.ndarray, tau: float) -> np.ndarray:
    """U exp(−τΛ) Uᵀ for L = D − W, by numpy."""
    values, vectors = np.linalg.eigh(np.diag(weights.sum(1)) - weights)
    return vectors @ np.diag(np.exp(-tau * values)) @ vectors.T


def stacked(grads: dict[str, torch.Tensor], layer: str) -> np.ndarray:
    return np.stack([grads[f"blocks.{i}.{layer}.weight"].flatten().double().numpy() for i in range(4)])


def test_filters_exactly_the_named_parameters(tmp_path: Path) -> None:
    before, after = GradRecorder(), GradRecorder()
    callback = SpectralGradientFilter(GraphConfig(targets=("fc1",)), filter="heat", tau=0.7)
    trainer, _ = fit([before, callback, after], 2, tmp_path)
    chain = np.diag(np.ones(3), 1) + np.diag(np.ones(3), -1)
    for pre, post in zip(before.grads, after.grads, strict=True):
        np.testing.assert_allclose(
            stacked(post, "fc1"), heat_operator(chain, 0.7) @ stacked(pre, "fc1"), atol=1e-6
        )
        for name in pre:
            if not name.endswith("fc1.weight"):
                assert torch.equal(pre[name], post[name]), f"{name} changed"
    kept = (stacked(after.grads[-1], "fc1") ** 2).sum() / (stacked(before.grads[-1], "fc1") ** 2).sum()
    assert trainer.logged_metrics["spectral_filter/energy_removed"] == pytest.approx(1 - kept, rel=1e-5)
    assert callback.steps == 2


def test_gradient_cosine_graph_is_built_from_the_first_gradient(tmp_path: Path) -> None:
    before, after = GradRecorder(), GradRecorder()
    callback = SpectralGradientFilter(
        GraphConfig(targets=("fc2",), edge_weights="grad_cosine", neighbors=None), filter="heat", tau=2.0
    )
    fit([before, callback, after], 1, tmp_path)
    g = stacked(before.grads[0], "fc2")
    weights = np.clip(cosine_similarity(g), 0, 1)
    np.fill_diagonal(weights, 0)
    np.testing.assert_allclose(stacked(after.grads[0], "fc2"), heat_operator(weights, 2.0) @ g, atol=1e-6)


def test_runs_once_per_optimizer_step_after_accumulation(tmp_path: Path) -> None:
    callback = SpectralGradientFilter(GraphConfig(targets=("fc1", "fc2")), filter="ideal_lowpass", cutoff=1)
    after = GradRecorder()
    fit([callback, after], 3, tmp_path, accumulate_grad_batches=2)
    assert callback.steps == 3
    for grads in after.grads:  # cutoff 1 on a connected chain: every layer gets the mean gradient
        g = stacked(grads, "fc2")
        np.testing.assert_allclose(g, np.broadcast_to(g.mean(0), g.shape), atol=1e-6)


def test_filter_sees_unscaled_gradients_under_amp(tmp_path: Path) -> None:
    """on_before_optimizer_step runs after the GradScaler unscales (scale 2^16): the true gradients."""
    reference = LayerStack()
    torch.nn.functional.mse_loss(reference(reference.x[:8]), reference.y[:8]).backward()
    before = GradRecorder()
    scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**16))
    fit([before, SpectralGradientFilter(GraphConfig(targets=("fc1",)))], 1, tmp_path, plugins=[scaler])
    expected = reference.blocks[0]["fc1"].weight.grad
    torch.testing.assert_close(before.grads[0]["blocks.0.fc1.weight"], expected, rtol=1e-2, atol=1e-5)


GPU = pytest.param(
    "gpu",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)


@pytest.mark.parametrize("accelerator", ["cpu", GPU])
def test_bf16_mixed_fit_with_the_joint_loss(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, accelerator: str
) -> None:
    method = GraphSpectral(FullFineTuning(), spectral_weight=1.0)
    module = SequenceClassificationModule(tiny_bert, method, learning_rate=1e-3)
    gradient_filter = SpectralGradientFilter(GraphConfig(edge_weights="grad_cosine"), filter="tikhonov")
    trainer = L.Trainer(
        max_steps=3,
        accelerator=accelerator,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[gradient_filter],
        limit_val_batches=1,
    )
    trainer.fit(module, GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8))
    metrics = trainer.callback_metrics
    assert gradient_filter.steps == 3 and 0 < metrics["spectral_filter/energy_removed"] < 1
    assert metrics["train/spectral_loss"] > 0 and torch.isfinite(metrics["train/loss"])


def test_resume_restores_the_graphs_and_the_step_count(tmp_path: Path) -> None:
    config = GraphConfig(targets=("fc1",), edge_weights="grad_cosine", neighbors=2, ema=0.5)
    first = SpectralGradientFilter(config, filter="tikhonov", tau=1.0, recompute_every_n_steps=10)
    trainer, _ = fit([first], 3, tmp_path)
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {k: v.clone() for k, v in first.graphs.weights.items()}

    resumed = SpectralGradientFilter(config, filter="tikhonov", tau=1.0, recompute_every_n_steps=10)
    before, after = GradRecorder(), GradRecorder()
    module = LayerStack()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        callbacks=[before, resumed, after],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, ckpt_path=ckpt)
    assert resumed.steps == 5
    # step 3 (no recompute before step 10) is filtered with the graph of the interrupted run
    w = saved["blocks.*.fc1.weight"].numpy()
    values, vectors = np.linalg.eigh(np.diag(w.sum(1)) - w)
    operator = vectors @ np.diag(1 / (1 + values)) @ vectors.T
    np.testing.assert_allclose(
        stacked(after.grads[0], "fc1"), operator @ stacked(before.grads[0], "fc1"), atol=1e-6
    )
    assert not torch.equal(resumed.graphs.similarity["blocks.*.fc1.weight"], torch.zeros(4, 4))


def test_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="filter must be ideal_lowpass, heat or tikhonov"):
        SpectralGradientFilter(filter="box")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="cutoff=0"):
        SpectralGradientFilter(cutoff=0)
    with pytest.raises(MisconfigurationException, match="recompute_every_n_steps=0"):
        SpectralGradientFilter(recompute_every_n_steps=0)
    with pytest.raises(MisconfigurationException, match="tau=-0.1"):
        SpectralGradientFilter(tau=-0.1)
    SpectralGradientFilter(cutoff=1, tau=0.0, recompute_every_n_steps=1)  # the bounds themselves are fine
    with pytest.raises(MisconfigurationException, match="'attn' matches no trainable matrix"):
        fit([SpectralGradientFilter(GraphConfig(targets=("fc1", "attn")))], 1, tmp_path)
    with pytest.raises(MisconfigurationException, match="no cross_layer graph has two nodes"):
        fit([SpectralGradientFilter(GraphConfig(targets=("blocks.0.fc1",)))], 1, tmp_path)
    fsdp = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="FSDPStrategy \\(FSDP1\\).*Use FSDP2"):
        SpectralGradientFilter().setup(fsdp, LayerStack(), "fit")  # type: ignore[arg-type]


def test_ddp_ranks_filter_identically_and_match_one_process(tmp_path: Path) -> None:
    """2 CPU processes (gloo) with half batches each = one process with the whole batch."""
    run_script("run_filter_ddp.py", str(tmp_path), cwd=tmp_path, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    callback = make_filter()
    _, single = fit([callback], STEPS, tmp_path)
    unfiltered = fit([], STEPS, tmp_path)[1]
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
    for group, w in callback.graphs.weights.items():
        torch.testing.assert_close(ranks[0]["filter"]["graphs"]["weights"][group], w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single.blocks[0]["fc1"].weight, unfiltered.blocks[0]["fc1"].weight)


class DropGradient(L.Callback):
    """Sets one parameter's gradient to None before the filter runs (as a module search's freeze does)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        dict(pl_module.named_parameters())[self.name].grad = None


def test_a_graph_without_gradients_is_skipped_by_name_and_the_others_filtered(tmp_path: Path) -> None:
    before, after = GradRecorder(), GradRecorder()
    callback = SpectralGradientFilter(GraphConfig(targets=("fc1", "fc2")), filter="heat", tau=0.7)
    with pytest.warns(
        UserWarning, match=r"no gradient, e.g. \['blocks.0.fc2.weight'\].*blocks.\*.fc2.weight"
    ) as record:
        fit([DropGradient("blocks.0.fc2.weight"), before, callback, after], 3, tmp_path)
    assert sum("SpectralGradientFilter" in str(w.message) for w in record) == 1  # once, not per step
    chain = np.diag(np.ones(3), 1) + np.diag(np.ones(3), -1)
    for pre, post in zip(before.grads, after.grads, strict=True):
        np.testing.assert_allclose(
            stacked(post, "fc1"), heat_operator(chain, 0.7) @ stacked(pre, "fc1"), atol=1e-6
        )
        for i in (1, 2, 3):
            assert torch.equal(pre[f"blocks.{i}.fc2.weight"], post[f"blocks.{i}.fc2.weight"])
    assert callback.steps == 3
