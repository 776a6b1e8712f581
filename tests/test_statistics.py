"""The report's intervals against independent references: scipy's t-test and bootstrap, and a bootstrap
written out loop by loop."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from spec_lightning.analysis.statistics import (
    did_not_learn,
    display_scale,
    lower_is_better,
    paired_bootstrap,
    t_interval,
)


def test_t_interval_is_scipys_one_sample_interval() -> None:
    values = np.array([0.81, 0.79, 0.84, 0.80])
    low, high = scipy.stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert t_interval(values) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert all(np.isnan(t_interval(np.array([0.8]))))


def correctness(rng: np.random.Generator, n: int, accuracy: float) -> np.ndarray:
    return (rng.random(n) < accuracy).astype(float)


def test_one_seed_is_scipys_percentile_bootstrap_over_examples() -> None:
    rng = np.random.default_rng(0)
    differences = correctness(rng, 400, 0.8) - correctness(rng, 400, 0.75)
    reference = scipy.stats.bootstrap(
        (differences,), np.mean, n_resamples=20_000, method="percentile", random_state=1
    ).confidence_interval
    low, high = paired_bootstrap(differences[None, :], resamples=20_000)
    assert low == pytest.approx(reference.low, abs=0.004) and high == pytest.approx(reference.high, abs=0.004)


def brute_force(differences: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Draw seeds, then examples, with replacement; average example by example."""
    n_seeds, n_examples = differences.shape
    statistics = []
    for _ in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        examples = rng.integers(0, n_examples, n_examples)
        total = 0.0
        for s in seeds:
            for i in examples:
                total += differences[s, i]
        statistics.append(total / (n_seeds * n_examples))
    return tuple(np.quantile(statistics, [0.025, 0.975]))


def test_seeds_are_resampled_as_well_as_examples() -> None:
    """Seeds that disagree (+12, −4, +3 points) widen the interval past the examples' own spread."""
    rng = np.random.default_rng(3)
    differences = np.stack(
        [correctness(rng, 150, 0.8 + shift) - correctness(rng, 150, 0.8) for shift in (0.12, -0.04, 0.03)]
    )
    low, high = paired_bootstrap(differences, resamples=4000)
    ref_low, ref_high = brute_force(differences, 4000, np.random.default_rng(5))
    assert low == pytest.approx(ref_low, abs=0.01) and high == pytest.approx(ref_high, abs=0.01)
    examples_only = paired_bootstrap(differences.mean(0, keepdims=True), resamples=4000)
    assert high - low > 1.3 * (examples_only[1] - examples_only[0])


def test_a_constant_difference_has_no_spread() -> None:
    assert paired_bootstrap(np.full((3, 50), 0.25), resamples=200) == pytest.approx((0.25, 0.25))


def test_did_not_learn_means_no_run_above_the_majority_class() -> None:
    assert did_not_learn(np.array([0.509, 0.509, 0.4]), majority=0.509)
    assert not did_not_learn(np.array([0.509, 0.52, 0.4]), majority=0.509)


@pytest.mark.parametrize(
    ("metric", "lower", "scale"),
    [
        ("val/accuracy", False, 100.0),
        ("f1", False, 100.0),
        ("val/matthews", False, 100.0),
        ("val/perplexity", True, 1.0),
        ("perplexity", True, 1.0),
        ("val/loss", True, 1.0),
    ],
)
def test_direction_and_display_scale_of_each_metric(metric: str, lower: bool, scale: float) -> None:
    assert lower_is_better(metric) is lower
    assert display_scale(metric) == scale
