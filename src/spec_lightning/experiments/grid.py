"""A reproduction grid's definition: its YAML (:class:`Grid`), the runs it makes (:class:`Run`) and how a
CSV row is matched to the run that made it (see :mod:`spec_lightning.experiments.reproduce` for the YAML's
keys and how a grid runs)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spec_lightning.analysis.claims import Claim
from spec_lightning.analysis.paired import run_name
from spec_lightning.experiments.sweep import Sweep

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
    compare_with: str | None = None

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
                settings: list[tuple[str, list[Path], list[int]]] = [("", [], self.seeds)] + [
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
        among them). A value the arguments set on the command line, as the sweep's argument of every
        tuning and tuned run, does not count where a config file also holds it: the command line wins,
        so a shipped default changed in a method's config (its learning rate) does not make finished
        runs run again."""
        arguments = self.arguments(grid, tuned)
        overridden = {a[2:].split("=", 1)[0] for a in arguments if a.startswith("--") and "=" in a}
        configs = [without_keys(yaml.safe_load(c.read_text()), overridden) for c in self.configs]
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


def without_keys(config: object, dotted: set[str]) -> object:
    """``config`` (a parsed YAML file) without the entries at the ``dotted`` paths
    (``model.init_args.learning_rate``); the file's own value is left untouched."""
    if not isinstance(config, dict):
        return config
    kept = {}
    for key, value in config.items():
        below = {d.split(".", 1)[1] for d in dotted if "." in d and d.split(".", 1)[0] == str(key)}
        if str(key) in dotted:
            continue
        kept[key] = without_keys(value, below) if below else value
    return kept


def row_key(row: Mapping[str, object]) -> tuple[str, str, str, int]:
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
