"""``spec-lightning reproduce``: run a grid of methods x tasks x seeds from YAML, collect one CSV, render
the report.

A grid file names the configs of every run (``base_configs``) and, per method, those added
after them (``{task}`` is filled in with the task), the tasks, the seeds, the arguments added to
every run (``overrides``, e.g. a smaller training set) or to one method's runs
(``method_overrides``), and optional ``variants``: extra runs of some methods on some tasks with
overlay configs (few-shot subsets, ablations). Every run is ``spec-lightning fit`` in its own
process, logged as ``<logs>/<method>-<task>[-<variant>]/seed<seed>``; a run that has finished
(``checkpoints/last.ckpt`` and a row in the CSV) is not run again, so an interrupted grid
resumes. ``results.csv`` gets one row per run: the final ``val/*`` metrics, trainable and total
parameters, optimiser steps, wall and CPU seconds of the process and seconds per step between the
first and last logged training steps; :mod:`spec_lightning.analysis.report`
turns it into ``report.md`` and figures::

    spec-lightning reproduce --grid configs/reproduce/glue_small.yaml
    spec-lightning reproduce --grid configs/reproduce/glue_small.yaml --report_only
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from spec_lightning.analysis.curves import read_scalars, seconds_per_step
from spec_lightning.analysis.report import write_report
from spec_lightning.checkpoints import load_checkpoint


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
    logs: str = "logs/reproduce"
    output: str = "reports"
    threads: int = 2

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
        grid = cls(methods=methods, variants=variants, **raw)
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
        missing = sorted({str(c) for run in self.runs() for c in run.configs if not c.is_file()})
        if missing:
            raise FileNotFoundError(f"grid {self.name!r}: config files {missing} do not exist")

    def runs(self) -> list[Run]:
        """Every run of the grid, task by task, then method, variant and seed."""
        out = []
        for task in self.tasks:
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


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    variant: str
    seed: int
    configs: list[Path]

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.method, self.task, self.variant) if p)

    @property
    def version(self) -> str:
        return f"seed{self.seed}"

    def directory(self, logs: Path) -> Path:
        return logs / self.name / self.version

    def command(self, grid: Grid) -> list[str]:
        args = [sys.executable, "-m", "spec_lightning", "fit"]
        args += [a for c in self.configs for a in ("--config", str(c))]
        return args + [
            f"--seed_everything={self.seed}",
            f"--trainer.logger.init_args.save_dir={grid.logs}",
            f"--trainer.logger.init_args.name={self.name}",
            f"--trainer.logger.init_args.version={self.version}",
            *grid.overrides,
            *grid.method_overrides.get(self.method, []),
        ]


def collect(run: Run, logs: Path, wall_s: float, cpu_s: float) -> dict[str, object]:
    """The CSV row of a finished run, from its TensorBoard scalars; ``cpu_s`` is the CPU time (user +
    system) of its process, the energy proxy on a machine without a power meter."""
    scalars = read_scalars(run.directory(logs))
    checkpoint = load_checkpoint(run.directory(logs) / "checkpoints" / "last.ckpt")
    steps = int(checkpoint["global_step"])
    row: dict[str, object] = {
        "task": run.task,
        "method": run.method,
        "variant": run.variant,
        "seed": run.seed,
        "trainable": int(scalars["params/trainable"][0][1]),
        "total": int(scalars["params/total"][0][1]),
        "steps": steps,
        "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),
        "s_per_step": round(seconds_per_step(run.directory(logs)), 4),
        "run_dir": str(run.directory(logs)),
    }
    if "module_search/trainable_parameters" in scalars:  # MFTC trains the selection after its search
        row["trainable"] = int(scalars["module_search/trainable_parameters"][-1][1])
    row |= {tag: round(points[-1][1], 6) for tag, points in sorted(scalars.items()) if tag.startswith("val/")}
    return row


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """All rows, with the union of their columns (metrics differ between tasks); written atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".csv.tmp")
    with staging.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(path)


def run_grid(grid: Grid, dry_run: bool = False) -> Path:
    """Run every unfinished run, appending its row to ``<output>/<name>/results.csv``; returns the CSV."""
    logs, table = Path(grid.logs), Path(grid.output) / grid.name / "results.csv"
    rows = read_rows(table)
    done = {(r["task"], r["method"], r["variant"], int(r["seed"])) for r in rows}
    env = {**os.environ, "OMP_NUM_THREADS": str(grid.threads)}
    for run in grid.runs():
        key = (run.task, run.method, run.variant, run.seed)
        if key in done and (run.directory(logs) / "checkpoints" / "last.ckpt").is_file():
            continue
        command = run.command(grid)
        print(" ".join(command[2:]), flush=True)
        if dry_run:
            continue
        start, cpu = time.perf_counter(), children_cpu_seconds()
        subprocess.run(command, check=True, env=env)
        wall_s, cpu_s = time.perf_counter() - start, children_cpu_seconds() - cpu
        rows = [r for r in rows if (r["task"], r["method"], r["variant"], int(r["seed"])) != key]
        rows.append(collect(run, logs, wall_s, cpu_s))
        write_rows(table, rows)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spec-lightning reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="the grid YAML (configs/reproduce/)")
    parser.add_argument(
        "--report_only", action="store_true", help="render the report from the CSV, run nothing"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands of the runs still to do")
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
        print(f"wrote {write_report(table, grid.name)}")
