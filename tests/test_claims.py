"""Papers' claims in the reproduction report: verdicts read off the paired interval, per baseline and
variant, with cells that did not learn and too few seeds kept out of the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from spec_lightning.analysis.claims import Claim, claims_table, verdict
from spec_lightning.analysis.paired import paired_differences
from spec_lightning.analysis.report import summary
from spec_lightning.experiments.grid import Grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.01, 0.05, 3, False), "holds"),
        ((-0.05, -0.01, 3, False), "does not hold: the baseline is better"),
        ((-0.01, 0.02, 3, False), "not shown: the interval contains 0"),
        ((0.0, 0.02, 3, False), "not shown: the interval contains 0"),  # touching 0 is not excluding it
        ((-3.0, -1.0, 3, True), "holds"),  # perplexity: lower is better
        ((1.0, 3.0, 5, True), "does not hold: the baseline is better"),
        ((0.01, 0.05, 2, False), "pending: 2 of 3 seed pairs"),
        ((float("nan"), float("nan"), 3, False), "no interval"),
        ((0.01, 0.05, 3, False, False), "no evidence: the method did not learn"),
        ((0.01, 0.05, 3, False, True, False, "bitfit"), "no evidence: bitfit did not learn"),
    ],
)
def test_verdicts_read_the_interval(args: tuple, expected: str) -> None:
    assert verdict(*args) == expected


def runs_frame() -> pd.DataFrame:
    """SST-2: graph_spectral 3 points above full and 1 below LoRA per seed, with noise; at the 20 %
    share BitFit stays at the majority class; LoRSA has two seeds."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in (1, 2, 3):
        for variant in ("", "fewshot20"):
            base = 0.80 if not variant else 0.70
            for method, shift in (("lora", 0.0), ("full", -0.02), ("graph_spectral", 0.01)):
                rows.append(("sst2", method, variant, seed, base + shift + rng.normal(0, 0.004)))
            rows.append(("sst2", "bitfit", variant, seed, 0.5 if variant else 0.78 + rng.normal(0, 0.004)))
        if seed < 3:
            rows.append(("sst2", "lorsa", "", seed, 0.83))
    runs = pd.DataFrame(rows, columns=["task", "method", "variant", "seed", "val/accuracy"])
    runs["trainable"], runs["total"], runs["majority"] = 10, 100, 0.509
    runs["wall_s"] = runs["cpu_s"] = runs["s_per_step"] = 1.0
    return runs


def test_claims_table_gives_each_comparison_its_interval_and_verdict() -> None:
    runs = runs_frame()
    claims = [
        Claim("GS beats full and LoRA", "graph_spectral", ["full", "lora"], ["", "fewshot20"]),
        Claim("BitFit beats LoRA few-shot", "bitfit", ["lora"], ["fewshot20"]),
        Claim("GS beats BitFit few-shot", "graph_spectral", ["bitfit"], ["fewshot20"]),
        Claim("LoRSA beats LoRA", "lorsa", ["lora"]),
        Claim("LoRSA beats DoRA", "lorsa", ["dora"]),
    ]
    paired = {b: paired_differences(runs, b) for b in ("full", "lora", "bitfit", "dora")}
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|"))
        for line in claims_table(claims, paired, summary(runs)).splitlines()[2:]
    }
    values = runs.pivot_table(index=["variant", "seed"], columns="method", values="val/accuracy")
    expected = {}
    for variant, where in (("", "sst2"), ("fewshot20", "sst2/fewshot20")):
        for baseline in ("full", "lora"):
            pair = values.loc[variant][["graph_spectral", baseline]]
            low, high = scipy.stats.ttest_rel(pair["graph_spectral"], pair[baseline]).confidence_interval()
            mean = (pair["graph_spectral"] - pair[baseline]).mean()
            expected[(where, baseline)] = f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], 3"
    gs = {(r[1], r[2]): (r[3], r[4]) for r in rows if r[0] == "GS beats full and LoRA"}
    assert gs.keys() == expected.keys()
    for key, value in expected.items():  # the interval of scipy's paired t-test (no predictions saved)
        assert gs[key][0] == value, key
    assert gs[("sst2", "full")][1] == gs[("sst2/fewshot20", "full")][1] == "holds"  # +3 points, sd 0.6
    bitfit = [r for r in rows if r[0] == "BitFit beats LoRA few-shot"]
    assert [r[1:3] + r[4:] for r in bitfit] == [
        ("sst2/fewshot20", "lora", "no evidence: the method did not learn")
    ]
    assert any(
        r[0] == "GS beats BitFit few-shot" and r[4] == "no evidence: bitfit did not learn" for r in rows
    )
    assert any(r[0] == "LoRSA beats LoRA" and r[4] == "pending: 2 of 3 seed pairs" for r in rows)
    assert ("LoRSA beats DoRA", "–", "dora", "–", "pending: no paired runs yet") in rows


def test_grid_claims_must_name_its_methods_and_variants(tmp_path: Path) -> None:
    base = {
        "name": "g",
        "tasks": ["sst2"],
        "methods": {
            "lora": str(CONFIGS / "method" / "lora.yaml"),
            "full": str(CONFIGS / "method" / "full.yaml"),
        },
    }
    cases = [
        ({"claim": "c", "method": "lorsa", "against": ["lora"]}, r"claim 'c' names methods \['lorsa'\]"),
        ({"claim": "c", "method": "lora", "against": ["dora"]}, r"claim 'c' names methods \['dora'\]"),
        (
            {"claim": "c", "method": "lora", "against": ["full"], "variants": ["fewshot20"]},
            r"claim 'c' names variants \['fewshot20'\]",
        ),
    ]
    for i, (claim, message) in enumerate(cases):
        path = tmp_path / f"grid{i}.yaml"
        path.write_text(json.dumps({**base, "claims": [claim]}))
        with pytest.raises(ValueError, match=message):
            Grid.load(path)
    path = tmp_path / "ok.yaml"
    path.write_text(json.dumps({**base, "claims": [{"claim": "c", "method": "lora", "against": ["full"]}]}))
    assert Grid.load(path).claims == [Claim("c", "lora", ["full"], [""])]
