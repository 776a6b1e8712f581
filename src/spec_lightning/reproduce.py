"""``spec-lightning reproduce``: run a grid of methods x tasks x seeds from YAML, collect one CSV, render
the report.

A grid file names the configs of every run (``base_configs``) and, per method, those added
after them (``{task}`` is filled in with the task), the tasks, the seeds, the arguments added to
every run (``overrides``, e.g. a smaller training set) or to one method's runs
(``method_overrides``), the ``baselines`` the report pairs every method with (``[lora]`` by default),
the papers' ``claims`` it tests (method, baselines it should beat, in which variants),
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
    spec-lightning reproduce --grid configs/reproduce/cpu_glue.yaml --report_only --readme README.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from spec_lightning.analysis.claims import Claim
from spec_lightning.analysis.paired import run_name
from spec_lightning.analysis.report import write_report
from spec_lightning.records import (
    children_cpu_seconds,
    collect,
    curves_of,
    read_rows,
    write_json,
    write_rows,
)
from spec_lightning.sweep import Sweep

#: Added to every run's callbacks: the report's bootstrap needs each example's prediction.
PREDICTIONS_CALLBACK = "--trainer.callbacks+=spec_lightning.ValidationPredictions"
#: A tuned method's value in a dry run before its sweep has finished.
PENDING = "<the sweep's choice>"


@dataclass(frozen=True)
class Variant:
    """Extra runs: ``methods`` on ``tasks`` with ``overlays`` added after the method's configs, for
    ``seeds`` (the grid's seeds when not given)."""

    overlays: list[str]
    methods: list[str]
    tasks: list[str]
    seeds: list[int] | None = None


@dataclass(frozen=True)
class Grid:
    """A reproduction grid (see the module docstring); paths are relative to the working directory."""

    name: str
    methods: dict[str, list[str]]
    tasks: list[str]
    base_configs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    sweep: Sweep | None = None
    logs: str = "logs/reproduce"
    output: str = "reports"
    threads: int = 2
    keep_checkpoints: bool = True
    baselines: list[str] = field(default_factory=lambda: ["lora"])
    claims: list[Claim] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        raw = yaml.safe_load(Path(path).read_text())
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"{path}: unknown grid keys {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        methods = {m: [c] if isinstance(c, str) else list(c) for m, c in raw.pop("methods").items()}
        variants = {name: Variant(**v) for name, v in raw.pop("variants", {}).items()}
        sweep = Sweep(**raw.pop("sweep")) if "sweep" in raw else None
        claims = [Claim(**c) for c in raw.pop("claims", [])]
        grid = cls(methods=methods, variants=variants, sweep=sweep, claims=claims, **raw)
        grid.check()
        return grid

    def check(self) -> None:
        """Every config of every run exists, and variants and method overrides name known methods."""
        for variant_name, variant in self.variants.items():
            unknown = sorted(set(variant.methods) - set(self.methods))
            if unknown:
                raise ValueError(f"variant {variant_name!r} names methods {unknown} the grid does not define")
        unknown = sorted(set(self.method_overrides) - set(self.methods))
        if unknown:
            raise ValueError(f"method_overrides names methods {unknown} the grid does not define")
        unknown = sorted(set(self.baselines) - set(self.methods))
        if unknown:
            raise ValueError(f"baselines names methods {unknown} the grid does not define")
        for claim in self.claims:
            unknown = sorted({claim.method, *claim.against} - set(self.methods))
            if unknown:
                raise ValueError(f"claim {claim.claim!r} names methods {unknown} the grid does not define")
            unknown = sorted(set(claim.variants) - {"", *self.variants})
            if unknown:
                raise ValueError(
                    f'claim {claim.claim!r} names variants {unknown} the grid does not define ("" is the '
                    "main runs)"
                )
        if self.sweep is not None:
            unknown = sorted(set(self.sweep.values) - set(self.methods))
            if unknown:
                raise ValueError(f"sweep names methods {unknown} the grid does not define")
            empty = sorted(m for m, candidates in self.sweep.values.items() if not candidates)
            if empty:
                raise ValueError(f"sweep lists no candidate values for {empty}")
            words = sorted(
                m for m, c in self.sweep.values.items() if not all(isinstance(v, int | float) for v in c)
            )
            if self.sweep.extend and words:
                raise ValueError(f"sweep.extend needs numeric candidates; {words} list others")
            if not any("validate_on=tuning" in o for o in self.sweep.overrides):
                raise ValueError(
                    "the sweep's overrides do not validate on the tuning split, so it would choose on the "
                    "reported split; add --data.init_args.validate_on=tuning to sweep.overrides and hold "
                    "out the split in every run (data.init_args.tuning_size)"
                )
        missing = sorted({str(c) for run in self.runs() for c in run.configs if not c.is_file()})
        if missing:
            raise FileNotFoundError(f"grid {self.name!r}: config files {missing} do not exist")

    def runs(self) -> list[Run]:
        """Every run of the grid, task by task: the task's tuning runs (method, candidate, seed), then
        its runs by method, variant and seed."""
        out = []
        for task in self.tasks:
            for method, candidates in (self.sweep.values if self.sweep else {}).items():
                for value in candidates:
                    out += self.tuning_runs(task, method, str(value))
            for method, configs in self.methods.items():
                base = [Path(c.format(task=task)) for c in [*self.base_configs, *configs]]
                settings = [("", [], self.seeds)] + [
                    (name, [Path(o.format(task=task)) for o in v.overlays], v.seeds or self.seeds)
                    for name, v in self.variants.items()
                    if method in v.methods and task in v.tasks
                ]
                for variant, overlays, seeds in settings:
                    for seed in seeds:
                        out.append(Run(task, method, variant, seed, base + overlays))
        return out

    def tuning_runs(self, task: str, method: str, value: str) -> list[Run]:
        """The sweep's runs of one candidate ``value`` of ``method`` on ``task``, one per sweep seed."""
        assert self.sweep is not None
        base = [Path(c.format(task=task)) for c in [*self.base_configs, *self.methods[method]]]
        return [Run(task, method, f"tune_{value}", seed, base, value) for seed in self.sweep.seeds]


@dataclass(frozen=True)
class Run:
    """One ``spec-lightning fit``; ``candidate`` is the swept value of a tuning run (None otherwise)."""

    task: str
    method: str
    variant: str
    seed: int
    configs: list[Path]
    candidate: str | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.task, self.method, self.variant, self.seed

    @property
    def name(self) -> str:
        return run_name(self.method, self.task, self.variant)

    @property
    def version(self) -> str:
        return f"seed{self.seed}"

    def directory(self, logs: Path) -> Path:
        return logs / self.name / self.version

    def fingerprint(self, grid: Grid, tuned: str | None = None) -> str:
        """A digest of what the run trains: the contents of its config files, parsed (so comments and
        layout do not count), and its :meth:`arguments` (with the contents of any ``--config=FILE``
        among them)."""
        configs = [yaml.safe_load(c.read_text()) for c in self.configs]
        arguments = self.arguments(grid, tuned)
        payload: dict[str, object] = {"configs": configs, "arguments": arguments}
        named = [a.split("=", 1)[1] for a in arguments if a.startswith("--config=")]
        if named:  # a config file among the arguments (a sweep's budget overlay) counts by its contents too
            payload["argument_configs"] = [yaml.safe_load(Path(f).read_text()) for f in named]
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def command(self, grid: Grid, tuned: str | None = None) -> list[str]:
        """The run's command line: its configs, the folder its logs go to, then its :meth:`arguments`."""
        configs = [a for c in self.configs for a in ("--config", str(c))]
        logs = f"--trainer.logger.init_args.save_dir={grid.logs}"
        return [sys.executable, "-m", "spec_lightning", "fit", *configs, logs, *self.arguments(grid, tuned)]

    def arguments(self, grid: Grid, tuned: str | None = None) -> list[str]:
        """The run's arguments after its configs, but its logs folder; ``tuned``: the sweep's choice for a
        run that is not itself tuning."""
        args = [
            f"--seed_everything={self.seed}",
            f"--trainer.logger.init_args.name={self.name}",
            f"--trainer.logger.init_args.version={self.version}",
            PREDICTIONS_CALLBACK,
            *grid.overrides,
            *grid.method_overrides.get(self.method, []),
        ]
        if grid.sweep is not None and self.candidate is not None:
            overrides = [o.format(task=self.task) for o in grid.sweep.overrides]
            args += [*overrides, f"--{grid.sweep.argument}={self.candidate}"]
        elif grid.sweep is not None and tuned is not None:
            args.append(f"--{grid.sweep.argument}={tuned}")
        return args


def row_key(row: dict[str, object]) -> tuple[str, str, str, int]:
    return str(row["task"]), str(row["method"]), str(row["variant"]), int(str(row["seed"]))


def made_by(row: dict[str, str], run: Run, grid: Grid, tuned: str | None = None) -> bool:
    """Whether ``row`` records ``run``'s digest as it is now, or none (a row written before digests)."""
    return row.get("config", "") in ("", run.fingerprint(grid, tuned))


def outdated_tuning_row(grid: Grid, row: dict[str, str]) -> bool:
    """Whether a sweep row records another digest than its run's now (printed); rows of runs the grid no
    longer has, and rows without a digest, are kept."""
    if grid.sweep is None or row["task"] not in grid.tasks or row["method"] not in grid.sweep.values:
        return False
    runs = [
        r for r in grid.tuning_runs(row["task"], row["method"], row["tuned"]) if r.seed == int(row["seed"])
    ]
    if not runs or made_by(row, runs[0], grid):
        return False
    print(
        f"{runs[0].name} {runs[0].version}: its row was made with other configs or arguments; dropped",
        flush=True,
    )
    return True


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
        rows[tuning].append(
            collect(run, logs, wall_s, cpu_s, tuned) | {"config": run.fingerprint(grid, tuned)}
        )
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
        print(f"wrote {write_report(table, grid.name, args.readme, grid.baselines, grid.claims)}")
