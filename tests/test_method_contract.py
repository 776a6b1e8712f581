"""The contract every fine-tuning method keeps, checked on tiny BERT and GPT-2 models."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spec_lightning import GLUEDataModule, SequenceClassificationModule, load_adapter
from spec_lightning.io.adapters import adapter_description
from tests.conftest import BACKBONE_TARGETS, METHODS

#: Tiny models fitted a few steps answer one class; the warning that says so is asserted in
#: tests/test_regression.py, and is expected, not checked, here.
pytestmark = pytest.mark.filterwarnings("ignore:the run ended predicting:UserWarning")

SENTENCES = ["the movie was good", "the plot was very bad not fine", "awful"]


@pytest.fixture(params=["bert", "gpt2"])  # sequence classifiers; the Llama contract is in test_causal_lm
def backbone(request: pytest.FixtureRequest, tiny_bert: str, tiny_gpt2: str) -> tuple[str, str]:
    return request.param, {"bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


@pytest.fixture(params=sorted(METHODS))
def method_name(request: pytest.FixtureRequest) -> str:
    return request.param


def build(backbone: tuple[str, str], method_name: str) -> SequenceClassificationModule:
    kind, path = backbone
    torch.manual_seed(0)
    module = SequenceClassificationModule(path, METHODS[method_name](*BACKBONE_TARGETS[kind]), num_labels=2)
    module.configure_model()
    return module


def batch(path: str) -> dict[str, torch.Tensor]:
    enc = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([1, 0, 0])}


def base_logits(
    path: str, module: SequenceClassificationModule, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The pretrained model with the adapted model's (randomly initialised) head copied in."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return base(**inputs).logits


def train_steps(
    module: SequenceClassificationModule, inputs: dict[str, torch.Tensor], steps: int = 3
) -> None:
    module.train()
    opt = torch.optim.SGD([p for _, p in module.trainable_parameters()], lr=0.5)
    for step in range(steps):
        module(**inputs).loss.backward()
        opt.step()
        module.method.on_optimizer_step(module.model, step)
        opt.zero_grad()
    module.eval()


@torch.no_grad()
def perturb_trainable(module: SequenceClassificationModule, inputs: dict[str, torch.Tensor]) -> None:
    """Add seeded noise to every trainable tensor, so that the adapter's own effect on the output is far
    above the comparison tolerances (a few SGD steps move some adapters, LoRSA's p and q on BERT, by
    less than 1e-5, where a sign error in their forward path would hide)."""
    before = logits(module, inputs)
    generator = torch.Generator().manual_seed(7)
    for _, p in module.trainable_parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))
    assert (logits(module, inputs) - before).abs().max() > 1e-2


@torch.no_grad()
def logits(module: SequenceClassificationModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return module.eval()(**inputs).logits


def test_identity_at_init_and_shape(backbone: tuple[str, str], method_name: str) -> None:
    module = build(backbone, method_name)
    inputs = batch(backbone[1])
    out = logits(module, inputs)
    torch.testing.assert_close(out, base_logits(backbone[1], module, inputs), atol=1e-5, rtol=1e-4)


def test_only_method_parameters_train(backbone: tuple[str, str], method_name: str) -> None:
    module = build(backbone, method_name)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainable = {n for n, _ in module.trainable_parameters()}
    train_steps(module, batch(backbone[1]))
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"


def test_adapter_state_round_trips(backbone: tuple[str, str], method_name: str) -> None:
    module = build(backbone, method_name)
    inputs = batch(backbone[1])
    train_steps(module, inputs)
    perturb_trainable(module, inputs)
    state = module.method.adapter_state_dict(module.model)
    fresh = build(backbone, method_name)
    assert not torch.allclose(logits(fresh, inputs), logits(module, inputs))
    fresh.method.load_adapter_state_dict(fresh.model, state)
    torch.testing.assert_close(logits(fresh, inputs), logits(module, inputs))


def test_merged_equals_unmerged(backbone: tuple[str, str], method_name: str) -> None:
    module = build(backbone, method_name)
    inputs = batch(backbone[1])
    train_steps(module, inputs)
    perturb_trainable(module, inputs)
    if not module.method.mergeable:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            module.merged_model()
        return
    merged = module.merged_model().eval()
    assert not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(merged(**inputs).logits, logits(module, inputs), atol=1e-5, rtol=1e-4)


def test_an_exported_adapter_rebuilds_the_model_on_a_bare_base(
    backbone: tuple[str, str], method_name: str, tmp_path: Path
) -> None:
    """peft's PeftModel.from_pretrained feel for every method: the folder alone (method, arguments, head
    names, base model) turns a freshly loaded base model into the fine-tuned one, merged or not."""
    module = build(backbone, method_name)
    inputs = batch(backbone[1])
    train_steps(module, inputs)
    perturb_trainable(module, inputs)
    if method_name == "adalora":  # a step: its hook zeroes again the pruned ranks that the noise moved
        train_steps(module, inputs, steps=1)
    folder = module.export(tmp_path / "adapter", adapter_only=True)
    expected = logits(module, inputs)

    def base() -> torch.nn.Module:
        torch.manual_seed(123)  # another head initialisation than the trained module's
        model = AutoModelForSequenceClassification.from_pretrained(backbone[1], num_labels=2)
        if model.config.pad_token_id is None:  # GPT-2, as SequenceClassificationModule sets it
            model.config.pad_token_id = model.config.eos_token_id
        return model

    assert not torch.allclose(base().eval()(**inputs).logits, expected, atol=1e-3)
    rebuilt = load_adapter(base(), folder).eval()
    torch.testing.assert_close(rebuilt(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
    if module.method.mergeable:
        merged = load_adapter(base(), folder, merge=True).eval()
        assert not isinstance(merged, peft.PeftModel)
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
    description = adapter_description(folder)
    assert description is not None and description["head"] == ["classifier", "score"]
    assert description["base_model_name_or_path"] == backbone[1]


def test_fast_dev_run(backbone: tuple[str, str], method_name: str, sst2_dir: str) -> None:
    module = SequenceClassificationModule(backbone[1], METHODS[method_name](*BACKBONE_TARGETS[backbone[0]]))
    data = GLUEDataModule("sst2", tokenizer=backbone[1], data_dir=sst2_dir, batch_size=8)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, data)
    assert trainer.state.finished


#: Trainable counts on the tiny BERT (2 layers, hidden 32, query and value targeted, 2 labels), by hand:
#: the classifier 32·2 + 2 = 66; LoRA/PiSSA r (in + out) = 4·64 per matrix; DoRA adds a magnitude of
#: 32 per matrix; AdaLoRA (init_r 6) has A (6 x 32), B (32 x 6) and E (6) per matrix.
HAND_COUNTS = {"lora": 4 * 4 * 64 + 66, "pissa": 4 * 4 * 64 + 66, "dora": 4 * (4 * 64 + 32) + 66}
HAND_COUNTS["adalora"] = 4 * (6 * 32 + 32 * 6 + 6) + 66


@pytest.mark.parametrize("method_name", sorted(HAND_COUNTS))
def test_peft_trainable_count_matches_a_hand_count(tiny_bert: str, method_name: str) -> None:
    module = build(("bert", tiny_bert), method_name)
    assert sum(p.numel() for _, p in module.trainable_parameters()) == HAND_COUNTS[method_name]


def test_adalora_orthogonal_regulariser_is_in_the_loss(tiny_bert: str) -> None:
    module = build(("bert", tiny_bert), "adalora")
    inputs = batch(tiny_bert)
    with torch.no_grad():
        out = module.eval()(**inputs)
    ce = torch.nn.functional.cross_entropy(out.logits, inputs["labels"])
    assert out.loss > ce + 1e-4  # peft adds orth_reg_weight * ||PᵀP − I||² + ||QQᵀ − I||²
    copy.deepcopy(module)  # the module stays copyable (merge works on a copy)


def test_adalora_penalty_counts_once_with_labels_or_logits(tiny_bert: str) -> None:
    """peft adds w·R to outputs.loss when the model computes a loss; a module that computes its loss from
    the logits used to lose R. The penalty is checked against peft's own addition (loss with labels
    minus the cross-entropy of the same logits), and regularization() returns it exactly when peft
    did not add it."""
    from torch.nn import functional as F

    from spec_lightning.methods import AdaLoRA
    from spec_lightning.methods.peft_baselines.method import orthogonality_penalty

    torch.manual_seed(0)
    method = AdaLoRA(target_modules=["query", "value"], init_r=4, target_r=2, orth_reg_weight=0.3)
    model = method.apply(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), head=["classifier"]
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))  # away from orthogonal
    inputs = batch(tiny_bert)
    model.eval()
    out = model(**inputs)
    added = out.loss - F.cross_entropy(out.logits, inputs["labels"])
    penalty = orthogonality_penalty(model)
    assert float(penalty.detach()) > 0.1
    torch.testing.assert_close(added, 0.3 * penalty)
    assert method.regularization(model) is None  # peft added it
    model(**{k: v for k, v in inputs.items() if k != "labels"})
    term = method.regularization(model)
    assert term is not None and term.name == "orth_reg" and term.weight == 0.3
    torch.testing.assert_close(term.value, penalty)
