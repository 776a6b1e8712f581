"""PeftTuner: any peft config from YAML, with the method contract, on a tiny BERT."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig, EvaConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spec_lightning import PeftTuner, SequenceClassificationModule, load_adapter
from spec_lightning.io.adapters import build_method
from spec_lightning.methods.base import describe

SENTENCES = ["the movie was good", "the plot was very bad not fine", "awful", "great fine movie very good"]
QV = ["query", "value"]

#: Tiny versions of the shipped relatives (configs/method/*.yaml), on query/value of a 32-wide BERT.
CONFIGS: dict[str, Callable[[], peft.PeftConfig]] = {
    "olora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="olora"),
    "corda": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=QV, init_lora_weights="corda", corda_config=CordaConfig()
    ),
    "eva": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=QV,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=1.0, use_label_mask=False),
    ),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_rslora=True),
    "vera": lambda: peft.VeraConfig(r=16, target_modules=QV),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=32, target_modules=QV),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=6, target_r=4, target_modules=QV, total_step=20, tinit=2, tfinal=2, deltaT=1
    ),
}
#: Tuners whose initial adapter is not a zero update (peft's FourierFT draws its spectrum at random).
NOT_IDENTITY_AT_INIT = {"fourierft"}


def inputs(path: str) -> dict[str, torch.Tensor]:
    enc = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([1, 0, 0, 1])}


def calibration(path: str) -> list[dict[str, torch.Tensor]]:
    """Twelve batches of the four sentences: 200 tokens, above the 32 dimensions of CorDA's covariance."""
    return [inputs(path) for _ in range(12)]


def base_model(path: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def tuned(path: str, name: str, with_data: bool = True) -> tuple[PeftTuner, torch.nn.Module]:
    method = PeftTuner(CONFIGS[name]())
    data = calibration(path) if with_data and method.calibration_sample(lambda: []) is not None else None
    extra = {} if data is None else {"calibration": data}
    return method, method.apply(base_model(path), head=["classifier"], **extra)


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch).logits


def train(method: PeftTuner, model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 4) -> None:
    model.train()
    opt = torch.optim.SGD([p for _, p in method.trainable_parameters(model)], lr=0.5)
    for step in range(steps):
        model(**batch).loss.backward()
        opt.step()
        method.on_optimizer_step(model, step)
        opt.zero_grad()


@torch.no_grad()
def perturb(method: PeftTuner, model: torch.nn.Module) -> None:
    """Seeded noise on every trainable tensor, so that the adapter's effect is far above the tolerances."""
    generator = torch.Generator().manual_seed(7)
    for _, p in method.trainable_parameters(model):
        p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))


@pytest.fixture(params=sorted(CONFIGS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_identity_at_init_and_only_the_adapter_trains(tiny_bert: str, name: str) -> None:
    method, model = tuned(tiny_bert, name)
    batch = inputs(tiny_bert)
    start = logits(model, batch)
    reference = logits(base_model(tiny_bert), batch)  # the same seeded head
    if name in NOT_IDENTITY_AT_INIT:
        assert not torch.allclose(start, reference, atol=1e-4)
    else:
        torch.testing.assert_close(start, reference, atol=1e-5, rtol=1e-4)
    trainable = {n for n, _ in method.trainable_parameters(model)}
    assert any("classifier" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    train(method, model, batch)
    assert not torch.allclose(logits(model, batch), start, atol=1e-4), "training changed nothing"
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"


def test_state_loads_into_a_model_rebuilt_without_calibration_data(tiny_bert: str, name: str) -> None:
    """The resume path: configure_model outside a fit builds the structure only (no CorDA/EVA data); the
    adapter state (with CorDA's residual weights and initial adapter) makes it the trained model."""
    method, model = tuned(tiny_bert, name)
    batch = inputs(tiny_bert)
    train(method, model, batch)
    perturb(method, model)
    state = method.adapter_state_dict(model)
    rebuilt_method, rebuilt = tuned(tiny_bert, name, with_data=False)
    rebuilt_method.load_adapter_state_dict(rebuilt, state)
    torch.testing.assert_close(logits(rebuilt, batch), logits(model, batch), atol=1e-5, rtol=1e-4)


def test_export_rebuilds_on_a_bare_base_merged_or_not(tiny_bert: str, name: str, tmp_path: Path) -> None:
    """peft's own folder (a residual initialisation converted to plain LoRA of rank 2r on the original
    weights) turns a freshly loaded base into the trained model; merged where peft merges."""
    method, model = tuned(tiny_bert, name)
    batch = inputs(tiny_bert)
    train(method, model, batch)
    perturb(method, model)
    if name == "adalora":  # a step: its hook zeroes again the pruned ranks that the noise moved
        train(method, model, batch, steps=1)
    expected = logits(model, batch)
    method.export_adapter(model, tmp_path / "adapter", head=["classifier"], base_model=tiny_bert)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if name in ("olora", "corda"):
        assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r, plain LoRA
    rebuilt = load_adapter(base_model(tiny_bert, seed=123), tmp_path / "adapter")
    if name == "adalora":  # peft's AdaLoRA loaded for inference fails on labels (spec_lightning.AdaLoRA not)
        batch = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(logits(rebuilt, batch), expected, atol=1e-5, rtol=1e-4)
    merged = load_adapter(base_model(tiny_bert, seed=123), tmp_path / "adapter", merge=True)
    assert not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-4, rtol=1e-3)


def test_description_rebuilds_the_same_config(name: str) -> None:
    method = PeftTuner(CONFIGS[name]())
    description = json.loads(json.dumps(describe(method)))
    assert description["init_args"]["config"]["class_path"].startswith("peft.")
    assert build_method(description).config == method.config


def test_per_step_update_reallocates_adalora_ranks(tiny_bert: str) -> None:
    """peft's AdaLoRA prunes to target_r after tinit and before tfinal: the rank pattern appears only
    through on_optimizer_step's update_and_allocate."""
    method, model = tuned(tiny_bert, "adalora")
    assert model.peft_config["default"].rank_pattern is None
    train(method, model, inputs(tiny_bert), steps=19)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None
    assert sum(sum(mask) for mask in pattern.values()) == 4 * len(pattern)  # the average rank target_r


def test_trainable_counts_match_a_hand_count(tiny_bert: str) -> None:
    """Per 32 x 32 query/value matrix (four in all) plus the classifier 32·2 + 2 = 66: VeRA r + out
    (16 + 32), FourierFT n_frequency (32), OFT in/b blocks of b(b−1)/2 (4 · 28), LoHa 2r(in + out)
    (2 · 2 · 64), rsLoRA r(in + out) (4 · 64)."""
    hand = {"vera": 16 + 32, "fourierft": 32, "oft": 4 * 28, "loha": 2 * 2 * 64, "rslora": 4 * 64}
    for name, per_matrix in hand.items():
        method, model = tuned(tiny_bert, name)
        count = sum(p.numel() for _, p in method.trainable_parameters(model))
        assert count == 4 * per_matrix + 66, name


def test_a_prompt_tuner_trains_and_refuses_to_merge(tiny_bert: str) -> None:
    method = PeftTuner(peft.PromptTuningConfig(num_virtual_tokens=4))
    model = method.apply(base_model(tiny_bert), head=["classifier"])
    train(method, model, inputs(tiny_bert), steps=1)
    assert not method.mergeable and not method.supports_fsdp
    with pytest.raises(NotImplementedError, match="prompt-learning tuner.*cannot be merged"):
        method.merge(model)


def test_bad_configs_name_the_fix(tiny_bert: str) -> None:
    with pytest.raises(ValueError, match="'qury' matches no module.*query"):
        PeftTuner(peft.LoraConfig(target_modules=["qury"])).apply(base_model(tiny_bert))
    with pytest.raises(ValueError, match="rho: 1.0"):
        PeftTuner(peft.LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)))
    with pytest.raises(TypeError, match="must be a peft config"):
        PeftTuner({"r": 8})  # type: ignore[arg-type]


@pytest.mark.parametrize("wrapped", [False, True], ids=["alone", "in_graph_spectral"])
def test_a_fit_initialises_corda_from_the_datamodule(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, wrapped: bool, recwarn: pytest.WarningsRecorder
) -> None:
    """SequenceClassificationModule hands a seeded sample of the datamodule's training set to CorDA's
    covariance pass before the optimiser exists, through GraphSpectral too; the fit then trains from
    W_res + s B₀A₀ = W."""
    import lightning as L

    from spec_lightning import GLUEDataModule, GraphSpectral

    method = PeftTuner(CONFIGS["corda"](), calibration_samples=64)
    if wrapped:
        method = GraphSpectral(method, spectral_weight=0.1)
    module = SequenceClassificationModule(tiny_bert, method, num_labels=2)
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module, data)
    initial = module.model.initial_adapter
    assert initial and all(t.abs().sum() > 0 for t in initial.values())  # CorDA's factors, not zeros
    assert not [w for w in recwarn if "was not applied" in str(w.message)]


def test_training_a_skipped_data_initialisation_warns_unless_a_state_is_loaded(tiny_bert: str) -> None:
    batch = inputs(tiny_bert)
    method, model = tuned(tiny_bert, "eva", with_data=False)
    with pytest.warns(UserWarning, match="init_lora_weights='eva' was not applied.*calibration="):
        train(method, model, batch, steps=1)
    trained_method, trained = tuned(tiny_bert, "eva")
    method, model = tuned(tiny_bert, "eva", with_data=False)
    method.load_adapter_state_dict(model, trained_method.adapter_state_dict(trained))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.train()(**batch).loss.backward()


#: Overrides that fit the shipped configs to the tiny BERT (32 x 32 matrices, 96 training sentences).
TINY = {
    "fourierft": ["--model.init_args.method.init_args.config.init_args.n_frequency=64"],
    "corda": ["--model.init_args.method.init_args.calibration_samples=32"],
    "eva": ["--model.init_args.method.init_args.calibration_samples=32"],
}


@pytest.mark.parametrize("config", ["olora", "corda", "eva", "rslora", "vera", "fourierft", "oft", "loha"])
def test_the_shipped_relative_configs_fit_from_the_cli(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, config: str
) -> None:
    from spec_lightning.cli import build_cli
    from tests.conftest import composed_args

    cli = build_cli(
        [
            "fit",
            *composed_args(tiny_bert, sst2_dir, config),
            *TINY.get(config, []),
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model.method, PeftTuner) and isinstance(cli.model.model, peft.PeftModel)
    saved = (Path(cli.trainer.log_dir) / "config.yaml").read_text()
    assert "class_path: peft." in saved
