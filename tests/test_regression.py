"""Regression (STS-B-style scores) that learns: standardised targets, predictions and exports in the
labels' units; and the warning for a run that ends predicting one class."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
from scipy.stats import pearsonr
from transformers import AutoModelForSequenceClassification

from spec_lightning import FullFineTuning, GLUEDataModule, LoRA, SequenceClassificationModule, load_adapter
from tests.conftest import WORDS, quiet_trainer


def write_stsb(folder: Path, n_train: int = 256, n_dev: int = 64, seed: int = 0) -> Path:
    """STS-B-layout TSVs: the score is 2.2 plus 0.6 per positive word minus 0.6 per negative word in
    both sentences, so it lies around 2.7 with a spread of about 0.9, like STS-B's 0–5 scores."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        for i in range(n):
            s1, s2 = (rng.choices(WORDS, k=5) for _ in range(2))
            words = s1 + s2
            score = 2.2 + 0.6 * sum(w in WORDS[:3] for w in words) - 0.6 * sum(w in WORDS[3:6] for w in words)
            lines.append(f"{i}\tg\tf\t2020\t{i}\ts\ts\t{' '.join(s1)}\t{' '.join(s2)}\t{score + 0.5:.2f}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_stsb(tmp_path_factory.mktemp("stsb")))


def fit(module: SequenceClassificationModule, data: GLUEDataModule, root: Path, epochs: int) -> L.Trainer:
    trainer = quiet_trainer(root, -1, [], max_epochs=epochs)
    trainer.fit(module, data)
    return trainer


def test_regression_learns_and_exports_in_the_labels_units(
    tiny_bert: str, stsb_dir: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = SequenceClassificationModule(
        tiny_bert, FullFineTuning(), num_labels=1, task="stsb", learning_rate=1e-3
    )
    data = GLUEDataModule("stsb", tokenizer=tiny_bert, data_dir=stsb_dir, batch_size=16)
    trainer = fit(module, data, tmp_path, epochs=10)
    labels = torch.tensor(data.splits["train"]["labels"], dtype=torch.float64)
    mean, std = module.target_stats
    assert mean == pytest.approx(float(labels.mean())) and std == pytest.approx(float(labels.std()))
    assert trainer.callback_metrics["val/pearson"] > 0.9  # 160 optimiser steps

    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        predicted = module.eval().predict_step(batch, 0)
    assert abs(float(predicted.mean()) - float(batch["labels"].mean())) < 0.5  # the labels' units
    assert pearsonr(predicted.numpy(), batch["labels"].numpy()).statistic > 0.9

    merged = AutoModelForSequenceClassification.from_pretrained(module.export(tmp_path / "merged")).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits.squeeze(-1), predicted, atol=1e-4, rtol=1e-4)


def test_an_adapter_and_a_checkpoint_keep_the_target_scale(
    tiny_bert: str, stsb_dir: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4), num_labels=1, task="stsb", learning_rate=1e-2)
    data = GLUEDataModule("stsb", tokenizer=tiny_bert, data_dir=stsb_dir, batch_size=32)
    trainer = fit(module, data, tmp_path, epochs=1)
    assert module.target_stats is not None and module.target_stats[0] > 2
    batch = next(iter(data.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        predicted = module.eval().predict_step(batch, 0)
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=1, ignore_mismatched_sizes=True
        )
        rebuilt = load_adapter(base, module.export(tmp_path / "adapter", adapter_only=True)).eval()
        torch.testing.assert_close(rebuilt(**inputs).logits.squeeze(-1), predicted, atol=1e-4, rtol=1e-4)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = SequenceClassificationModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    assert loaded.target_stats == module.target_stats
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().predict_step(batch, 0), predicted)


def test_a_run_that_predicts_one_class_says_it_did_not_learn(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4), learning_rate=1e-9)
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=32)
    with torch.no_grad():  # a head that answers class 1 whatever the input
        module.configure_model()
        head = next(m for n, m in module.model.named_modules() if n.endswith("modules_to_save.default"))
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))
    with pytest.warns(
        UserWarning, match=r"ended predicting class 1 for every validation example.*did not learn"
    ):
        fit(module, data, tmp_path, epochs=1)
    learner = SequenceClassificationModule(tiny_bert, FullFineTuning(), learning_rate=1e-2)
    small_batches = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    with pytest.warns() as caught:
        trainer = fit(learner, small_batches, tmp_path / "b", epochs=5)
    assert trainer.callback_metrics["val/accuracy"] > 0.9
    assert not [w for w in caught if "did not learn" in str(w.message)], [str(w.message) for w in caught]


def test_a_regression_run_that_predicts_one_value_says_it_did_not_learn(
    tiny_bert: str, stsb_dir: str, tmp_path: Path
) -> None:
    module = SequenceClassificationModule(tiny_bert, LoRA(r=4), num_labels=1, task="stsb", learning_rate=1e-9)
    data = GLUEDataModule("stsb", tokenizer=tiny_bert, data_dir=stsb_dir, batch_size=64)
    with torch.no_grad():  # a head that ignores its input: it predicts μ + s · b
        module.configure_model()
        head = next(m for n, m in module.model.named_modules() if n.endswith("modules_to_save.default"))
        head.weight.zero_()
    with pytest.warns(UserWarning, match=r"ended predicting about 2\.\d+ for every validation example"):
        fit(module, data, tmp_path, epochs=1)
