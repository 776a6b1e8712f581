"""The reproduction report: tables and figures from a grid's ``results.csv`` (one row per run).

- the method comparison: the task metric per method and task, mean ± sd over seeds, with the
  trainable-parameter percentage (the GLUE table);
- paired differences to a baseline method (peft LoRA): per task, each method's metric minus the
  baseline's on the same seed, the mean difference and its 95 % t-interval over the seed pairs;
- the cost table: wall and CPU seconds of the whole run (CPU seconds stand in for energy: no power
  meter on CPU), seconds per optimiser step while training, and trainable parameters (their range
  over seeds where they differ: MFTC's search picks per seed);
- variants (ablations, few-shot subsets) against their method's main runs;
- figures: ``comparison.png`` (bars with the seed sd), ``fewshot.png`` (variants named
  ``fewshot<percent>``, with the main run as 100 %), ``ablation_<task>.png`` (the task-loss curves of
  the graph-spectral variants ``task_only``/``spectral_only`` against the joint objective) and
  ``mftc_predictor_<task>.png`` (MFTC's predicted against measured gains, first seed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from spec_lightning.analysis.curves import curves_figure, read_scalars  # noqa: E402
from spec_lightning.analysis.modules import predictor_figure  # noqa: E402

#: The metric reported per task where it is not accuracy; perplexity for language modelling.
PRIMARY = {"cola": "val/matthews", "stsb": "val/pearson"}
ABLATIONS = ("task_only", "spectral_only")


def primary_metric(task: str, columns: pd.Index) -> str:
    for metric in (PRIMARY.get(task), "val/accuracy", "val/perplexity"):
        if metric in columns:
            return metric
    raise KeyError(f"no metric for task {task!r} among the columns {sorted(columns)}")


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, variant): metric mean and sd over seeds, seeds, parameters and time."""
    records = []
    for (task, method, variant), group in runs.groupby(["task", "method", "variant"], sort=False):
        metric = primary_metric(task, group.columns[group.notna().any()])
        values = group[metric].astype(float)
        records.append(
            {
                "task": task,
                "method": method,
                "variant": variant,
                "metric": metric.removeprefix("val/"),
                "mean": values.mean(),
                "sd": values.std(ddof=1) if len(values) > 1 else float("nan"),
                "seeds": len(values),
                "trainable_min": int(group["trainable"].min()),
                "trainable_max": int(group["trainable"].max()),
                "trainable_pct": 100 * float((group["trainable"] / group["total"]).mean()),
                "wall_s": float(group["wall_s"].mean()),
                "cpu_s": float(group["cpu_s"].astype(float).mean()),
                "s_per_step": float(group["s_per_step"].astype(float).mean()),
            }
        )
    return pd.DataFrame(records)


def cell(mean: float, sd: float, scale: float) -> str:
    return f"{scale * mean:.1f}" + ("" if np.isnan(sd) else f" ± {scale * sd:.1f}")


def display_scale(row: pd.Series) -> float:
    """x100 for scores in [0, 1]; perplexity as it is."""
    return 1.0 if row["metric"] == "perplexity" else 100.0


def task_cells(group: pd.DataFrame, tasks: list[str], render: Callable[[pd.Series, float], str]) -> list[str]:
    """One table cell per task from ``group``'s row for it (empty where there is none): ``render(row,
    display scale)``."""
    by_task = group.set_index("task")
    return [
        "" if t not in by_task.index else render(by_task.loc[t], display_scale(by_task.loc[t])) for t in tasks
    ]


def comparison_table(stats: pd.DataFrame) -> str:
    """Methods x tasks, the task metric (x100 for scores in [0, 1]) mean ± sd, and trainable %."""
    main = stats[stats["variant"] == ""]
    tasks = list(dict.fromkeys(main["task"]))
    header = "| method | trainable % | " + " | ".join(
        f"{t} ({main[main['task'] == t]['metric'].iloc[0]})" for t in tasks
    )
    lines = [header + " | mean |", "|---" * (len(tasks) + 3) + "|"]
    for method, group in main.groupby("method", sort=False):
        cells = task_cells(group, tasks, lambda r, scale: cell(r["mean"], r["sd"], scale))
        mean = np.mean([display_scale(r) * r["mean"] for _, r in group.iterrows()])
        lines.append(
            f"| {method} | {group['trainable_pct'].mean():.3f} | " + " | ".join(cells) + f" | {mean:.1f} |"
        )
    return "\n".join(lines)


def paired_differences(runs: pd.DataFrame, baseline: str = "lora") -> pd.DataFrame:
    """Per task and method (main runs): d_s = metric(method, s) − metric(baseline, s) over the seeds s
    both ran; the mean d̄, its 95 % interval d̄ ± t_{0.975, n−1} · sd(d) / √n (NaN for n < 2) and n.
    Pairing on seeds removes what the seed does to both (data order, initialisation)."""
    main = runs[runs["variant"] == ""]
    records = []
    for task, group in main.groupby("task", sort=False):
        metric = primary_metric(str(task), group.columns[group.notna().any()])
        values = group.pivot_table(index="seed", columns="method", values=metric, aggfunc="first")
        if baseline not in values.columns:
            continue
        for method in (m for m in dict.fromkeys(group["method"]) if m != baseline):
            pairs = values[[method, baseline]].dropna().astype(float)
            differences = (pairs[method] - pairs[baseline]).to_numpy()
            n = len(differences)
            mean = float(differences.mean()) if n else float("nan")
            half = float("nan")
            if n >= 2:
                half = float(scipy_stats.t.ppf(0.975, n - 1) * differences.std(ddof=1) / np.sqrt(n))
            records.append(
                {
                    "task": task,
                    "method": method,
                    "metric": metric.removeprefix("val/"),
                    "difference": mean,
                    "low": mean - half,
                    "high": mean + half,
                    "pairs": n,
                }
            )
    return pd.DataFrame(records)


def paired_table(differences: pd.DataFrame, baseline: str) -> str:
    """Methods x tasks: the mean paired difference to ``baseline`` [95 % interval] (x100 except
    perplexity), and the seed pairs."""
    tasks = list(dict.fromkeys(differences["task"]))
    lines = [
        "| method | " + " | ".join(f"{t} − {baseline} [95 % CI], pairs" for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]

    def paired_cell(r: pd.Series, scale: float) -> str:
        interval = "" if np.isnan(r["low"]) else f" [{scale * r['low']:+.1f}, {scale * r['high']:+.1f}]"
        return f"{scale * r['difference']:+.1f}{interval}, {r['pairs']}"

    for method, group in differences.groupby("method", sort=False):
        lines.append(f"| {method} | " + " | ".join(task_cells(group, tasks, paired_cell)) + " |")
    return "\n".join(lines)


def parameter_count(low: int, high: int) -> str:
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def cost_table(stats: pd.DataFrame) -> str:
    lines = [
        "| task | method | variant | trainable | wall (s) | CPU (s) | s / step | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in stats.iterrows():
        pace = "–" if np.isnan(r["s_per_step"]) else f"{r['s_per_step']:.3f}"  # NaN: under two logged steps
        lines.append(
            f"| {r['task']} | {r['method']} | {r['variant']} "
            f"| {parameter_count(r['trainable_min'], r['trainable_max'])} | {r['wall_s']:.0f} "
            f"| {r['cpu_s']:.0f} | {pace} | {r['seeds']} |"
        )
    return "\n".join(lines)


def variant_table(stats: pd.DataFrame) -> str:
    """Every variant beside its method's main runs on the same task."""
    lines = ["| task | method | variant | metric | mean ± sd | main run |", "|---|---|---|---|---|---|"]
    main = stats[stats["variant"] == ""].set_index(["task", "method"])
    for _, r in stats[stats["variant"] != ""].iterrows():
        scale = display_scale(r)
        reference = main.loc[(r["task"], r["method"])] if (r["task"], r["method"]) in main.index else None
        base = "" if reference is None else cell(reference["mean"], reference["sd"], scale)
        lines.append(
            f"| {r['task']} | {r['method']} | {r['variant']} | {r['metric']} "
            f"| {cell(r['mean'], r['sd'], scale)} | {base} |"
        )
    return "\n".join(lines)


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
    chosen = runs[(runs["method"] == method) & (runs["variant"] == variant)].sort_values("seed")
    return {task: Path(group["run_dir"].iloc[0]) for task, group in chosen.groupby("task", sort=False)}


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


def write_report(table: Path, title: str) -> Path:
    """``report.md`` and the figures beside ``table``; returns the report's path."""
    runs = pd.read_csv(table, keep_default_na=False, na_values=[""])
    if runs.empty:
        raise ValueError(f"{table} has no runs; run the grid first")
    runs["variant"] = runs["variant"].fillna("").astype(str)
    out = table.parent
    stats = summary(runs)
    comparison_figure(stats, out / "comparison.png")
    figures = ["comparison.png"]
    if fewshot_figure(stats, out / "fewshot.png"):
        figures.append("fewshot.png")
    figures += [p.name for p in ablation_figures(runs, out) + predictor_figures(runs, out)]
    sections = [
        f"# {title}",
        f"{len(runs)} runs from `{table.name}`; metrics are the last validation, x100 except perplexity.",
        "## Method comparison",
        comparison_table(stats),
    ]
    differences = paired_differences(runs)
    if not differences.empty:
        sections += [
            "## Paired differences to lora",
            "Per task: the method's metric minus lora's on the same seed, mean over the seeds both ran "
            "and its 95 % t-interval (none for one pair).",
            paired_table(differences, "lora"),
        ]
    sections += [
        "## Cost",
        cost_table(stats),
    ]
    if (stats["variant"] != "").any():
        sections += ["## Variants", variant_table(stats)]
    sections += ["## Figures", *(f"![{f}]({f})" for f in figures)]
    report = out / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    return report
