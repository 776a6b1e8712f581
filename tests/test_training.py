"""Training behaviour end to end: resume, adapter-only checkpoints, export, NaN and config errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spec_lightning import GLUEDataModule, HoulsbyAdapter, LoRA, SequenceClassificationModule
from spec_lightning.methods import FullFineTuning

#: Tiny models fitted a few steps answer one class; the warning that says so is asserted in
#: tests/test_regression.py, and is expected, not checked, here.
pytestmark = pytest.mark.filterwarnings("ignore:the run ended predicting:UserWarning")


class Interrupt(L.Callback):
    """Stops the fit after the first epoch, as a killed job would (its checkpoint is written)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def fit(
    module: SequenceClassificationModule,
    data_dir: str,
    tokenizer: str,
    epochs: int,
    root: Path,
    ckpt_path: str | None = None,
    interrupt: bool = False,
) -> L.Trainer:
    L.seed_everything(0)
    callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)]
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root,
        num_sanity_val_steps=2,
        callbacks=callbacks + [Interrupt()] * interrupt,
    )
    trainer.fit(
        module,
        GLUEDataModule("sst2", tokenizer=tokenizer, data_dir=data_dir, batch_size=8),
        ckpt_path=ckpt_path,
    )
    return trainer


def adapter(module: SequenceClassificationModule) -> dict[str, torch.Tensor]:
    return module.method.adapter_state_dict(module.model)


def test_resume_continues_exactly(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    def new() -> SequenceClassificationModule:  # dropout on, so the RNG state must be restored too
        return SequenceClassificationModule(tiny_bert, LoRA(r=4, dropout=0.3), learning_rate=1e-2)

    straight = new()
    fit(straight, sst2_dir, tiny_bert, 2, tmp_path / "a")
    first = new()
    fit(first, sst2_dir, tiny_bert, 2, tmp_path / "b", interrupt=True)
    assert first.current_epoch == 1
    resumed = new()
    fit(resumed, sst2_dir, tiny_bert, 2, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for key, value in adapter(straight).items():
        torch.testing.assert_close(adapter(resumed)[key], value, msg=key)
    assert not torch.equal(
        adapter(first)["base_model.model.classifier.modules_to_save.default.weight"],
        adapter(straight)["base_model.model.classifier.modules_to_save.default.weight"],
    )


def test_peft_checkpoints_hold_the_adapter_only(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4))
    fit(module, sst2_dir, tiny_bert, 1, tmp_path)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] == {}
    saved = sum(t.numel() for t in checkpoint["adapter_state_dict"].values())
    assert saved == sum(p.numel() for _, p in module.trainable_parameters())
    full = SequenceClassificationModule(tiny_bert, FullFineTuning())
    fit(full, sst2_dir, tiny_bert, 1, tmp_path / "full")
    assert torch.load(tmp_path / "full" / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]


def test_export_merged_loads_with_automodel(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4), learning_rate=1e-2)
    fit(module, sst2_dir, tiny_bert, 1, tmp_path)
    out = module.export(tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = AutoTokenizer.from_pretrained(out)(["the movie was good"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).logits, module.eval()(**inputs).logits, atol=1e-5, rtol=1e-4
        )


def test_export_adapter_alone(tiny_bert: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    lora = SequenceClassificationModule(tiny_bert, LoRA(r=4))
    lora.configure_model()
    lora.export(tmp_path / "lora", adapter_only=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "lora"), PeftModel)
    houlsby = SequenceClassificationModule(tiny_bert, HoulsbyAdapter(bottleneck=4))
    houlsby.configure_model()
    houlsby.export(tmp_path / "houlsby", adapter_only=True)
    state = load_file(tmp_path / "houlsby" / "adapter_model.safetensors")
    assert state.keys() == adapter(houlsby).keys()


def test_nan_loss_names_the_fix(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4), learning_rate=1e30)
    with pytest.raises(FloatingPointError, match="lower model.init_args.learning_rate"):
        fit(module, sst2_dir, tiny_bert, 3, tmp_path)


def test_unknown_target_lists_available_names(tiny_bert: str) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"'q_proj' matches no linear layer.*attention\.self\.query"):
        module.configure_model()


def test_rank_larger_than_matrix(tiny_bert: str) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=64))
    with pytest.raises(ValueError, match=r"method.init_args.r=64 does not fit .* \(32 x 32\).*\[1, 32\]"):
        module.configure_model()


def test_target_modules_as_a_string_is_refused(tiny_bert: str) -> None:
    with pytest.raises(TypeError, match=r"target_modules must be a list of names"):
        HoulsbyAdapter(target_modules="output.dense")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"target_modules must be a list of names"):
        LoRA(target_modules="query")  # type: ignore[arg-type]


def test_adapter_state_mismatch_is_named(tiny_bert: str) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4))
    module.configure_model()
    with pytest.raises(KeyError, match="does not fit this model: missing keys"):
        module.method.load_adapter_state_dict(module.model, {"nonsense": torch.zeros(1)})


def test_package_backbone_must_be_installed() -> None:
    module = SequenceClassificationModule("package:not_a_model_package_xyz")
    with pytest.raises(ImportError, match="not installed"):
        module.configure_model()


def test_export_is_atomic_and_never_mixes_runs(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4))
    module.configure_model()
    target = tmp_path / "export"
    module.export(target, adapter_only=True)
    with pytest.raises(FileExistsError, match=r"export: .*export is not empty; pass --overwrite"):
        module.export(target)
    out = module.export(target, overwrite=True)  # a merged export replaces the adapter export whole
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(module.model.base_model.model), "save_pretrained", fail, raising=False)
    with pytest.raises(OSError, match="disk full"):
        module.export(tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no half-written folder, no staging


def test_non_finite_weights_are_refused_on_export_and_load(tiny_bert: str, tmp_path: Path) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4))
    module.configure_model()
    state = module.method.adapter_state_dict(module.model)
    name = next(k for k in state if "lora_B" in k)
    with torch.no_grad():
        module.model.get_parameter(name).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the adapter holds non-finite values .*lora_B"):
        module.export(tmp_path / "adapter", adapter_only=True)
    with pytest.raises(ValueError, match="the merged model holds non-finite values"):
        module.export(tmp_path / "merged")
    fresh = SequenceClassificationModule(tiny_bert, LoRA(r=4))
    with pytest.raises(ValueError, match="the checkpoint holds non-finite values"):
        fresh.on_load_checkpoint(
            {"state_dict": {}, "adapter_state_dict": module.method.adapter_state_dict(module.model)}
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (
            lambda path: SequenceClassificationModule(path, FullFineTuning()),
            r"method: checkpoint .*LoRA.*FullFineTuning",
        ),
        (lambda path: SequenceClassificationModule(path, LoRA(r=2)), r"'r': 4.*'r': 2"),
        (
            lambda path: SequenceClassificationModule(path, LoRA(r=4), task="rte"),
            r"task: checkpoint 'sst2', this run 'rte'",
        ),
    ],
    ids=["method", "rank", "task"],
)
def test_a_checkpoint_of_another_run_is_refused(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, other: object, match: str
) -> None:
    fit(SequenceClassificationModule(tiny_bert, LoRA(r=4)), sst2_dir, tiny_bert, 1, tmp_path)
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=1,
        max_epochs=2,
        default_root_dir=tmp_path / "other",
    )
    for run in (trainer.validate, trainer.test, trainer.fit):
        with pytest.raises(
            ValueError, match=rf"the checkpoint was written by another run: .*{match}.*config\.yaml"
        ):
            run(other(tiny_bert), data, ckpt_path=ckpt)  # type: ignore[operator]
    same = SequenceClassificationModule(tiny_bert, LoRA(r=4, dropout=0.3))  # dropout: training only
    assert trainer.validate(same, data, ckpt_path=ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    with pytest.raises(ValueError, match="num_labels: checkpoint 2, this run 3"):
        SequenceClassificationModule(tiny_bert, LoRA(r=4), num_labels=3).check_run_facts(checkpoint)
