"""The reproduction runner: a tiny grid runs, resumes without rerunning, and renders its report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from spec_lightning.analysis.report import cost_table, paired_differences, paired_table, summary
from spec_lightning.reproduce import Grid, main, read_rows
from tests.conftest import write_sst2

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_grid(tmp_path: Path, backbone: str) -> Path:
    """LoRA and BitFit on the tiny BERT, two seeds, and a 50 % few-shot variant of LoRA."""
    data = write_sst2(tmp_path / "sst2", n_train=64, n_dev=32)
    (tmp_path / "half.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"train_fraction": 0.5}}}))
    grid = {
        "name": "tiny",
        "tasks": ["sst2"],
        "seeds": [1, 2],
        "base_configs": [
            str(CONFIGS / "trainer" / "cpu.yaml"),
            str(CONFIGS / "model" / "minilm.yaml"),
            str(CONFIGS / "glue" / "{task}.yaml"),
        ],
        "methods": {
            "lora": str(CONFIGS / "method" / "lora.yaml"),
            "bitfit": [str(CONFIGS / "method" / "bitfit.yaml")],
        },
        "overrides": [
            f"--model.init_args.backbone={backbone}",
            f"--data.init_args.data_dir={data}",
            "--data.init_args.batch_size=16",
            "--trainer.log_every_n_steps=1",
        ],
        "method_overrides": {"lora": ["--model.init_args.method.init_args.r=2"]},
        "variants": {
            "fewshot50": {"overlays": [str(tmp_path / "half.yaml")], "methods": ["lora"], "tasks": ["sst2"]}
        },
        "logs": str(tmp_path / "logs"),
        "output": str(tmp_path / "reports"),
        "threads": 1,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_grid_runs_resumes_and_reports(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid_file = tiny_grid(tmp_path, tiny_bert)
    grid = Grid.load(grid_file)
    assert [r.name for r in grid.runs()] == ["lora-sst2"] * 2 + ["lora-sst2-fewshot50"] * 2 + [
        "bitfit-sst2"
    ] * 2
    main(["--grid", str(grid_file)])
    out = tmp_path / "reports" / "tiny"
    rows = pd.DataFrame(read_rows(out / "results.csv"))
    assert len(rows) == 6 and set(rows["seed"]) == {"1", "2"}
    lora = rows[(rows["method"] == "lora") & (rows["variant"] == "")]
    assert (lora["steps"].astype(int) == 4).all() and (
        rows[rows["variant"] == "fewshot50"]["steps"].astype(int) == 2
    ).all()
    assert (rows["trainable"].astype(int) < rows["total"].astype(int)).all()
    assert (rows["s_per_step"].astype(float) > 0).all()
    assert (rows["cpu_s"].astype(float) > 0).all()
    config = yaml.safe_load((Path(lora["run_dir"].iloc[0]) / "config.yaml").read_text())
    assert config["seed_everything"] == 1 and config["model"]["init_args"]["method"]["init_args"]["r"] == 2
    report = (out / "report.md").read_text()
    accuracy = lora["val/accuracy"].astype(float)
    assert f"{100 * accuracy.mean():.1f} ± {100 * accuracy.std(ddof=1):.1f}" in report
    assert "| sst2 | lora | fewshot50 | accuracy |" in report
    assert (out / "comparison.png").is_file() and (out / "fewshot.png").is_file()

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "run", no_run)
    main(["--grid", str(grid_file)])  # everything is finished: nothing runs, the report is rendered again
    assert len(read_rows(out / "results.csv")) == 6


def test_variant_seeds_and_the_seeds_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid_file = tiny_grid(tmp_path, "unused")
    raw = yaml.safe_load(grid_file.read_text())
    raw["variants"]["fewshot50"]["seeds"] = [1]
    grid_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    runs = [(r.name, r.seed) for r in Grid.load(grid_file).runs()]
    assert runs == [
        ("lora-sst2", 1),
        ("lora-sst2", 2),
        ("lora-sst2-fewshot50", 1),
        ("bitfit-sst2", 1),
        ("bitfit-sst2", 2),
    ]
    main(["--grid", str(grid_file), "--seeds", "7", "--dry_run"])
    printed = [
        (line.split("name=")[1].split()[0], line.split("--seed_everything=")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
    ]
    assert printed == [("lora-sst2", "7"), ("lora-sst2-fewshot50", "1"), ("bitfit-sst2", "7")]
    assert not (tmp_path / "reports").exists()


def test_grid_errors_name_the_problem(tmp_path: Path) -> None:
    base = {"name": "g", "tasks": ["sst2"], "methods": {"lora": str(CONFIGS / "method" / "lora.yaml")}}
    cases = [
        ({**base, "epochs": 3}, ValueError, r"unknown grid keys \['epochs'\]"),
        (
            {**base, "methods": {"lora": "configs/nope/{task}.yaml"}},
            FileNotFoundError,
            "configs/nope/sst2.yaml",
        ),
        (
            {**base, "method_overrides": {"dora": []}},
            ValueError,
            r"methods \['dora'\] the grid does not define",
        ),
        (
            {**base, "variants": {"v": {"overlays": [], "methods": ["full"], "tasks": ["sst2"]}}},
            ValueError,
            r"variant 'v' names methods \['full'\]",
        ),
    ]
    for i, (grid, error, message) in enumerate(cases):
        path = tmp_path / f"grid{i}.yaml"
        path.write_text(json.dumps(grid))
        with pytest.raises(error, match=message):
            Grid.load(path)


#: The methods of the shipped grids and their number of tasks.
CORE = {"full", "bitfit", "lora", "dora", "pissa", "lorsa", "speclora", "graph_spectral", "mftc"}
RELATIVES = {"olora", "corda", "eva", "rslora", "vera", "fourierft", "oft", "loha"}
SHIPPED_GRIDS = {
    "glue": (CORE, 3),
    "glue_small": (CORE | RELATIVES, 3),
    "defaults": ({"lora", "full", "lorsa", "speclora"}, 3),
    "peft_relatives": (RELATIVES | {"lora"}, 1),
}


@pytest.mark.parametrize("grid", sorted((CONFIGS / "reproduce").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_grids_load(grid: Path) -> None:
    runs = Grid.load(grid).runs()
    methods, tasks = SHIPPED_GRIDS[grid.stem]
    assert {r.method for r in runs} == methods
    assert len({(r.task, r.method) for r in runs}) == len(methods) * tasks


def test_cost_table_gives_the_trainable_range_where_seeds_differ() -> None:
    runs = pd.DataFrame(
        {
            "task": ["rte"] * 4,
            "method": ["mftc", "mftc", "lora", "lora"],
            "variant": [""] * 4,
            "seed": [1, 2, 1, 2],
            "trainable": [770, 602_882, 74_498, 74_498],
            "total": [22_713_986] * 4,
            "wall_s": [10.0, 30.0, 5.0, 7.0],
            "cpu_s": [20.0, 60.0, 9.0, 11.0],
            "s_per_step": [0.5, 1.5, 0.2, 0.4],
            "val/accuracy": [0.5, 0.6, 0.7, 0.8],
        }
    )
    table = cost_table(summary(runs))
    assert "| rte | mftc |  | 770–602,882 | 20 | 40 | 1.000 | 2 |" in table
    assert "| rte | lora |  | 74,498 | 6 | 10 | 0.300 | 2 |" in table


def test_paired_differences_to_lora_match_scipys_paired_t_interval() -> None:
    """Differences on shared seeds only (seed 4 has no lora run), the interval of scipy's paired t-test
    (an independent reference), none for a single pair, variants left out."""
    rng = np.random.default_rng(0)
    rows = [("sst2", "lorsa", "fewshot20", 1, 0.1)]  # a variant, listed first: not paired
    for seed in (1, 2, 3, 4):
        for method, shift in (("lora", 0.0), ("lorsa", 0.02), ("full", -0.01)):
            if method == "lora" and seed == 4:
                continue
            rows.append(("sst2", method, "", seed, 0.8 + shift + rng.normal(0, 0.01)))
    rows += [("rte", "lora", "", 1, 0.6), ("rte", "lorsa", "", 1, 0.65)]
    runs = pd.DataFrame(rows, columns=["task", "method", "variant", "seed", "val/accuracy"])
    table = paired_differences(runs).set_index(["task", "method"])
    values = runs[runs["variant"] == ""].pivot_table(
        index=["task", "seed"], columns="method", values="val/accuracy"
    )
    sst2 = values.loc["sst2"].dropna()
    for method in ("lorsa", "full"):
        test = scipy.stats.ttest_rel(sst2[method], sst2["lora"])
        low, high = test.confidence_interval(0.95)
        r = table.loc[("sst2", method)]
        assert r["pairs"] == 3
        assert r["difference"] == pytest.approx((sst2[method] - sst2["lora"]).mean(), abs=1e-12)
        assert (r["low"], r["high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    single = table.loc[("rte", "lorsa")]
    assert single["pairs"] == 1 and single["difference"] == pytest.approx(0.05) and np.isnan(single["low"])
    text = paired_table(paired_differences(runs), "lora")
    assert "| lorsa | " in text and "+5.0, 1" in text
