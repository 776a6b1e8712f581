"""``spec-lightning reproduce``: run a grid of methods x tasks x seeds from YAML, collect one CSV, render
the report.

A grid file names the configs of every run (``base_configs``) and, per method, those added
after them (``{task}`` is filled in with the task), the tasks, the seeds, the arguments added to
every run (``overrides``, e.g. a smaller training set) or to one method's runs
(``method_overrides``), the ``baselines`` the report pairs every method with (``[lora]`` by default),
the papers' ``claims`` it tests (method, baselines it should beat, in which variants), optionally
``compare_with``: another grid's ``results.csv`` whose verdicts on the same claims the report sets beside
this grid's (a shorter budget's, say),
and optional ``variants``: extra runs of some methods on some tasks with
overlay configs (few-shot subsets, ablations), and an optional ``sweep``: candidate values of one
argument per method (e.g. the learning rate), each run on a tuning split held out of the training
data, never on the reported split; per method and task the best candidate is passed to the method's
runs and recorded. Every run is ``spec-lightning fit`` in its own process, logged as
``<logs>/<method>-<task>[-<variant>]/seed<seed>``, with :class:`~spec_lightning.ValidationPredictions`
added to its callbacks.

``results.csv`` gets one row per run as it finishes (``sweep.csv`` one per tuning run): the final
``val/*`` metrics, the majority-class share of the validation labels, the tuned value, trainable and
total parameters, optimiser steps, wall and CPU seconds of the process, seconds per step between the
first and last logged training steps and the machine's 1-minute load average when it ended (above the
run's threads: something else was running, and the times are not clean). Each run's validation
predictions are copied to ``predictions/<run>-seed<seed>.npz`` beside the CSV and its learning
curves (every ``val/*`` metric and ``train/loss`` by optimiser step) to ``curves/<run>-seed<seed>.json``.
A run with a row is finished and is not run again, so a grid whose output folder is committed resumes on
another machine (the TensorBoard logs stay behind; the figures that read them are left out there), unless
what the run trains changed since: each row records its run's ``config``, a digest of the contents of its
config files and its arguments (see :meth:`Run.fingerprint`), and a run whose row has another digest (or,
for a tuned method, another tuned value) runs again and replaces it; a tuning row out of date is dropped
when the grid starts, so the sweep chooses from current runs only. Rows written before the digest was
recorded are taken as they are. With
``keep_checkpoints: false`` a run's checkpoints are deleted once its row is written.
:mod:`spec_lightning.analysis.report` turns the CSVs into ``report.md`` and figures::

    spec-lightning reproduce --grid configs/reproduce/glue_small.yaml
    spec-lightning reproduce --grid configs/reproduce/glue_small.yaml --report_only
    spec-lightning reproduce --grid configs/reproduce/cpu_glue.yaml --report_only \
        --readme docs/results/grids.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from spec_lightning.analysis.report import write_report
from spec_lightning.experiments.grid import PENDING, Grid, Run, made_by, outdated_tuning_row, row_key
from spec_lightning.experiments.records import (
    children_cpu_seconds,
    collect,
    curves_of,
    read_rows,
    write_json,
    write_rows,
)


def run_grid(grid: Grid, dry_run: bool = False) -> Path:
    """Run every run without a row, appending its row to ``<output>/<name>/results.csv`` (tuning runs:
    ``sweep.csv``) and copying its predictions; returns ``results.csv``. Before the first run of a
    tuned method on a task, the sweep's extensions for it run."""
    logs, out = Path(grid.logs), Path(grid.output) / grid.name
    tables = {False: out / "results.csv", True: out / "sweep.csv"}
    rows = {tuning: read_rows(path) for tuning, path in tables.items()}
    rows[True] = [r for r in rows[True] if not outdated_tuning_row(grid, r)]
    env = {**os.environ, "OMP_NUM_THREADS": str(grid.threads)}

    def finished(run: Run, tuned: str | None = None) -> bool:
        """Whether ``run`` has a row that is still current (tuning rows were checked when the grid
        started); a run that is not is announced. ``tuned``: the sweep's choice for a tuned method's run,
        :data:`PENDING` in a dry run before the sweep has finished."""
        row = next((r for r in rows[run.candidate is not None] if row_key(r) == run.key), None)
        if row is None or run.candidate is not None or tuned == PENDING:
            return row is not None
        if row.get("tuned", "") == (tuned or "") and made_by(row, run, grid, tuned):
            return True
        print(
            f"{run.name} {run.version}: its row was made with other configs, arguments or tuned value; "
            "it runs again",
            flush=True,
        )
        return False

    def execute(run: Run, tuned: str | None = None) -> None:
        tuning = run.candidate is not None
        command = run.command(grid, tuned)
        print(" ".join(command[2:]), flush=True)
        if dry_run:
            return
        if run.directory(logs).exists():  # an interrupted attempt: its event files would mix with this run's
            print(f"removing {run.directory(logs)}, left by an unfinished attempt", flush=True)
            shutil.rmtree(run.directory(logs))
        start, cpu = time.perf_counter(), children_cpu_seconds()
        subprocess.run(command, check=True, env=env)
        wall_s, cpu_s = time.perf_counter() - start, children_cpu_seconds() - cpu
        predictions = run.directory(logs) / "predictions.npz"
        if not tuning and predictions.is_file():
            (out / "predictions").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(predictions, out / "predictions" / f"{run.name}-{run.version}.npz")
        if not tuning and any(run.directory(logs).glob("events.out.tfevents.*")):  # the learning curves,
            # committed with the rows (the event files stay on this machine)
            write_json(out / "curves" / f"{run.name}-{run.version}.json", curves_of(run.directory(logs)))
        rows[tuning] = [r for r in rows[tuning] if row_key(r) != run.key]
        row = collect(run, logs, wall_s, cpu_s, tuned) | {"config": run.fingerprint(grid, tuned)}
        rows[tuning].append({key: str(value) for key, value in row.items()})  # as read back from the CSV
        write_rows(tables[tuning], rows[tuning])
        if not grid.keep_checkpoints:  # a full fine-tuning checkpoint with Adam's moments is ~270 MB
            shutil.rmtree(run.directory(logs) / "checkpoints", ignore_errors=True)

    for run in grid.runs():
        tuned = None
        if grid.sweep is not None and run.candidate is None and run.method in grid.sweep.values:
            while not dry_run and (extra := grid.sweep.next_extension(rows[True], run.task, run.method)):
                for extension in grid.tuning_runs(run.task, run.method, extra):
                    if not finished(extension):
                        execute(extension)
            tuned = grid.sweep.chosen(rows[True], run.task, run.method)
            if tuned is None and not dry_run:
                raise RuntimeError(f"{run.name}: the sweep of {run.method} on {run.task} has not finished")
            tuned = tuned or PENDING
        if not finished(run, tuned):
            execute(run, tuned)
    return tables[False]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spec-lightning reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="the grid YAML (configs/reproduce/)")
    parser.add_argument(
        "--report_only", action="store_true", help="render the report from the CSV, run nothing"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands of the runs still to do")
    parser.add_argument(
        "--readme",
        type=Path,
        help="also put the report's tables in this file, between <!-- report:<grid name> --> and "
        "<!-- /report:<grid name> -->",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run these seeds instead of the grid's (variants with own seeds keep them)",
    )
    args = parser.parse_args(argv)
    grid = Grid.load(args.grid)
    if args.seeds:
        grid = replace(grid, seeds=args.seeds)
    table = Path(grid.output) / grid.name / "results.csv"
    if not args.report_only:
        table = run_grid(grid, dry_run=args.dry_run)
    if not args.dry_run:
        other = Path(grid.compare_with) if grid.compare_with else None
        report = write_report(table, grid.name, args.readme, grid.baselines, grid.claims, other)
        print(f"wrote {report}")
