"""The shipped learning rates, from the evidence: each ``configs/method/<method>.yaml`` learning rate is the
lower median of the values the tuned grids' sweeps chose for that method, one choice per grid and task
(:meth:`~spec_lightning.experiments.sweep.Sweep.chosen` on the committed ``sweep.csv``; a sweep still
running counts once it has chosen). Its header names the choices and the command::

    python -m spec_lightning.experiments.defaults            # check: exit 1 where a config differs
    python -m spec_lightning.experiments.defaults --write    # set them (and their headers)

The lower median of an even count is the smaller middle value: a too-low rate learns slowly, a too-high
one can stay at the majority class (the tuning tables show both).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from spec_lightning.analysis.statistics import lower_is_better, primary_metric
from spec_lightning.experiments.grid import Grid
from spec_lightning.experiments.records import read_rows

#: The grids whose sweeps decide the defaults, shortest budget first.
TUNED_GRIDS = (
    "configs/reproduce/cpu_glue.yaml",
    "configs/reproduce/cpu_lm.yaml",
    "configs/reproduce/converged.yaml",
)
#: The key every tuned grid sweeps, and the one the method configs ship.
ARGUMENT = "model.init_args.learning_rate"
HEADER = "# Shipped learning rate"


@dataclass(frozen=True)
class Choice:
    """One sweep's choice: the grid, the task, the chosen value and its tuning-split score (x100 but for
    perplexity and losses)."""

    grid: str
    task: str
    value: float
    score: float


def choices(root: Path, grids: Sequence[str] = TUNED_GRIDS) -> dict[str, list[Choice]]:
    """Per method, every choice the ``grids`` (paths under ``root``) have made so far."""
    found: dict[str, list[Choice]] = {}
    for name in grids:
        grid = Grid.load(root / name)
        if grid.sweep is None or grid.sweep.argument != ARGUMENT:
            raise ValueError(f"{name}: it does not sweep {ARGUMENT}, so it cannot decide a learning rate")
        rows = read_rows(root / grid.output / grid.name / "sweep.csv")
        for task in grid.tasks:
            for method in grid.sweep.values:
                value = grid.sweep.chosen(rows, task, method)
                if value is None:
                    continue
                mine = [r for r in rows if r["task"] == task and r["method"] == method]
                metric = primary_metric(task, [k for k in mine[0] if mine[0][k] != ""])
                score = abs((grid.sweep.scores(rows, task, method) or {})[value])
                score *= 1.0 if lower_is_better(metric) else 100.0
                found.setdefault(method, []).append(Choice(grid.name, task, float(value), score))
    return found


def lower_median(values: Sequence[float]) -> float:
    """The middle value, the smaller of the two middle ones for an even count."""
    if not values:
        raise ValueError("no values: nothing to take the median of")
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def header(method: str, value: float, made: Sequence[Choice]) -> list[str]:
    """The config's header lines: the value, each choice with its score, and the command."""
    listed = "; ".join(f"{c.grid} {c.task} {c.value:g} ({c.score:.1f})" for c in made)
    words = (
        f"{HEADER} {value:.1e}: the lower median of the tuned grids' choices for {method} (grid, task, "
        f"value, tuning-split score): {listed}. Set by python -m spec_lightning.experiments.defaults --write."
    ).split()
    lines, line = [], "#"
    for word in words[1:]:
        if len(line) + 1 + len(word) > 108:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def shipped(path: Path) -> float:
    config = yaml.safe_load(path.read_text())
    return float(config["model"]["init_args"]["learning_rate"])


def rewrite(path: Path, value: float, lines: Sequence[str]) -> None:
    """``path`` with its learning rate set to ``value`` and its header (the ``HEADER`` block at the top,
    replaced where present) set to ``lines``; the rest of the file, comments included, is kept."""
    text = path.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith(HEADER)), None)
    if start is not None:
        end = start + 1
        while end < len(text) and text[end].startswith("#"):  # the header is the last comment block
            end += 1
        text = text[:start] + text[end:]
    first = next(i for i, line in enumerate(text) if not line.startswith("#"))
    text = text[:first] + list(lines) + text[first:]
    key = re.compile(r"^(\s+learning_rate:\s*)\S+(.*)$")
    hits = [i for i, line in enumerate(text) if key.match(line)]
    if len(hits) != 1:
        raise ValueError(f"{path}: expected one learning_rate line, found {len(hits)}")
    text[hits[0]] = key.sub(lambda m: f"{m.group(1)}{value:.1e}{m.group(2)}", text[hits[0]])
    staging = path.with_suffix(".yaml.tmp")
    staging.write_text("\n".join(text) + "\n")
    staging.replace(path)


def plan(root: Path, grids: Sequence[str] = TUNED_GRIDS) -> dict[Path, tuple[float, list[str]]]:
    """Per method config that a tuned grid chose for: the learning rate it should ship and its header."""
    made = choices(root, grids)
    out = {}
    for method, found in sorted(made.items()):
        path = root / "configs" / "method" / f"{method}.yaml"
        if path.is_file():
            value = lower_median([c.value for c in found])
            out[path] = (value, header(method, value, found))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help="set the configs instead of checking them")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    args = parser.parse_args(argv)
    wrong = []
    for path, (value, lines) in plan(args.root).items():
        if args.write:
            rewrite(path, value, lines)
            print(f"{path}: {value:.1e}")
        elif shipped(path) != float(f"{value:.1e}"):
            wrong.append(f"{path}: ships {shipped(path):g}, the tuned grids chose {value:g}")
    if wrong:
        print("\n".join([*wrong, "run python -m spec_lightning.experiments.defaults --write"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
