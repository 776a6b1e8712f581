"""CausalLMModule: every method on a decoder LM, perplexity and MMLU scoring against direct computation."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from spec_lightning import (
    CausalLMModule,
    FullFineTuning,
    InstructionDataModule,
    LanguageModelingDataModule,
    LoRA,
    MMLUDataModule,
)
from tests.conftest import BACKBONE_TARGETS, METHODS
from tests.test_lm_data import write_alpaca, write_mmlu, write_text


def trainer(root: Path, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root, **kwargs
    )


def lm_batch(path: str) -> dict[str, torch.Tensor]:
    ids = AutoTokenizer.from_pretrained(path)(
        ["the movie was good very good", "the plot was bad not fine awful"], return_tensors="pt", padding=True
    )
    return {**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_every_method_trains_a_decoder_lm(
    architecture: str, method_name: str, request: pytest.FixtureRequest
) -> None:
    """Identity at init, training, adapter round trip and merge, with peft's CAUSAL_LM wrapper, on
    GPT-2 and on a Llama model shaped like SmolLM2 (its q_proj/v_proj/o_proj/down_proj names)."""
    path = request.getfixturevalue(f"tiny_{architecture}_lm")
    build = lambda: CausalLMModule(path, METHODS[method_name](*BACKBONE_TARGETS[architecture]))  # noqa: E731
    torch.manual_seed(0)
    if (architecture, method_name) == ("llama", "bitfit"):  # Llama's linear layers and norms have no bias
        with pytest.raises(ValueError, match="no parameter named .*set method.init_args.bias_names"):
            build().configure_model()
        return
    module = build()
    module.configure_model()
    batch = lm_batch(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(**batch).logits, base(**batch).logits, atol=1e-5, rtol=1e-4)
    module.train()
    optimizer = torch.optim.SGD([p for _, p in module.trainable_parameters()], lr=0.5)
    for step in range(3):
        module(**batch).loss.backward()
        optimizer.step()
        module.method.on_optimizer_step(module.model, step)
        optimizer.zero_grad()
    with torch.no_grad():
        trained = module.eval()(**batch).logits
        assert not torch.allclose(trained, base(**batch).logits)
        restored = build()
        restored.configure_model()
        restored.method.load_adapter_state_dict(
            restored.model, module.method.adapter_state_dict(module.model)
        )
        torch.testing.assert_close(restored.eval()(**batch).logits, trained, atol=1e-5, rtol=1e-4)
        if module.method.mergeable:
            torch.testing.assert_close(
                module.merged_model().eval()(**batch).logits, trained, atol=1e-4, rtol=1e-4
            )


def test_validation_perplexity_is_exp_of_the_mean_token_nll(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    folder = write_text(tmp_path / "text", {"train.txt": 20, "valid.txt": 15})
    data = LanguageModelingDataModule(tiny_gpt2_lm, data_dir=str(folder), block_size=16, batch_size=3)
    result = trainer(tmp_path).validate(CausalLMModule(tiny_gpt2_lm, FullFineTuning()), data)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm).eval()
    ids = torch.tensor(data.splits["validation"]["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result["val/perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert result["val/loss"] == pytest.approx(nll.item(), rel=1e-4)  # equal-length blocks


def test_mmlu_accuracy_is_the_most_likely_answer_letter(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    data = MMLUDataModule(tiny_gpt2_lm, data_dir=str(write_mmlu(tmp_path / "mmlu", per_subject=8)), shots=1)
    module = CausalLMModule(tiny_gpt2_lm, FullFineTuning())
    result = trainer(tmp_path).test(module, data)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm).eval()
    hits: dict[int, list[bool]] = {}
    for example in data.splits["test"]:
        with torch.no_grad():
            last = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, -1]
        choice = int(last[example["choice_ids"]].argmax())
        hits.setdefault(example["subject"], []).append(choice == example["answer"])
    per_subject = {data.subjects[s]: sum(h) / len(h) for s, h in hits.items()}
    assert result["test/accuracy"] == pytest.approx(sum(sum(h) for h in hits.values()) / 24)
    assert result["test/subject_average"] == pytest.approx(sum(per_subject.values()) / 3)
    for subject, accuracy in per_subject.items():
        assert result[f"test/subject/{subject}"] == pytest.approx(accuracy)


def test_instruction_fit_resume_and_export(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    data = InstructionDataModule(
        tiny_gpt2_lm, data_files={"train": str(write_alpaca(tmp_path / "a.json", 24))}, validation_size=4
    )
    module = CausalLMModule(
        tiny_gpt2_lm, LoRA(target_modules=["c_attn"], r=4, dropout=0.0), learning_rate=1e-2
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit = trainer(tmp_path, max_epochs=2, callbacks=[checkpoint])
    fit.fit(module, data)
    before = fit.validate(module, data)[0]
    assert set(torch.load(checkpoint.last_model_path, weights_only=False)["adapter_state_dict"]) == {
        n for n, _ in module.trainable_parameters()
    }
    fresh = CausalLMModule(tiny_gpt2_lm, LoRA(target_modules=["c_attn"], r=4, dropout=0.0))
    after = trainer(tmp_path).validate(fresh, data, ckpt_path=checkpoint.last_model_path)[0]
    assert after["val/perplexity"] == pytest.approx(before["val/perplexity"], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(module.export(tmp_path / "merged")).eval()
    batch = lm_batch(tiny_gpt2_lm)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, module.eval()(**batch).logits, atol=1e-4, rtol=1e-4
        )


def test_probe_step_scores_the_true_token_probability(tiny_gpt2_lm: str) -> None:
    module = CausalLMModule(tiny_gpt2_lm, FullFineTuning())
    module.configure_model()
    batch = lm_batch(tiny_gpt2_lm)
    loss, score = module.eval().probe_step(batch)
    with torch.no_grad():
        logits = module(**batch).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    probabilities = logits.softmax(-1)[scored].gather(-1, labels[scored][:, None])
    assert score == pytest.approx(probabilities.mean().item())
    assert loss.item() == pytest.approx(F.cross_entropy(logits[scored], labels[scored]).item(), rel=1e-5)


def test_a_batch_longer_than_the_model_is_refused(tiny_gpt2_lm: str) -> None:
    module = CausalLMModule(tiny_gpt2_lm, FullFineTuning())
    module.configure_model()
    with pytest.raises(
        ValueError, match=r"200 tokens exceeds the 128 positions.*lower data.init_args.max_length"
    ):
        module(input_ids=torch.zeros(1, 200, dtype=torch.long))
