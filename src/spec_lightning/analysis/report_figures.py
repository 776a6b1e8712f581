"""The reproduction report's figures: the method comparison, the few-shot shares, graph-spectral's
ablation curves and MFTC's predictor, from a grid's summary and its runs' logs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spec_lightning.analysis.curves import curves_figure, read_scalars  # noqa: E402
from spec_lightning.analysis.modules import predictor_figure  # noqa: E402

#: graph_spectral's ablation variants, drawn against its joint objective.
ABLATIONS = ("task_only", "spectral_only")


def comparison_figure(stats: pd.DataFrame, path: Path) -> None:
    main = stats[stats["variant"] == ""]
    tasks, methods = list(dict.fromkeys(main["task"])), list(dict.fromkeys(main["method"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * len(methods) / 3), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        rows = main[main["method"] == method].set_index("task").reindex(tasks)
        ax.bar(
            np.arange(len(tasks)) + i * width, rows["mean"], width, yerr=rows["sd"].fillna(0), label=method
        )
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("dev metric (mean over seeds, ± sd)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fewshot_figure(stats: pd.DataFrame, path: Path) -> bool:
    few = stats[stats["variant"].str.fullmatch(r"fewshot\d+")]
    if few.empty:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for (task, method), group in few.groupby(["task", "method"], sort=False):
        points = [
            (int(v.removeprefix("fewshot")), m, s)
            for v, m, s in zip(group["variant"], group["mean"], group["sd"], strict=True)
        ]
        full = stats[(stats["task"] == task) & (stats["method"] == method) & (stats["variant"] == "")]
        points += [(100, full["mean"].iloc[0], full["sd"].iloc[0])] if not full.empty else []
        x, y, e = zip(*sorted(points), strict=True)
        ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=f"{method} ({task})")
    ax.set_xlabel("training data (%)")
    ax.set_ylabel("dev metric")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def first_seed_dirs(runs: pd.DataFrame, method: str, variant: str) -> dict[str, Path]:
    """Per task, the log folder of the first seed's run, where it is on this machine."""
    chosen = runs[(runs["method"] == method) & (runs["variant"] == variant)].sort_values("seed")
    folders = {task: Path(group["run_dir"].iloc[0]) for task, group in chosen.groupby("task", sort=False)}
    return {task: folder for task, folder in folders.items() if folder.is_dir()}


def ablation_figures(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Task-loss curves of graph_spectral's ablation variants against its joint objective (first seed)."""
    written = []
    joint = first_seed_dirs(runs, "graph_spectral", "")
    for task, joint_dir in joint.items():
        curves = {"joint": read_scalars(joint_dir)["train/task_loss"]}
        for variant in ABLATIONS:
            directory = first_seed_dirs(runs, "graph_spectral", variant).get(task)
            if directory is not None:
                curves[variant] = read_scalars(directory)["train/task_loss"]
        if len(curves) > 1:
            fig = curves_figure(curves, "train/task_loss")
            written.append(out / f"ablation_{task}.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written


def predictor_figures(runs: pd.DataFrame, out: Path) -> list[Path]:
    written = []
    for task, directory in first_seed_dirs(runs, "mftc", "").items():
        report_file = directory / "module_search.json"
        if not report_file.is_file():
            continue
        predictor = json.loads(report_file.read_text()).get("predictor")
        if predictor:
            fig = predictor_figure(
                np.array(predictor["predicted"]),
                np.array(predictor["measured"]),
                f"MFTC on {task}: R² {predictor['r2']:.3f}, Spearman {predictor['spearman']:.2f}",
            )
            written.append(out / f"mftc_predictor_{task}.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written
