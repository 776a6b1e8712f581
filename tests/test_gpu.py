"""CUDA and bf16 paths of the spectral methods and callbacks (``pytest -m gpu`` on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from transformers.models.bert.modeling_bert import BertLayer

from spec_lightning import GLUEDataModule, SequenceClassificationModule, SpectralImportance, SpectrumMonitor
from tests.conftest import BACKBONE_TARGETS, METHODS
from tests.run_callbacks_fsdp2 import SCENARIOS, run
from tests.test_method_contract import batch, build, train_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method_name", ["lorsa", "speclora", "lora"])
def test_identity_and_merge_on_cuda(tiny_bert: str, method_name: str) -> None:
    module = build(("bert", tiny_bert), method_name).cuda()
    inputs = {k: v.cuda() for k, v in batch(tiny_bert).items()}
    base = build(("bert", tiny_bert), "full").cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        adapted_bf16 = module.eval()(**inputs).logits
        base_bf16 = base(**inputs).logits
    torch.testing.assert_close(adapted_bf16, base_bf16, atol=2e-2, rtol=2e-2)
    train_steps(module, inputs)
    with torch.no_grad():
        torch.testing.assert_close(
            module.merged_model().eval()(**inputs).logits, module(**inputs).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("method_name", ["lorsa", "speclora", "lora"])
def test_fit_bf16_mixed_with_the_callbacks(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, method_name: str
) -> None:
    module = SequenceClassificationModule(tiny_bert, METHODS[method_name](*BACKBONE_TARGETS["bert"]))
    callbacks: list[L.Callback] = [SpectrumMonitor(top_k=4)]
    if method_name == "lorsa":
        callbacks.append(SpectralImportance(num_samples=32, batch_size=8))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        limit_val_batches=2,
    )
    trainer.fit(module, GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8))
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert (tmp_path / "spectrum.csv").is_file()


@pytest.mark.parametrize(("strategy", "method_name"), [("fsdp", "full"), ("fsdp2", "lora")])
def test_sharded_fit_bf16_on_cuda(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, strategy: str, method_name: str
) -> None:
    """FSDP1 (full fine-tuning, BertLayer auto-wrap) and FSDP2 (an adapter) train, validate and write a
    last.ckpt under bf16-mixed on one GPU; the FSDP2 checkpoint holds the whole adapter."""
    sharding = (
        FSDPStrategy(auto_wrap_policy={BertLayer}, activation_checkpointing_policy={BertLayer})
        if strategy == "fsdp"
        else ModelParallelStrategy(save_distributed_checkpoint=False)
    )
    module = SequenceClassificationModule(tiny_bert, METHODS[method_name](*BACKBONE_TARGETS["bert"]))
    trainer = L.Trainer(
        max_steps=4,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        strategy=sharding,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(tmp_path / "ckpt", save_last=True, save_top_k=0)],
        limit_val_batches=2,
    )
    trainer.fit(module, GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8))
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    if strategy == "fsdp2":
        saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["adapter_state_dict"]
        assert sum(v.numel() for v in saved.values()) == sum(
            p.numel() for _, p in module.trainable_parameters()
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_callbacks_under_fsdp2_on_cuda(tmp_path: Path, scenario: str) -> None:
    """Every spectral callback on the user's model under FSDP2 on one GPU (NCCL, a mesh of one: the
    collectives and the devices of masks, sketches and Gram matrices) equals the unsharded GPU run."""
    sharded = run(scenario, 1, tmp_path / "fsdp2", accelerator="gpu")
    single = run(scenario, None, tmp_path / "single", accelerator="gpu")
    for name, value in single["params"].items():
        torch.testing.assert_close(sharded["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert sharded.get("selected") == single.get("selected")


def test_the_exact_neighbour_search_on_cuda_matches_the_cpu_one() -> None:
    """DSCA's exact k-NN on the GPU (blocked torch matmuls) finds scikit-learn's neighbours on the CPU."""
    import numpy as np

    from spec_lightning.spectral.neighbors import nearest_neighbours

    points = np.random.default_rng(0).standard_normal((3000, 32))
    cpu_distances, cpu_found = nearest_neighbours(points, 12, "exact")
    gpu_distances, gpu_found = nearest_neighbours(points, 12, "exact", device="cuda")
    np.testing.assert_array_equal(gpu_found, cpu_found)
    np.testing.assert_allclose(gpu_distances, cpu_distances, rtol=1e-9)
