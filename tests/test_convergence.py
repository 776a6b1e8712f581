"""The convergence report: curves over seeds, "still rising", and verdicts beside a shorter budget's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spec_lightning.analysis.claims import Claim
from spec_lightning.analysis.convergence import Curve, kind, read_curves, verdicts_beside
from spec_lightning.analysis.report import write_report


def curve(values: list[list[float]], metric: str = "val/accuracy") -> Curve:
    return Curve("sst2", "lora", metric, np.arange(len(values[0])) * 100, np.array(values))


@pytest.mark.parametrize(
    ("values", "metric", "expected"),
    [
        # last change +0.05 against the seeds' sd 0.01 at the last evaluation
        ([[0.80, 0.85], [0.82, 0.86], [0.81, 0.87]], "val/accuracy", "still rising"),
        # +0.004 against sd 0.01: within the spread
        ([[0.85, 0.85], [0.86, 0.86], [0.84, 0.87]], "val/accuracy", "settled"),
        ([[0.90, 0.85], [0.91, 0.86], [0.92, 0.87]], "val/accuracy", "falling back"),
        ([[30.0, 25.0], [31.0, 26.0], [29.0, 24.0]], "val/perplexity", "still falling"),
        ([[25.0, 30.0], [26.0, 31.0], [24.0, 29.0]], "val/perplexity", "rising back"),
        ([[0.80, 0.85]], "val/accuracy", "one seed: no spread"),
        ([[0.80, 0.85], [0.80, 0.87]], "val/accuracy", "still rising"),  # two seeds have a spread
        # three evaluations: the spread is the last one's (0.01), not the middle one's (0.1)
        ([[0.6, 0.70, 0.85], [0.6, 0.90, 0.86], [0.6, 0.80, 0.87]], "val/accuracy", "still rising"),
        ([[0.80], [0.81]], "val/accuracy", "one evaluation"),
    ],
)
def test_status_by_hand(values: list[list[float]], metric: str, expected: str) -> None:
    assert curve(values, metric).status() == expected


def test_spread_is_the_seeds_sample_sd() -> None:
    values = [[0.80, 0.85], [0.82, 0.86], [0.81, 0.88]]
    c = curve(values)
    assert c.sd[-1] == pytest.approx(statistics.stdev([0.85, 0.86, 0.88]))
    assert c.mean[0] == pytest.approx(statistics.mean([0.80, 0.82, 0.81]))


def write_curve(out: Path, name: str, points: list[list[float]], metric: str = "val/accuracy") -> None:
    (out / "curves").mkdir(parents=True, exist_ok=True)
    (out / "curves" / f"{name}.json").write_text(json.dumps({metric: points, "train/loss": [[0, 0.7]]}))


def results(seeds: dict[str, list[float]], majority: float = 0.5) -> pd.DataFrame:
    rows = [
        {"task": "sst2", "method": m, "variant": "", "seed": 42 + i, "val/accuracy": v}
        for m, values in seeds.items()
        for i, v in enumerate(values)
    ]
    runs = pd.DataFrame(rows)
    runs["trainable"], runs["total"], runs["majority"] = 10, 100, majority
    runs["wall_s"] = runs["cpu_s"] = runs["s_per_step"] = 1.0
    runs["run_dir"] = "logs/elsewhere"
    return runs


def test_read_curves_keeps_the_steps_every_seed_has(tmp_path: Path) -> None:
    runs = results({"lora": [0.8, 0.9]})
    # seed 42 logged step 200 twice (end of epoch on a periodic validation): the last value counts
    write_curve(tmp_path, "lora-sst2-seed42", [[100, 0.5], [200, 0.6], [200, 0.7], [300, 0.8]])
    write_curve(tmp_path, "lora-sst2-seed43", [[100, 0.55], [200, 0.75], [250, 0.8]])
    (c,) = read_curves(tmp_path, runs)
    assert c.steps.tolist() == [100, 200]
    assert c.values.tolist() == [[0.5, 0.7], [0.55, 0.75]]
    assert read_curves(tmp_path / "elsewhere", runs) == []


def test_verdicts_beside_mark_what_changed() -> None:
    here = [
        {"claim": "A", "where": "sst2", "against": "lora", "value": "+2.0", "verdict": "holds"},
        {"claim": "A", "where": "mrpc", "against": "lora", "value": "+0.1", "verdict": "not shown: x"},
        {"claim": "B", "where": "sst2", "against": "lora", "value": "+0.1", "verdict": "holds"},
    ]
    there = [
        {"claim": "A", "where": "sst2", "against": "lora", "value": "+0.5", "verdict": "not shown: y"},
        {"claim": "A", "where": "mrpc", "against": "lora", "value": "+0.3", "verdict": "not shown: z"},
    ]
    lines = verdicts_beside(here, there, "short").splitlines()
    assert lines[2].endswith("| **yes** |") and "+0.5: not shown: y" in lines[2]
    assert lines[3].endswith("| no |")
    assert len(lines) == 4  # claim B has no counterpart there
    assert verdicts_beside(here, [], "short") == ""
    assert kind("does not hold: lora is better") == "does not hold"


def test_the_report_draws_curves_and_sets_verdicts_beside_the_short_budget(tmp_path: Path) -> None:
    converged, short = tmp_path / "converged", tmp_path / "short"
    converged.mkdir()
    short.mkdir()
    # converged: speclora 3 points above lora on every seed (holds); short budget: equal (not shown)
    results({"lora": [0.80, 0.82, 0.81], "speclora": [0.83, 0.85, 0.84]}).to_csv(
        converged / "results.csv", index=False
    )
    results({"lora": [0.80, 0.82, 0.81], "speclora": [0.81, 0.81, 0.81]}).to_csv(
        short / "results.csv", index=False
    )
    for i, final in enumerate([0.80, 0.82, 0.81]):
        write_curve(converged, f"lora-sst2-seed{42 + i}", [[100, 0.7], [200, final - 0.001], [300, final]])
        write_curve(converged, f"speclora-sst2-seed{42 + i}", [[100, 0.6], [200, 0.7], [300, final + 0.03]])
    claims = [Claim("SpecLoRA beats LoRA", "speclora", ["lora"])]
    report = write_report(
        converged / "results.csv", "converged", claims=claims, compare_with=short / "results.csv"
    )
    text = report.read_text()
    assert (converged / "curves_sst2.png").is_file() and "![curves_sst2.png](curves_sst2.png)" in text
    section = text.split("## Convergence")[1].split("##")[0]
    lora_row = next(line for line in section.splitlines() if line.startswith("| lora |"))
    spec_row = next(line for line in section.splitlines() if line.startswith("| speclora |"))
    assert "81.0 ± 1.0, +0.1 since step 200 of 300: settled" in lora_row
    assert "84.0 ± 1.0, +14.0 since step 200 of 300: **still rising**" in spec_row
    beside = text.split("## Verdicts beside short")[1].split("##")[0]
    row = next(line for line in beside.splitlines() if line.startswith("| SpecLoRA beats LoRA"))
    assert "not shown" in row.split("|")[4] and "holds" in row.split("|")[5] and row.endswith("| **yes** |")
    with pytest.raises(FileNotFoundError, match="compare_with"):
        write_report(converged / "results.csv", "c", claims=claims, compare_with=tmp_path / "no.csv")


def test_draw_curves_plots_the_mean_and_a_band_of_the_sd() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from spec_lightning.analysis.convergence import draw_curves

    values = [[0.60, 0.80], [0.70, 0.84], [0.80, 0.82]]
    fig, ax = plt.subplots()
    draw_curves(ax, [curve(values)])
    (line,) = ax.get_lines()
    assert line.get_ydata().tolist() == pytest.approx([70.0, 82.0])
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    vertices = band.get_paths()[0].vertices
    for step, mean, seeds in ((0, 70.0, [0.60, 0.70, 0.80]), (100, 82.0, [0.80, 0.84, 0.82])):
        ys = vertices[vertices[:, 0] == step, 1]
        sd = 100 * statistics.stdev(seeds)
        assert ys.min() == pytest.approx(mean - sd) and ys.max() == pytest.approx(mean + sd)
    plt.close(fig)


def test_a_single_evaluation_has_no_change_in_the_table() -> None:
    from spec_lightning.analysis.convergence import convergence_table

    table = convergence_table([curve([[0.80], [0.82]])]).splitlines()
    assert table[1] == "|---|---|"
    assert table[2] == "| lora | 81.0 ± 1.4: one evaluation |"
