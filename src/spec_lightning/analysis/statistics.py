"""Intervals for the reproduction report: over seeds (Student's t) and over dev examples and seeds (a
paired bootstrap), whether a cell learned at all, and which metric a task reports."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import stats

#: The metric reported per task where it is not accuracy; perplexity for language modelling.
PRIMARY = {"cola": "val/matthews", "stsb": "val/pearson"}


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """x̄ ± t_{(1+level)/2, n−1} · s / √n over the n values (NaN for n < 2)."""
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    mean, half = float(np.mean(values)), float(stats.t.ppf((1 + level) / 2, n - 1) * np.std(values, ddof=1))
    return mean - half / np.sqrt(n), mean + half / np.sqrt(n)


def paired_bootstrap(
    differences: np.ndarray, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean paired difference over dev examples and seeds.

    ``differences[s, i]`` is example i's score under the method minus under the baseline, both trained
    with seed s (for accuracy, 1(ŷ_m = y) − 1(ŷ_b = y)). Each resample draws S seeds and N examples with
    replacement, the same examples for every seed drawn, and takes mean_{s*} mean_{i*} differences[s*, i*]:
    the interval covers both the dev set's sampling and the seed's. It is computed with multinomial
    counts: with example counts w (Σ w = N) and seed counts v (Σ v = S) the statistic is vᵀ D w / (S N).
    """
    differences = np.asarray(differences, dtype=float)
    n_seeds, n_examples = differences.shape
    rng = np.random.default_rng(seed)
    statistics = np.empty(resamples)
    for start in range(0, resamples, 500):
        size = min(500, resamples - start)
        examples = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=size)
        seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size)
        per_seed = examples @ differences.T / n_examples
        statistics[start : start + size] = (seeds * per_seed).sum(1) / n_seeds
    low, high = np.quantile(statistics, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def did_not_learn(scores: np.ndarray, majority: float) -> bool:
    """Every run scored at or below always answering the most frequent label."""
    return bool(np.all(np.asarray(scores) <= majority + 1e-9))


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (``val/`` prefix or not) is better: perplexity and losses."""
    return metric.removeprefix("val/") in ("perplexity", "loss")


def display_scale(metric: str) -> float:
    """How a metric is shown: x100 for scores in [0, 1] (accuracy, F1, correlations), as it is for
    perplexity and losses."""
    return 1.0 if lower_is_better(metric) else 100.0


def primary_metric(task: str, columns: Iterable[str]) -> str:
    """The task's reported metric among ``columns`` (``val/*`` names)."""
    columns = list(columns)
    for metric in (PRIMARY.get(task), "val/accuracy", "val/perplexity"):
        if metric in columns:
            return metric
    raise KeyError(f"no metric for task {task!r} among the columns {sorted(columns)}")
