"""Convergence from a grid's committed learning curves (``curves/<run>-seed<seed>.json`` beside its
``results.csv``): per task and method, the dev metric's mean over seeds at every evaluation with the
seeds' spread (a figure per task), whether the last two evaluations still differ by more than that
spread ("still rising"), and how the papers' claims read at this budget beside a shorter one's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from spec_lightning.analysis.paired import run_name  # noqa: E402
from spec_lightning.analysis.statistics import display_scale, lower_is_better, primary_metric  # noqa: E402


@dataclass(frozen=True)
class Curve:
    """One task and method's dev metric: ``values`` is seeds x ``steps`` (the evaluations every seed
    made, in step order)."""

    task: str
    method: str
    metric: str
    steps: np.ndarray
    values: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @property
    def sd(self) -> np.ndarray:
        """The seeds' spread at each evaluation: the sample standard deviation (NaN for one seed)."""
        if len(self.values) < 2:
            return np.full(len(self.steps), np.nan)
        return self.values.std(axis=0, ddof=1)

    def status(self) -> str:
        """ "still rising" where the mean's last change (last evaluation minus the one before) is larger
        than the seeds' spread at the last evaluation in the improving direction ("still falling" for a
        perplexity or loss), "falling back" ("rising back") the other way, "settled" otherwise;
        "one seed: no spread" and "one evaluation" where it cannot be judged."""
        if len(self.steps) < 2:
            return "one evaluation"
        spread = self.sd[-1]
        if np.isnan(spread):
            return "one seed: no spread"
        change = self.mean[-1] - self.mean[-2]
        lower = lower_is_better(self.metric)
        if abs(change) <= spread:
            return "settled"
        if (change > 0) != lower:
            return "still falling" if lower else "still rising"
        return "rising back" if lower else "falling back"


def points(values: list[list[float]]) -> dict[int, float]:
    """A logged curve as {step: value}, the last value where a step was logged twice (the end-of-epoch
    validation can fall on the step of a periodic one)."""
    return {int(step): float(value) for step, value in values}


def read_curves(out: Path, runs: pd.DataFrame) -> list[Curve]:
    """The main runs' (no variant) dev-metric curves per task and method from ``out/curves``, over the
    evaluation steps every seed with a curve file has; cells without one are left out."""
    curves = []
    main = runs[runs["variant"] == ""]
    for (task, method), group in main.groupby(["task", "method"], sort=False):
        metric = primary_metric(str(task), group.columns[group.notna().any()])
        seeds = []
        for seed in sorted(group["seed"].astype(int)):
            path = out / "curves" / f"{run_name(str(method), str(task), '')}-seed{seed}.json"
            if path.is_file():
                logged = json.loads(path.read_text())
                if metric in logged:
                    seeds.append(points(logged[metric]))
        if not seeds:
            continue
        steps = sorted(set.intersection(*(set(s) for s in seeds)))
        if steps:
            values = np.array([[s[step] for step in steps] for s in seeds])
            curves.append(Curve(str(task), str(method), metric, np.array(steps), values))
    return curves


def curves_figures(curves: Sequence[Curve], out: Path) -> list[Path]:
    """``curves_<task>.png``: per method, the mean over seeds against the optimiser step with a band of
    ± the seeds' sd."""
    written = []
    for task in dict.fromkeys(c.task for c in curves):
        mine = [c for c in curves if c.task == task]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw_curves(ax, mine)
        ax.set_title(task)
        fig.tight_layout()
        written.append(out / f"curves_{task}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def draw_curves(ax: Axes, curves: Sequence[Curve]) -> None:
    """On ``ax``, per curve, the mean over seeds (x100 but for perplexity) against the step and a band of
    ± the seeds' sd (none for one seed)."""
    scale = display_scale(curves[0].metric)
    for curve in curves:
        mean, sd = scale * curve.mean, scale * np.nan_to_num(curve.sd)
        (line,) = ax.plot(curve.steps, mean, marker=".", label=f"{curve.method} ({len(curve.values)})")
        ax.fill_between(curve.steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"dev {curves[0].metric.removeprefix('val/')} (mean over seeds, ± sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="method (seeds)", title_fontsize=7)


def convergence_table(curves: Sequence[Curve]) -> str:
    """Methods x tasks: the last evaluation's mean ± sd, its change since the one before (step) and the
    :meth:`Curve.status`, bold where it is still rising or falling."""
    tasks = list(dict.fromkeys(c.task for c in curves))
    methods = list(dict.fromkeys(c.method for c in curves))
    by_key = {(c.task, c.method): c for c in curves}
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method in methods:
        cells = []
        for task in tasks:
            curve = by_key.get((task, method))
            if curve is None:
                cells.append("")
                continue
            scale = display_scale(curve.metric)
            last, spread = scale * curve.mean[-1], scale * curve.sd[-1]
            value = f"{last:.1f}" + ("" if np.isnan(spread) else f" ± {spread:.1f}")
            status = curve.status()
            if len(curve.steps) > 1:
                change = last - scale * curve.mean[-2]
                value += f", {change:+.1f} since step {int(curve.steps[-2])} of {int(curve.steps[-1])}"
            marked = f"**{status}**" if status.startswith("still") else status
            cells.append(f"{value}: {marked}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts_beside(here: Sequence[dict[str, str]], there: Sequence[dict[str, str]], name: str) -> str:
    """The claims' verdicts at this budget beside another grid's (``name``) on the same claim, task,
    variant and baseline (:func:`~spec_lightning.analysis.claims.claim_verdicts` records), with the
    cells whose verdict changed marked: which short-budget verdicts flip at convergence."""
    theirs = {(r["claim"], r["where"], r["against"]): r for r in there}
    lines = [
        f"| claim | task | against | {name}: difference, verdict | here: difference, verdict | changed |",
        "|---|---|---|---|---|---|",
    ]
    for r in here:
        other = theirs.get((r["claim"], r["where"], r["against"]))
        if other is None:
            continue
        changed = "**yes**" if kind(other["verdict"]) != kind(r["verdict"]) else "no"
        lines.append(
            f"| {r['claim']} | {r['where']} | {r['against']} | {other['value']}: {other['verdict']} | "
            f"{r['value']}: {r['verdict']} | {changed} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def kind(verdict: str) -> str:
    """A verdict's kind, without its detail ("does not hold: lora is better" → "does not hold")."""
    return verdict.split(":")[0]
