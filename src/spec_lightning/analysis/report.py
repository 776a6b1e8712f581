"""The reproduction report: tables and figures from a grid's ``results.csv`` (one row per run).

- the method comparison: the task metric per method and task, mean ± sd over seeds, its 95 %
  t-interval and the rank among the methods that learned; a cell whose runs all scored at or below
  the majority class (``majority`` in the CSV) says "did not learn" and is not ranked; with the
  trainable-parameter percentage (the GLUE table);
- paired differences to each baseline method (peft LoRA unless the grid names others): per task and
  variant, each method's metric minus the baseline's on the same seed, the mean difference and its
  95 % interval: a bootstrap over dev examples and seeds where every pair's predictions are in
  ``predictions/`` beside the CSV (accuracy), else Student's t over the seed pairs;
- convergence, where the grid committed learning curves (``curves/``): per method and task the last
  evaluation's mean ± sd over seeds, its change since the one before and whether the curve is still
  rising (:mod:`spec_lightning.analysis.convergence`);
- the claims: per paper claim (:class:`~spec_lightning.analysis.claims.Claim`), the paired difference
  of its method to each baseline it names, with the interval and the verdict read off it, and beside
  them, with ``compare_with``, the verdicts in another grid's runs (a shorter budget's);
- the tuning: the value a sweep chose per method and task, and every candidate's tuning score
  (``sweep.csv`` beside the CSV);
- the cost table: wall and CPU seconds of the whole run (CPU seconds stand in for energy: no power
  meter on CPU), seconds per optimiser step while training, and trainable parameters (their range
  over seeds where they differ: MFTC's search picks per seed);
- variants (ablations, few-shot subsets) against their method's main runs;
- figures: ``comparison.png`` (bars with the seed sd), ``fewshot.png`` (variants named
  ``fewshot<percent>``, with the main run as 100 %), ``ablation_<task>.png`` (the task-loss curves of
  the graph-spectral variants ``task_only``/``spectral_only`` against the joint objective) and
  ``mftc_predictor_<task>.png`` (MFTC's predicted against measured gains, first seed) and
  ``curves_<task>.png`` (the dev metric per method over the run, mean over seeds with a ± sd band).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from spec_lightning.analysis.claims import MIN_PAIRS, Claim, claim_verdicts, claims_table
from spec_lightning.analysis.convergence import (
    convergence_table,
    curves_figures,
    read_curves,
    verdicts_beside,
)
from spec_lightning.analysis.paired import paired_differences
from spec_lightning.analysis.report_figures import (
    ablation_figures,
    comparison_figure,
    fewshot_figure,
    predictor_figures,
)
from spec_lightning.analysis.statistics import (
    did_not_learn,
    display_scale,
    lower_is_better,
    primary_metric,
    t_interval,
)


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, variant): metric mean and sd over seeds, seeds, parameters and time."""
    records = []
    for (task, method, variant), group in runs.groupby(["task", "method", "variant"], sort=False):
        metric = primary_metric(task, group.columns[group.notna().any()])
        values = group[metric].astype(float)
        low, high = t_interval(values.to_numpy())
        majority = group["majority"].astype(float).max() if "majority" in group else float("nan")
        tuned = sorted(set(group["tuned"].dropna().astype(str)) - {""}) if "tuned" in group else []
        records.append(
            {
                "task": task,
                "method": method,
                "variant": variant,
                "metric": metric.removeprefix("val/"),
                "mean": values.mean(),
                "sd": values.std(ddof=1) if len(values) > 1 else float("nan"),
                "low": low,
                "high": high,
                "learned": metric != "val/accuracy"
                or np.isnan(majority)
                or not did_not_learn(values.to_numpy(), majority),
                "majority": majority,
                "tuned": ", ".join(tuned),
                "seeds": len(values),
                "alike": len(values) > 1 and values.nunique() == 1,
                "trainable_min": int(group["trainable"].min()),
                "trainable_max": int(group["trainable"].max()),
                "trainable_pct": 100 * float((group["trainable"] / group["total"]).mean()),
                "wall_s": float(group["wall_s"].mean()),
                "cpu_s": float(group["cpu_s"].astype(float).mean()),
                "s_per_step": float(group["s_per_step"].astype(float).mean()),
                "load_1m": float(group["load_1m"].astype(float).max())
                if "load_1m" in group
                else float("nan"),
            }
        )
    return pd.DataFrame(records)


def cell(mean: float, sd: float, scale: float) -> str:
    return f"{scale * mean:.1f}" + ("" if np.isnan(sd) else f" ± {scale * sd:.1f}")


def ranks(main: pd.DataFrame) -> pd.Series:
    """Per task, each learned cell's rank by mean (1 = best; lowest first for perplexity); NaN for
    cells that did not learn."""
    ranked = pd.Series(np.nan, index=main.index)
    for _, group in main[main["learned"]].groupby("task", sort=False):
        ascending = lower_is_better(str(group["metric"].iloc[0]))
        ranked[group.index] = group["mean"].rank(ascending=ascending, method="min")
    return ranked


def comparison_cell(r: pd.Series, scale: float) -> str:
    """mean ± sd [95 % t-interval] #rank; the value alone where every seed gave it (one run's value: a
    zero-width interval would claim a precision the seeds did not measure); or "did not learn" with the
    mean and the majority share."""
    if not r["learned"]:
        return f"did not learn ({scale * r['mean']:.1f}; majority {scale * r['majority']:.1f})"
    if r["alike"]:
        return f"{scale * r['mean']:.1f}, same with all {int(r['seeds'])} seeds #{int(r['rank'])}"
    interval = "" if np.isnan(r["low"]) else f" [{scale * r['low']:.1f}, {scale * r['high']:.1f}]"
    return cell(r["mean"], r["sd"], scale) + interval + f" #{int(r['rank'])}"


def task_cells(group: pd.DataFrame, tasks: list[str], render: Callable[[pd.Series, float], str]) -> list[str]:
    """One table cell per task from ``group``'s row for it (empty where there is none): ``render(row,
    display scale)``."""
    by_task = group.set_index("task")
    return [
        "" if t not in by_task.index else render(by_task.loc[t], display_scale(by_task.loc[t]["metric"]))
        for t in tasks
    ]


def comparison_table(stats: pd.DataFrame) -> str:
    """Methods x tasks: the task metric (x100 for scores in [0, 1]) mean ± sd [95 % interval] and rank,
    "did not learn" where no run beat the majority class; trainable % (:func:`trainable_shares`); the
    mean over the table's tasks, only for a method that learned on every one of them (a mean over fewer
    tasks would not compare across rows)."""
    main = stats[stats["variant"] == ""].copy()
    main["rank"] = ranks(main)
    tasks = list(dict.fromkeys(main["task"]))
    header = "| method | trainable % | " + " | ".join(
        f"{t} ({main[main['task'] == t]['metric'].iloc[0]})" for t in tasks
    )
    lines = [header + " | mean |", "|---" * (len(tasks) + 3) + "|"]
    for method, group in main.groupby("method", sort=False):
        cells = task_cells(group, tasks, comparison_cell)
        complete = group["learned"].all() and set(group["task"]) == set(tasks)
        mean = np.mean([display_scale(r["metric"]) * r["mean"] for _, r in group.iterrows()])
        overall = f"{mean:.1f}" if complete else "–"
        lines.append(
            f"| {method} | {trainable_shares(group, tasks)} | " + " | ".join(cells) + f" | {overall} |"
        )
    return "\n".join(lines)


def trainable_shares(group: pd.DataFrame, tasks: list[str]) -> str:
    """A method's trainable share in %: one value where it is the same on every task it ran, else one per
    task in the table's task order ("–" where it did not run), so a selection that depends on the task
    (MFTC's search) is not averaged away."""
    by_task = group.set_index("task")["trainable_pct"]
    shares = [f"{by_task[t]:.3f}" if t in by_task.index else "–" for t in tasks]
    ran = {s for s in shares if s != "–"}
    return ran.pop() if len(ran) == 1 else " / ".join(shares)


def paired_table(differences: pd.DataFrame, baseline: str) -> str:
    """Methods x tasks (and task/variant): the mean paired difference to ``baseline`` [95 % interval]
    (x100 except perplexity), the seed pairs, and "t" where the interval is Student's over seeds, not
    the bootstrap."""
    differences = differences.assign(
        task=[
            t if not v else f"{t}/{v}"
            for t, v in zip(differences["task"], differences["variant"], strict=True)
        ]
    )
    tasks = list(dict.fromkeys(differences["task"]))
    lines = [
        "| method | " + " | ".join(f"{t} − {baseline} [95 % CI], pairs" for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]

    def paired_cell(r: pd.Series, scale: float) -> str:
        interval = "" if np.isnan(r["low"]) else f" [{scale * r['low']:+.1f}, {scale * r['high']:+.1f}]"
        kind = " (t)" if r["interval"] == "t" and interval else ""
        return f"{scale * r['difference']:+.1f}{interval}{kind}, {r['pairs']}"

    for method, group in differences.groupby("method", sort=False):
        lines.append(f"| {method} | " + " | ".join(task_cells(group, tasks, paired_cell)) + " |")
    return "\n".join(lines)


def sweep_table(sweep: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Per task and method: each candidate's tuning score (mean over the sweep's seeds, x100 except
    perplexity) and the value the method's reported ``runs`` on the task used, in bold ("pending" before
    the first of them has run)."""
    main = runs[runs["variant"] == ""] if "tuned" in runs else runs.iloc[:0]
    used = {
        key: sorted(set(group["tuned"].dropna().astype(str)) - {""})
        for key, group in main.groupby(["task", "method"], sort=False)
    }
    lines = ["| task | method | candidates (tuning split) | chosen |", "|---|---|---|---|"]
    for (task, method), group in sweep.groupby(["task", "method"], sort=False):
        metric = primary_metric(str(task), group.columns[group.notna().any()])
        scores = group.groupby("tuned", sort=False)[metric].mean()
        chosen = used.get((task, method), [])
        scale = 1.0 if lower_is_better(metric) else 100.0
        listed = ", ".join(
            f"**{v}: {scale * x:.1f}**" if v in chosen else f"{v}: {scale * x:.1f}" for v, x in scores.items()
        )
        lines.append(f"| {task} | {method} | {listed} | {', '.join(chosen) or 'pending'} |")
    return "\n".join(lines)


def parameter_count(low: int, high: int) -> str:
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def cost_table(stats: pd.DataFrame) -> str:
    """Per cell: trainable parameters, mean wall and CPU seconds, seconds per step and its ratio to full
    fine-tuning's on the same task and variant, and the highest 1-minute load average at the end of its
    runs (above the runs' threads: the times are not clean)."""
    lines = [
        "| task | method | variant | trainable | wall (s) | CPU (s) | s / step | x full | load | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = stats[stats["method"] == "full"].set_index(["task", "variant"])["s_per_step"]
    for _, r in stats.iterrows():
        pace = "–" if np.isnan(r["s_per_step"]) else f"{r['s_per_step']:.3f}"  # NaN: under two logged steps
        ratio = r["s_per_step"] / full.get((r["task"], r["variant"]), np.nan)
        load = "–" if np.isnan(r["load_1m"]) else f"{r['load_1m']:.1f}"
        lines.append(
            f"| {r['task']} | {r['method']} | {r['variant']} "
            f"| {parameter_count(r['trainable_min'], r['trainable_max'])} | {r['wall_s']:.0f} "
            f"| {r['cpu_s']:.0f} | {pace} | {'–' if np.isnan(ratio) else f'{ratio:.2f}'} | {load} "
            f"| {r['seeds']} |"
        )
    return "\n".join(lines)


def variant_table(stats: pd.DataFrame) -> str:
    """Every variant beside its method's main runs on the same task."""
    lines = ["| task | method | variant | metric | mean ± sd | main run |", "|---|---|---|---|---|---|"]
    main = stats[stats["variant"] == ""].set_index(["task", "method"])
    for _, r in stats[stats["variant"] != ""].iterrows():
        scale = display_scale(r["metric"])
        reference = main.loc[(r["task"], r["method"])] if (r["task"], r["method"]) in main.index else None
        base = "" if reference is None else cell(reference["mean"], reference["sd"], scale)
        lines.append(
            f"| {r['task']} | {r['method']} | {r['variant']} | {r['metric']} "
            f"| {cell(r['mean'], r['sd'], scale)} | {base} |"
        )
    return "\n".join(lines)


def findings(
    runs: pd.DataFrame,
    stats: pd.DataFrame,
    out: Path,
    baselines: Sequence[str] = ("lora",),
    claims: Sequence[Claim] = (),
    compare_with: Path | None = None,
) -> list[tuple[str, str, str]]:
    """(heading, legend, table) of the comparison, the convergence of the committed learning curves, the
    claims' verdicts (beside those of the grid whose ``results.csv`` is ``compare_with``), the paired
    differences to each baseline, the tuning and the variants: what ``report.md`` and the README show."""
    sections = [
        (
            "Method comparison",
            "mean ± sd over seeds [95 % t-interval of the mean] #rank among the methods that learned; "
            '"did not learn": no seed scored above always answering the majority class; "same with all '
            'N seeds": every seed gave the same value (nothing a seed sets, initialisation or dropout, '
            "reaches the run; data order and splits follow the data seed), one run's value; trainable %: "
            "one value per task, in the columns' order, where they differ; mean: over the tasks, for "
            "the methods that learned on all of them.",
            comparison_table(stats),
        )
    ]
    curves = read_curves(out, runs)
    if curves:
        sections.append(
            (
                "Convergence",
                "The dev metric at the last evaluation, mean ± sd over seeds, and its change since the "
                "evaluation before; **still rising** where that change is larger than the seeds' sd (the "
                "curve had not flattened: a longer budget may change the cell), settled where it is not. "
                "`curves_<task>.png` draws every evaluation.",
                convergence_table(curves),
            )
        )
    wanted = dict.fromkeys([*baselines, *(b for claim in claims for b in claim.against)])
    paired = {b: paired_differences(runs, b, predictions=out / "predictions") for b in wanted}
    if claims and compare_with is not None:
        beside = claims_beside(list(claims), paired, stats, compare_with)
        if beside:
            sections.append(
                (
                    f"Verdicts beside {compare_with.parent.name}",
                    f"Each claim's verdict in {compare_with.parent.name}'s runs (its shorter budget) and "
                    "here, on the same task and baseline; changed: the verdict's kind (holds, does not "
                    "hold, not shown, no evidence, pending) differs.",
                    beside,
                )
            )
    if claims:
        sections.append(
            (
                "Claims",
                "Each paper's claim against its baselines in the same harness: the method's metric minus "
                "the baseline's on the same seed, mean over the seed pairs, with its 95 % interval (as "
                f"in the paired differences below). It holds where the interval excludes 0 on the "
                f"method's side; under {MIN_PAIRS} seed pairs the verdict waits.",
                claims_table(list(claims), paired, stats),
            )
        )
    for baseline in baselines:
        differences = paired[baseline]
        if differences.empty:
            continue
        sections.append(
            (
                f"Paired differences to {baseline}",
                f"Per task (and variant, against {baseline}'s runs of the same variant): the method's "
                f"metric minus {baseline}'s on the same seed, mean over the seeds both ran, and its 95 % "
                "interval: a bootstrap over dev examples and seeds (10,000 resamples), or Student's t over "
                "the seed pairs where marked (t) (no interval for one pair).",
                paired_table(differences, baseline),
            )
        )
    if (out / "sweep.csv").is_file():
        sweep = pd.read_csv(out / "sweep.csv", keep_default_na=False, na_values=[""]).astype({"tuned": str})
        sections.append(
            (
                "Tuning",
                "Each candidate on the tuning split held out of the training data (never the reported "
                "split), mean over the sweep's seeds; in bold the value the runs above used (the best "
                "candidate, the first of equals), pending until they run.",
                sweep_table(sweep, runs),
            )
        )
    if (stats["variant"] != "").any():
        sections.append(("Variants", "Each variant beside its method's main runs.", variant_table(stats)))
    return sections


def read_runs(table: Path) -> pd.DataFrame:
    """A grid's ``results.csv``, empty cells as NaN and ``variant`` as text ("" for the main runs)."""
    runs = pd.read_csv(table, keep_default_na=False, na_values=[""])
    runs["variant"] = runs["variant"].astype(object).fillna("").astype(str)  # all-empty: read as NaN
    return runs


def claims_beside(
    claims: list[Claim], paired: dict[str, pd.DataFrame], stats: pd.DataFrame, other: Path
) -> str:
    """The claims' verdicts here beside those in the grid whose ``results.csv`` is ``other``."""
    if not other.is_file():
        raise FileNotFoundError(f"{other} does not exist: compare_with names another grid's results.csv")
    theirs = read_runs(other)
    baselines = dict.fromkeys(b for claim in claims for b in claim.against)
    their_paired = {
        b: paired_differences(theirs, b, predictions=other.parent / "predictions") for b in baselines
    }
    there = claim_verdicts(claims, their_paired, summary(theirs))
    return verdicts_beside(claim_verdicts(claims, paired, stats), there, other.parent.name)


def update_readme(readme: Path, name: str, text: str) -> None:
    """Replace what lies between the README's ``<!-- report:<name> -->`` and ``<!-- /report:<name> -->``
    lines with ``text``."""
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    content = readme.read_text()
    if content.count(start) != 1 or content.count(end) != 1 or content.index(start) > content.index(end):
        raise ValueError(
            f"{readme} needs one {start!r} line and, after it, one {end!r} line around the place of the "
            f"{name} tables"
        )
    head, rest = content.split(start)
    readme.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end)[1]}")


def write_report(
    table: Path,
    title: str,
    readme: Path | None = None,
    baselines: Sequence[str] = ("lora",),
    claims: Sequence[Claim] = (),
    compare_with: Path | None = None,
) -> Path:
    """``report.md`` and the figures beside ``table``, with the ``claims``' verdicts and paired
    differences to each of ``baselines``; with ``readme``, its ``report:<title>`` block gets the
    comparison, claims, paired-difference, tuning and variant tables. Returns the report's path."""
    if not table.is_file():
        raise FileNotFoundError(f"{table} does not exist: no reported run has finished; run the grid first")
    runs = read_runs(table)
    if runs.empty:
        raise ValueError(f"{table} has no runs; run the grid first")
    out = table.parent
    stats = summary(runs)
    comparison_figure(stats, out / "comparison.png")
    figures = ["comparison.png"]
    if fewshot_figure(stats, out / "fewshot.png"):
        figures.append("fewshot.png")
    figures += [p.name for p in ablation_figures(runs, out) + predictor_figures(runs, out)]
    figures += [p.name for p in curves_figures(read_curves(out, runs), out)]
    logs_here = sum(Path(d).is_dir() for d in runs["run_dir"])
    found = findings(runs, stats, out, baselines, claims, compare_with)
    sections = [
        f"# {title}",
        f"{len(runs)} runs from `{table.name}`; metrics are the last validation, x100 except perplexity.",
        *(part for heading, legend, body in found for part in (f"## {heading}", legend, body)),
        "## Cost",
        cost_table(stats),
        "## Figures",
        *(f"![{f}]({f})" for f in figures),
    ]
    if logs_here < len(runs):
        sections.append(
            f"{len(runs) - logs_here} of the {len(runs)} runs' TensorBoard logs are not on this machine: the "
            "figures drawn from them (training curves, MFTC's predictor) leave those runs out."
        )
    report = out / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    if readme is not None:
        note = (
            f"{len(runs)} runs; generated from `{table}` (`report.md` beside it has the costs and figures)."
        )
        blocks = [
            note,
            *(part for heading, legend, body in found for part in (f"**{heading}.** {legend}", body)),
        ]
        update_readme(readme, title, "\n\n".join(blocks))
    return report
