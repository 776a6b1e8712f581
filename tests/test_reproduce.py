"""The reproduction runner: a tiny grid runs, resumes without rerunning, and renders its report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from spec_lightning.analysis.paired import paired_differences
from spec_lightning.analysis.report import (
    comparison_table,
    cost_table,
    paired_table,
    summary,
    sweep_table,
    write_report,
)
from spec_lightning.analysis.statistics import paired_bootstrap, t_interval
from spec_lightning.experiments.grid import Grid, Run
from spec_lightning.experiments.records import read_rows
from spec_lightning.experiments.reproduce import main
from spec_lightning.experiments.sweep import Sweep
from tests.conftest import write_sst2

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_grid(tmp_path: Path, backbone: str, sweep: bool = False) -> Path:
    """LoRA and BitFit on the tiny BERT, two seeds, and a 50 % few-shot variant of LoRA; with ``sweep``,
    every run holds 16 training examples out and LoRA's learning rate is first tuned on them (two
    candidates, seed 1)."""
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
        "keep_checkpoints": not sweep,
    }
    if sweep:
        grid["sweep"] = {
            "argument": "model.init_args.learning_rate",
            "values": {"lora": [0.01, 0.03]},
            "overrides": ["--data.init_args.validate_on=tuning"],
            "seeds": [1],
            "extend": 1,
        }
        grid["overrides"].append("--data.init_args.tuning_size=16")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_grid_runs_resumes_and_reports(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid_file = tiny_grid(tmp_path, tiny_bert, sweep=True)
    grid = Grid.load(grid_file)
    assert [r.name for r in grid.runs()] == ["lora-sst2-tune_0.01", "lora-sst2-tune_0.03"] + [
        "lora-sst2"
    ] * 2 + ["lora-sst2-fewshot50"] * 2 + ["bitfit-sst2"] * 2
    stale = tmp_path / "logs" / "lora-sst2" / "seed1" / "events.out.tfevents.0.interrupted"
    stale.parent.mkdir(parents=True)
    stale.write_text("")  # an attempt killed before its row was written
    main(["--grid", str(grid_file)])
    assert not stale.exists()
    out = tmp_path / "reports" / "tiny"
    rows = pd.DataFrame(read_rows(out / "results.csv"))
    sweep = pd.DataFrame(read_rows(out / "sweep.csv"))
    # The sweep validated on the 16 held-out training sentences (with one more candidate beyond the edge
    # when an edge won alone); the chosen rate is its best (the first on a tie), and every LoRA run, the
    # variant's too, trained with it.
    scores = sweep["val/accuracy"].astype(float).to_numpy()
    edge_won = list(scores[:2]).count(scores[:2].max()) == 1
    assert list(sweep["tuned"])[:2] == ["0.01", "0.03"] and len(sweep) == 2 + edge_won
    assert list(sweep["tuned"])[2:] in ([], ["0.09"], ["0.00333"]) and set(sweep["steps"].astype(int)) == {3}
    tuning = np.load(Path(sweep["run_dir"].iloc[0]) / "predictions.npz")["labels"]
    assert len(tuning) == 16
    chosen = sweep["tuned"].iloc[int(np.argmax(sweep["val/accuracy"].astype(float).to_numpy()))]
    lora_rows = rows[rows["method"] == "lora"]
    assert set(lora_rows["tuned"]) == {chosen} and set(rows[rows["method"] == "bitfit"]["tuned"]) == {""}
    for run_dir in lora_rows["run_dir"]:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        assert config["model"]["init_args"]["learning_rate"] == float(chosen)
    # Each run's dev predictions are kept beside the CSV, and the majority share comes from their labels.
    dev = pd.read_csv(tmp_path / "sst2" / "dev.tsv", sep="\t")
    saved = np.load(out / "predictions" / "lora-sst2-seed1.npz")
    np.testing.assert_array_equal(saved["labels"], dev["label"].to_numpy())
    majority = dev["label"].value_counts().max() / len(dev)
    assert rows["majority"].astype(float).to_numpy() == pytest.approx(majority)
    assert float(lora_rows["val/accuracy"].iloc[0]) == pytest.approx(
        (saved["predictions"] == saved["labels"]).mean()
    )
    assert len(rows) == 6 and set(rows["seed"]) == {"1", "2"}
    lora = rows[(rows["method"] == "lora") & (rows["variant"] == "")]
    assert (lora["steps"].astype(int) == 3).all() and (  # 64 − 16 held out, in batches of 16
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
    assert "| sst2 | lora | " in report and f"**{chosen}: " in report and f"| {chosen} |" in report
    assert "bootstrap over dev examples" in report and "logs are not on this machine" not in report
    assert (out / "comparison.png").is_file() and (out / "fewshot.png").is_file()

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "run", no_run)
    assert not list((tmp_path / "logs").glob("*/*/checkpoints"))  # keep_checkpoints: false
    # On another machine the committed CSVs are the record: without the logs nothing runs again.
    shutil.rmtree(tmp_path / "logs")
    main(["--grid", str(grid_file)])
    assert len(read_rows(out / "results.csv")) == 6 and len(read_rows(out / "sweep.csv")) == 2
    assert "6 of the 6 runs' TensorBoard logs are not on this machine" in (out / "report.md").read_text()


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
        ({**base, "baselines": ["lora", "full"]}, ValueError, r"baselines names methods \['full'\]"),
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
        (
            {**base, "sweep": {"argument": "a", "values": {"lora": [1]}, "overrides": ["--x=1"]}},
            ValueError,
            "do not validate on the tuning split, so it would choose on the reported split",
        ),
        (
            {
                **base,
                "sweep": {"argument": "a", "values": {"dora": [1]}, "overrides": ["--d.validate_on=tuning"]},
            },
            ValueError,
            r"sweep names methods \['dora'\]",
        ),
        (
            {
                **base,
                "sweep": {"argument": "a", "values": {"lora": []}, "overrides": ["--d.validate_on=tuning"]},
            },
            ValueError,
            r"sweep lists no candidate values for \['lora'\]",
        ),
        (
            {
                **base,
                "sweep": {
                    "argument": "a",
                    "values": {"lora": ["adamw", "sgd"]},
                    "overrides": ["--d.validate_on=tuning"],
                    "extend": 1,
                },
            },
            ValueError,
            r"sweep.extend needs numeric candidates; \['lora'\] list others",
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
    "cpu_glue": (CORE | {"adalora", "houlsby"}, 3),
    "cpu_lm": ({"lora", "dora", "pissa", "lorsa", "speclora"}, 1),
    "converged": ({"lora", "full", "dora", "pissa", "lorsa", "speclora", "graph_spectral", "mftc"}, 2),
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
    assert "| rte | mftc |  | 770–602,882 | 20 | 40 | 1.000 | – | – | 2 |" in table
    assert "| rte | lora |  | 74,498 | 6 | 10 | 0.300 | – | – | 2 |" in table
    full = runs[runs["method"] == "lora"].assign(method="full", s_per_step=[2.0, 2.0], load_1m=[1.0, 3.5])
    table = cost_table(summary(pd.concat([runs, full])))
    assert "| rte | mftc |  | 770–602,882 | 20 | 40 | 1.000 | 0.50 | – | 2 |" in table
    assert "| rte | full |  | 74,498 | 6 | 10 | 2.000 | 1.00 | 3.5 | 2 |" in table


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


def test_cells_at_the_majority_class_are_marked_and_not_ranked() -> None:
    rows = []
    for seed in (1, 2, 3):
        rows += [
            ("sst2", "lora", seed, 0.80 + 0.01 * seed),
            ("sst2", "full", seed, 0.85),
            ("sst2", "bitfit", seed, 0.509 if seed < 3 else 0.45),  # never above the majority class
            ("mrpc", "lora", seed, 0.70),
            ("mrpc", "full", seed, 0.684 if seed < 3 else 0.69),  # one seed above it: it learned
            ("mrpc", "bitfit", seed, 0.75),
        ]
    runs = pd.DataFrame(rows, columns=["task", "method", "seed", "val/accuracy"])
    runs["variant"], runs["trainable"], runs["total"] = "", 10, 100
    runs["wall_s"] = runs["cpu_s"] = runs["s_per_step"] = 1.0
    runs["majority"] = runs["task"].map({"sst2": 0.509, "mrpc": 0.684})
    table = comparison_table(summary(runs))
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines()[2:]}
    # Seeds that all gave one value are one run's value: no sd, no zero-width interval.
    assert "| did not learn (48.9; majority 50.9) | 75.0, same with all 3 seeds #1 | – |" in lines["bitfit"]
    assert "| 85.0, same with all 3 seeds #1 | 68.6 ± 0.3 [67.7, 69.5] #3 | 76.8 |" in lines["full"]
    low, high = scipy.stats.ttest_1samp([0.81, 0.82, 0.83], 0).confidence_interval(0.95)
    assert (
        f"| 82.0 ± 1.0 [{100 * low:.1f}, {100 * high:.1f}] #2 | 70.0, same with all 3 seeds #2 |"
        in lines["lora"]
    )


def test_a_single_seed_is_shown_without_spread() -> None:
    """One seed has no sd and no interval, and is not "the same with all seeds"."""
    runs = pd.DataFrame(
        [("sst2", "lora", 1, 0.8), ("sst2", "lora", 2, 0.82), ("sst2", "dora", 1, 0.83)],
        columns=["task", "method", "seed", "val/accuracy"],
    )
    runs["variant"], runs["trainable"], runs["total"], runs["majority"] = "", 10, 100, 0.5
    runs["wall_s"] = runs["cpu_s"] = runs["s_per_step"] = 1.0
    lines = {
        line.split(" | ")[0].removeprefix("| "): line for line in comparison_table(summary(runs)).splitlines()
    }
    assert "| 83.0 #1 |" in lines["dora"]
    assert "| 81.0 ± 1.4 [" in lines["lora"] and "#2 |" in lines["lora"]


def test_trainable_share_is_shown_per_task_where_it_differs() -> None:
    """A selection that depends on the task (MFTC's) is shown per task, in the columns' order, with its
    mean over seeds; a share the same on every task is shown once; a task not run reads "–". The mean
    over tasks is given only for a method that ran every task (bitfit ran one of two: none)."""
    rows = []
    for seed, mftc_sst2 in ((1, 20), (2, 30)):
        rows += [
            ("sst2", "lora", seed, 0.8, 10, 1000),
            ("qqp", "lora", seed, 0.7, 10, 1000),
            ("sst2", "mftc", seed, 0.8, mftc_sst2, 1000),
            ("qqp", "mftc", seed, 0.8, 120, 1000),
            ("qqp", "bitfit", seed, 0.8, 3, 1000),
        ]
    runs = pd.DataFrame(rows, columns=["task", "method", "seed", "val/accuracy", "trainable", "total"])
    runs["variant"], runs["majority"] = "", 0.5
    runs["wall_s"] = runs["cpu_s"] = runs["s_per_step"] = 1.0
    lines = {
        line.split(" | ")[0].removeprefix("| "): line for line in comparison_table(summary(runs)).splitlines()
    }
    assert lines["lora"].startswith("| lora | 1.000 | ")
    assert lines["mftc"].startswith("| mftc | 2.500 / 12.000 | ")
    assert lines["bitfit"].startswith("| bitfit | 0.300 | ")
    assert lines["lora"].endswith(" | 75.0 |")
    assert lines["bitfit"].endswith(" | – |")


def test_paired_differences_bootstrap_over_the_saved_predictions(tmp_path: Path) -> None:
    """With every pair's predictions saved, the interval is the bootstrap of those examples; a method
    missing one seed's file falls back to the t-interval over seeds."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    rows = []
    for seed in (1, 2, 3):
        for method, flip in (("lora", 0.25), ("lorsa", 0.2), ("dora", 0.3)):
            predictions = np.where(rng.random(300) < flip, 1 - labels, labels)
            if not (method == "dora" and seed == 3):
                np.savez(tmp_path / f"{method}-sst2-seed{seed}.npz", predictions=predictions, labels=labels)
            rows.append(("sst2", method, "", seed, float((predictions == labels).mean())))
    runs = pd.DataFrame(rows, columns=["task", "method", "variant", "seed", "val/accuracy"])
    table = paired_differences(runs, predictions=tmp_path).set_index("method")
    examples = []
    for seed in (1, 2, 3):
        saved = {m: np.load(tmp_path / f"{m}-sst2-seed{seed}.npz") for m in ("lora", "lorsa")}
        examples.append([(s["predictions"] == s["labels"]).astype(float) for s in saved.values()])
    differences = np.array([lorsa - lora for lora, lorsa in examples])
    assert table.loc["lorsa", "interval"] == "bootstrap"
    assert (table.loc["lorsa", "low"], table.loc["lorsa", "high"]) == paired_bootstrap(differences)
    assert table.loc["lorsa", "difference"] == pytest.approx(differences.mean(), abs=1e-12)
    dora = (
        runs[runs["method"] == "dora"]["val/accuracy"].to_numpy()
        - runs[runs["method"] == "lora"]["val/accuracy"].to_numpy()
    )
    assert table.loc["dora", "interval"] == "t"
    assert table.loc["dora", "low"] == pytest.approx(t_interval(dora)[0], abs=1e-12)
    assert "(t), 3" in paired_table(paired_differences(runs, predictions=tmp_path), "lora")
    # A variant pairs with the baseline's runs of the same variant, from their own predictions.
    lora_wrong = (rng.random((3, 300)) < 0.4).astype(float)  # lora's few-shot runs: 40 % wrong
    for seed in (1, 2, 3):
        lora_few = np.where(lora_wrong[seed - 1] > 0, 1 - labels, labels)
        for method, predictions in (("lora", lora_few), ("lorsa", labels)):  # lorsa: all right
            np.savez(tmp_path / f"{method}-sst2-few-seed{seed}.npz", predictions=predictions, labels=labels)
            runs.loc[len(runs)] = ["sst2", method, "few", seed, float((predictions == labels).mean())]
    few = (
        paired_differences(runs, predictions=tmp_path).set_index(["variant", "method"]).loc[("few", "lorsa")]
    )
    assert few["interval"] == "bootstrap" and few["difference"] == pytest.approx(lora_wrong.mean(), abs=1e-12)
    assert (few["low"], few["high"]) == paired_bootstrap(lora_wrong.astype(float))
    assert "| sst2 − lora [95 % CI], pairs | sst2/few − lora [95 % CI], pairs |" in paired_table(
        paired_differences(runs, predictions=tmp_path), "lora"
    )


def test_the_tuning_table_marks_the_value_the_runs_used() -> None:
    """Bold is the rate the reported runs were given (read from results.csv, not chosen again from the
    scores); a method whose runs have not started is pending; scores are means over seeds, x100."""
    sweep = pd.DataFrame(
        {
            "task": ["sst2"] * 5,
            "method": ["lora", "lora", "lora", "bitfit", "bitfit"],
            "tuned": ["0.1", "0.1", "0.2", "0.1", "0.2"],
            "seed": [1, 2, 1, 1, 1],
            "val/accuracy": [0.7, 0.8, 0.9, 0.6, 0.5],
        }
    )
    runs = pd.DataFrame(
        {"task": ["sst2"], "method": ["lora"], "variant": [""], "tuned": [0.1], "val/accuracy": [0.8]}
    )
    table = sweep_table(sweep, runs)
    assert "| sst2 | lora | **0.1: 75.0**, 0.2: 90.0 | 0.1 |" in table
    assert "| sst2 | bitfit | 0.1: 60.0, 0.2: 50.0 | pending |" in table


def test_the_sweep_chooses_the_best_mean_over_its_seeds() -> None:
    """Highest mean accuracy (not the best single run), lowest perplexity, the first listed on a tie, and
    nothing until every candidate has run with every seed."""
    sweep = Sweep(argument="lr", values={"lora": [0.1, 0.2, 0.3]}, overrides=[], seeds=[1, 2])
    scores = {("0.1", 1): 0.90, ("0.1", 2): 0.50, ("0.2", 1): 0.80, ("0.2", 2): 0.75, ("0.3", 1): 0.6}
    rows = [
        {"task": "sst2", "method": "lora", "tuned": v, "seed": str(s), "val/accuracy": str(x)}
        for (v, s), x in scores.items()
    ]
    assert sweep.chosen(rows, "sst2", "lora") is None  # 0.3 has not run with seed 2
    rows.append({"task": "sst2", "method": "lora", "tuned": "0.3", "seed": "2", "val/accuracy": "0.6"})
    assert sweep.chosen(rows, "sst2", "lora") == "0.2"  # 0.775 > 0.70 > 0.60
    assert sweep.chosen(rows, "rte", "lora") is None
    tie = [{**r, "val/accuracy": "0.5"} for r in rows]
    assert sweep.chosen(tie, "sst2", "lora") == "0.1"
    lm = [
        {"task": "wikitext2", "method": "lora", "tuned": r["tuned"], "seed": r["seed"], "val/perplexity": x}
        for r in rows
        for x in [r["val/accuracy"]]
    ]
    assert sweep.chosen(lm, "wikitext2", "lora") == "0.3"  # 0.60 is the lowest perplexity


def test_readme_tables_are_regenerated_between_their_markers(tmp_path: Path) -> None:
    rows = [
        ("sst2", m, "", s, 0.8 + 0.01 * s + (0.02 if m == "lorsa" else 0.0))
        for m in ("lora", "lorsa")
        for s in (1, 2, 3)
    ]
    runs = pd.DataFrame(rows, columns=["task", "method", "variant", "seed", "val/accuracy"])
    runs["trainable"], runs["total"], runs["wall_s"], runs["cpu_s"], runs["s_per_step"] = 1, 10, 1.0, 1.0, 1.0
    runs["run_dir"] = str(tmp_path / "gone")
    table = tmp_path / "g" / "results.csv"
    table.parent.mkdir()
    runs.to_csv(table, index=False)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n\n<!-- report:g -->\nold table\n<!-- /report:g -->\n\nafter\n")
    write_report(table, "g", readme, baselines=["lora", "lorsa"])
    text = readme.read_text()
    assert "**Paired differences to lora.**" in text and "**Paired differences to lorsa.**" in text
    assert "| lora | -2.0 [-2.0, -2.0] (t), 3 |" in text
    assert text.startswith("# Title\n\nbefore\n\n<!-- report:g -->\n6 runs; generated from")
    assert text.endswith("\n<!-- /report:g -->\n\nafter\n") and "old table" not in text
    report = (table.parent / "report.md").read_text()
    for line in ("| lorsa | 10.000 | 84.0 ± 1.0", "| lorsa | +2.0 [+2.0, +2.0] (t), 3 |"):
        assert line in report and line in text
    write_report(table, "g", readme, baselines=["lora", "lorsa"])
    assert readme.read_text() == text  # regenerating changes nothing
    with pytest.raises(FileNotFoundError, match="results.csv does not exist: no reported run has finished"):
        write_report(tmp_path / "nothing" / "results.csv", "g")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one '<!-- report:g -->' line and, after it, one"):
        write_report(table, "g", readme)


def sweep_rows(scores: dict[str, float], task: str = "sst2") -> list[dict[str, str]]:
    return [
        {"task": task, "method": "lora", "tuned": v, "seed": "1", "val/accuracy": str(x)}
        for v, x in scores.items()
    ]


def test_a_winner_at_the_edge_gets_candidates_beyond_it() -> None:
    """Up the list (x the ratio of the top two), down it, at most ``extend`` times, not on a tie, and the
    choice waits for the extensions."""
    sweep = Sweep(argument="lr", values={"lora": [0.001, 0.003, 0.01]}, overrides=[], seeds=[1], extend=2)
    rising = {"0.001": 0.6, "0.003": 0.7, "0.01": 0.8}
    assert sweep.next_extension(sweep_rows(rising), "sst2", "lora") == "0.0333"
    assert sweep.chosen(sweep_rows(rising), "sst2", "lora") is None
    assert sweep.next_extension(sweep_rows({**rising, "0.0333": 0.9}), "sst2", "lora") == "0.111"
    capped = {**rising, "0.0333": 0.9, "0.111": 0.95}  # the best is still at the edge: extend=2 is spent
    assert sweep.next_extension(sweep_rows(capped), "sst2", "lora") is None
    assert sweep.chosen(sweep_rows(capped), "sst2", "lora") == "0.111"
    peaked = {**rising, "0.0333": 0.5}
    assert sweep.next_extension(sweep_rows(peaked), "sst2", "lora") is None
    assert sweep.chosen(sweep_rows(peaked), "sst2", "lora") == "0.01"
    falling = {"0.001": 0.8, "0.003": 0.7, "0.01": 0.6}
    assert sweep.next_extension(sweep_rows(falling), "sst2", "lora") == "0.000333"
    tied = {"0.001": 0.5, "0.003": 0.5, "0.01": 0.5}
    assert sweep.next_extension(sweep_rows(tied), "sst2", "lora") is None
    assert sweep.chosen(sweep_rows(tied), "sst2", "lora") == "0.001"
    assert (
        sweep.next_extension(sweep_rows({"0.001": 0.6, "0.003": 0.7}), "sst2", "lora") is None
    )  # unfinished
    plain = Sweep(argument="lr", values={"lora": [0.001, 0.003, 0.01]}, overrides=[], seeds=[1])
    assert plain.next_extension(sweep_rows(rising), "sst2", "lora") is None
    assert plain.chosen(sweep_rows(rising), "sst2", "lora") == "0.01"


def test_a_run_whose_configs_or_tuned_value_changed_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows record a digest of each run's configs and arguments: editing an overlay reruns exactly its
    runs, a comment changes nothing, a new sweep winner reruns the tuned method's runs (and drops no
    current tuning row), and rows written before the digest are kept as they are."""
    grid_file = tiny_grid(tmp_path, "unused", sweep=True)
    raw = yaml.safe_load(grid_file.read_text())
    raw["sweep"]["extend"] = 0
    grid_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    started: list[str] = []
    accuracy = {"0.01": 0.9, "0.03": 0.8}  # each candidate's tuning score

    def fake_run(command: list[str], **kwargs: object) -> None:
        name = next(a.split("=", 1)[1] for a in command if a.startswith("--trainer.logger.init_args.name="))
        version = next(a.split("=", 1)[1] for a in command if a.startswith("--trainer.logger.init_args.ver"))
        started.append(f"{name}/{version}")

    def fake_collect(
        run: Run, logs: Path, wall_s: float, cpu_s: float, tuned: str | None
    ) -> dict[str, object]:
        score = accuracy[run.candidate] if run.candidate else 0.7
        row = {"task": run.task, "method": run.method, "variant": run.variant, "seed": run.seed}
        return row | {"tuned": run.candidate or tuned or "", "val/accuracy": score}

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr("spec_lightning.experiments.reproduce.collect", fake_collect)
    monkeypatch.setattr("spec_lightning.experiments.reproduce.write_report", lambda *args, **kwargs: None)

    def resume() -> list[str]:
        started.clear()
        main(["--grid", str(grid_file)])
        return sorted(started)

    everything = resume()
    assert len(everything) == 8 and resume() == []
    half = tmp_path / "half.yaml"
    half.write_text("# a comment and another layout\ndata: {init_args: {train_fraction: 0.5}}\n")
    raw["logs"] = str(tmp_path / "elsewhere")  # nor does where the logs go change what a run trains
    grid_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert resume() == []
    half.write_text(yaml.safe_dump({"data": {"init_args": {"train_fraction": 0.75}}}))
    assert resume() == ["lora-sst2-fewshot50/seed1", "lora-sst2-fewshot50/seed2"]
    assert "lora-sst2-fewshot50 seed1: its row was made with other configs" in capsys.readouterr().out
    out = tmp_path / "reports" / "tiny"
    lora = [r for r in read_rows(out / "results.csv") if r["method"] == "lora"]
    assert {r["tuned"] for r in lora} == {"0.01"} and len(read_rows(out / "results.csv")) == 6
    # Another candidate list: the new candidate runs, wins, and every LoRA run runs again with it.
    raw["sweep"]["values"]["lora"] = [0.01, 0.03, 0.1]
    grid_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    accuracy["0.1"] = 0.95
    assert resume() == sorted(
        ["lora-sst2-tune_0.1/seed1"] + [f"lora-sst2{v}/seed{s}" for v in ("", "-fewshot50") for s in (1, 2)]
    )
    assert {r["tuned"] for r in read_rows(out / "results.csv") if r["method"] == "lora"} == {"0.1"}
    assert len(read_rows(out / "sweep.csv")) == 3
    # A method override changes the tuning runs' arguments: their rows are dropped and they run again.
    raw["method_overrides"]["lora"] = ["--model.init_args.method.init_args.r=4"]
    grid_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert [s for s in resume() if "tune" in s] == [
        f"lora-sst2-tune_{v}/seed1" for v in ("0.01", "0.03", "0.1")
    ]
    # Rows from before the digest was recorded (no config column) are taken as they are.
    for table in ("results.csv", "sweep.csv"):
        pd.DataFrame(read_rows(out / table)).drop(columns="config").to_csv(out / table, index=False)
    raw["method_overrides"]["lora"] = ["--model.init_args.method.init_args.r=8"]
    grid_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert resume() == []
    # ... but a row's tuned value is still checked against the sweep's choice.
    sweep = pd.DataFrame(read_rows(out / "sweep.csv"))
    sweep.loc[sweep["tuned"] == "0.01", "val/accuracy"] = "0.99"
    sweep.to_csv(out / "sweep.csv", index=False)
    assert resume() == sorted(f"lora-sst2{v}/seed{s}" for v in ("", "-fewshot50") for s in (1, 2))


def test_curves_keep_the_validation_metrics_and_training_loss(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from spec_lightning.experiments.records import curves_of, write_json

    writer = SummaryWriter(str(tmp_path))
    for step, (accuracy, loss) in enumerate([(0.5, 0.69), (0.71234567, 0.5)]):
        writer.add_scalar("val/accuracy", accuracy, step * 10)
        writer.add_scalar("train/loss", loss, step * 10)
        writer.add_scalar("train/task_loss", loss, step * 10)
        writer.add_scalar("clustering/modules", 3, step * 10)
    writer.close()
    curves = curves_of(tmp_path)
    assert curves == {"train/loss": [[0, 0.69], [10, 0.5]], "val/accuracy": [[0, 0.5], [10, 0.712346]]}
    write_json(tmp_path / "curves" / "run.json", curves)
    assert json.loads((tmp_path / "curves" / "run.json").read_text()) == curves
    assert [p.name for p in (tmp_path / "curves").iterdir()] == ["run.json"]


def test_a_config_file_among_the_arguments_counts_by_its_contents(tmp_path: Path) -> None:
    """A sweep's budget overlay passed as --config=FILE: editing the file changes the tuning runs'
    digest (it used to count by its path only, so rows tuned at the old budget were kept)."""
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_epochs: 3\n")
    budget = tmp_path / "tune.yaml"
    budget.write_text("trainer:\n  max_epochs: 1\n")
    raw = {
        "name": "g",
        "tasks": ["sst2"],
        "methods": {"lora": str(base)},
        "sweep": {
            "argument": "model.init_args.learning_rate",
            "values": {"lora": [0.001]},
            "overrides": ["--data.init_args.validate_on=tuning", f"--config={budget}"],
        },
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    grid = Grid.load(tmp_path / "grid.yaml")
    (tuning,) = [r for r in grid.runs() if r.candidate is not None]
    (reported,) = [r for r in grid.runs() if r.candidate is None]
    before, before_reported = tuning.fingerprint(grid), reported.fingerprint(grid, "0.001")
    budget.write_text("# a comment only\ntrainer:\n  max_epochs: 1\n")
    assert tuning.fingerprint(grid) == before  # layout and comments do not count
    budget.write_text("trainer:\n  max_epochs: 2\n")
    assert tuning.fingerprint(grid) != before
    assert reported.fingerprint(grid, "0.001") == before_reported  # the reported runs do not read it


def test_a_value_the_command_line_sets_does_not_count_in_the_digest(tmp_path: Path) -> None:
    """A method config's learning rate is overridden by the sweep's argument in every tuning and tuned
    run: changing the shipped default must not make finished rows run again, while any other key must."""
    from spec_lightning.experiments.grid import without_keys

    method = tmp_path / "lora.yaml"
    method.write_text("model:\n  init_args:\n    learning_rate: 0.001\n    weight_decay: 0.0\n")
    raw = {
        "name": "g",
        "tasks": ["sst2"],
        "methods": {"lora": str(method)},
        "sweep": {
            "argument": "model.init_args.learning_rate",
            "values": {"lora": [0.001, 0.003]},
            "overrides": ["--data.init_args.validate_on=tuning"],
        },
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    grid = Grid.load(tmp_path / "grid.yaml")
    tuning = [r for r in grid.runs() if r.candidate is not None][0]
    (reported,) = [r for r in grid.runs() if r.candidate is None]
    before = tuning.fingerprint(grid), reported.fingerprint(grid, "0.003")
    method.write_text("model:\n  init_args:\n    learning_rate: 0.003\n    weight_decay: 0.0\n")
    assert (tuning.fingerprint(grid), reported.fingerprint(grid, "0.003")) == before
    method.write_text("model:\n  init_args:\n    learning_rate: 0.003\n    weight_decay: 0.01\n")
    after = tuning.fingerprint(grid), reported.fingerprint(grid, "0.003")
    assert after[0] != before[0] and after[1] != before[1]
    assert reported.fingerprint(grid, "0.01") != after[1]  # the tuned value itself still counts
    config = {"model": {"init_args": {"learning_rate": 1, "r": 8}}, "seed_everything": 3, "data": [1]}
    assert without_keys(config, {"model.init_args.learning_rate", "seed_everything", "data.x"}) == {
        "model": {"init_args": {"r": 8}},
        "data": [1],
    }
    assert config["model"]["init_args"]["learning_rate"] == 1  # the parsed file is left as it was
