"""The reproduction grid's CSV rows: what a finished run records (metrics, parameters, times, the load
beside it), read and written atomically."""

from __future__ import annotations

import csv
import json
import os
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spec_lightning.analysis.curves import read_scalars, seconds_per_step
from spec_lightning.experiments.grid import Run
from spec_lightning.io.checkpoints import load_checkpoint


def majority_share(labels: np.ndarray) -> float:
    """The share of the most frequent label: the accuracy of always answering it."""
    return float(np.unique(labels, return_counts=True)[1].max() / len(labels))


def collect(run: Run, logs: Path, wall_s: float, cpu_s: float, tuned: str | None) -> dict[str, object]:
    """The CSV row of a finished run, from its TensorBoard scalars and predictions; ``cpu_s`` is the CPU
    time (user + system) of its process, the energy proxy on a machine without a power meter."""
    scalars = read_scalars(run.directory(logs))
    checkpoint = load_checkpoint(run.directory(logs) / "checkpoints" / "last.ckpt")
    steps = int(checkpoint["global_step"])
    row: dict[str, object] = {
        "task": run.task,
        "method": run.method,
        "variant": run.variant,
        "seed": run.seed,
        "tuned": run.candidate if run.candidate is not None else (tuned or ""),
        "trainable": int(scalars["params/trainable"][0][1]),
        "total": int(scalars["params/total"][0][1]),
        "steps": steps,
        "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),
        "s_per_step": round(seconds_per_step(run.directory(logs)), 4),
        "load_1m": round(os.getloadavg()[0], 2),
        "device": device_name(),
        "run_dir": str(run.directory(logs)),
    }
    predictions = run.directory(logs) / "predictions.npz"
    if predictions.is_file():
        with np.load(predictions) as saved:
            labels = saved["labels"]
        if np.issubdtype(labels.dtype, np.integer):
            row["majority"] = round(majority_share(labels), 6)
    if "module_search/trainable_parameters" in scalars:  # MFTC trains the selection after its search
        row["trainable"] = int(scalars["module_search/trainable_parameters"][-1][1])
    row |= {tag: round(points[-1][1], 6) for tag, points in sorted(scalars.items()) if tag.startswith("val/")}
    return row


#: The scalars a run's curve file keeps: every validation metric and the training loss.
CURVE_TAGS = ("val/", "train/loss")


def curves_of(run_dir: Path) -> dict[str, list[list[float]]]:
    """The validation metrics' and training loss's (step, value) points of a finished run, for the
    learning-curve figures of a grid whose TensorBoard logs stay on the machine that ran it."""
    scalars = read_scalars(run_dir)
    return {
        tag: [[step, round(value, 6)] for step, value in points]
        for tag, points in sorted(scalars.items())
        if tag.startswith(CURVE_TAGS)
    }


def write_json(path: Path, payload: object) -> None:
    """``payload`` as JSON at ``path``, written to a temporary file beside it and renamed (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(payload))
    staging.replace(path)


def device_name() -> str:
    """The accelerator the grid's runs use (the CUDA device's name), else ``cpu``: rows of a GPU run and a
    CPU run of one grid meet in one report."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """All rows, with the union of their columns (metrics differ between tasks); written atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".csv.tmp")
    with staging.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(path)
