"""Paired differences between two methods of a reproduction grid: per task and variant, one method's
metric minus the other's on the same seed, with a 95 % interval (a bootstrap over the dev examples and
seeds where the runs' predictions were saved, else Student's t over the seed pairs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spec_lightning.analysis.statistics import paired_bootstrap, primary_metric, t_interval


def run_name(method: str, task: str, variant: str) -> str:
    """As the runner names a run: ``<method>-<task>[-<variant>]``."""
    return "-".join(p for p in (method, task, variant) if p)


def correct(folder: Path, name: str, seed: int) -> np.ndarray | None:
    """1(ŷ = y) per dev example of a run, from ``predictions/<run name>-seed<seed>.npz``."""
    path = folder / f"{name}-seed{seed}.npz"
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return (saved["predictions"] == saved["labels"]).astype(float)


def example_differences(
    folder: Path, method: str, baseline: str, task: str, variant: str, seeds: list[int]
) -> np.ndarray | None:
    """seeds x examples: 1(method right) − 1(baseline right); None unless every run's predictions are
    there, over the same examples."""
    rows = []
    for seed in seeds:
        ours = correct(folder, run_name(method, task, variant), seed)
        theirs = correct(folder, run_name(baseline, task, variant), seed)
        if ours is None or theirs is None or len(ours) != len(theirs):
            return None
        rows.append(ours - theirs)
    return np.stack(rows) if rows and len({len(r) for r in rows}) == 1 else None


def paired_differences(
    runs: pd.DataFrame, baseline: str = "lora", predictions: Path | None = None
) -> pd.DataFrame:
    """Per task, variant and method: d_s = metric(method, s) − metric(baseline, s) over the seeds s both
    ran (the baseline's runs of the same variant: few-shot shares compare at the same share), their
    mean d̄ and n, and a 95 % interval: for accuracy with every pair's predictions in ``predictions``,
    the paired bootstrap over dev examples and seeds
    (:func:`~spec_lightning.analysis.statistics.paired_bootstrap`); else Student's t over the pairs,
    d̄ ± t_{0.975, n−1} · sd(d) / √n (NaN for n < 2). Pairing on seeds removes what the seed does to
    both (initialisation, dropout)."""
    records = []
    for (task, variant), group in runs.groupby(["task", "variant"], sort=False):
        metric = primary_metric(str(task), group.columns[group.notna().any()])
        values = group.pivot_table(index="seed", columns="method", values=metric, aggfunc="first")
        if baseline not in values.columns:
            continue
        for method in (m for m in dict.fromkeys(group["method"]) if m != baseline):
            pairs = values[[method, baseline]].dropna().astype(float)
            differences = (pairs[method] - pairs[baseline]).to_numpy()
            n = len(differences)
            mean = float(differences.mean()) if n else float("nan")
            low, high, kind = *t_interval(differences), "t"
            examples = None
            if predictions is not None and metric == "val/accuracy" and n:
                examples = example_differences(
                    predictions, method, baseline, str(task), str(variant), list(pairs.index)
                )
            if examples is not None:
                (low, high), kind = paired_bootstrap(examples), "bootstrap"
            records.append(
                {
                    "task": task,
                    "variant": variant,
                    "method": method,
                    "metric": metric.removeprefix("val/"),
                    "difference": mean,
                    "low": low,
                    "high": high,
                    "pairs": n,
                    "interval": kind,
                }
            )
    return pd.DataFrame(records)
