"""The "spectral specialisation" figure: which singular components each task adapts, per layer.

One CSV per run (written by :class:`~spec_lightning.callbacks.SpectralImportance`) holds a row per
(layer, component) with σ_i, the importance I_i and whether i was selected. Combine runs of several
tasks into one figure::

    python -m spec_lightning.analysis.specialisation \\
        logs/lorsa-sst2/version_0/spectral_importance.csv logs/lorsa-rte/version_0/spectral_importance.csv \\
        --output specialisation.png
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

FIELDS = ("task", "layer", "component", "sigma", "importance", "selected")


def selection_rows(
    task: str,
    sigmas: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor],
    selected: dict[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """One row per (layer, component): σ_i, I_i, and whether component i is in S."""
    rows: list[dict[str, Any]] = []
    for layer, score in scores.items():
        chosen = set(selected[layer].tolist())
        for i, (sigma, importance) in enumerate(zip(sigmas[layer].tolist(), score.tolist(), strict=True)):
            rows.append(
                {
                    "task": task,
                    "layer": layer,
                    "component": i,
                    "sigma": sigma,
                    "importance": importance,
                    "selected": int(i in chosen),
                }
            )
    return rows


def write_rows(rows: list[dict[str, Any]], path: Path, fields: Sequence[str] = FIELDS) -> None:
    """Write ``rows`` as CSV with the header ``fields``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def specialisation_figure(rows: list[dict[str, Any]]) -> Figure:
    """One panel per task: selected component index (x) against layer (y), coloured by log10 I_i."""
    tasks = list(dict.fromkeys(str(r["task"]) for r in rows))
    layers = list(dict.fromkeys(str(r["layer"]) for r in rows))
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.5 * len(tasks), 0.3 * len(layers) + 1.8), sharey=True, squeeze=False
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        chosen = [r for r in rows if r["task"] == task and int(r["selected"])]
        x = [int(r["component"]) for r in chosen]
        y = [layers.index(str(r["layer"])) for r in chosen]
        c = [torch.tensor(float(r["importance"])).clamp_min(1e-30).log10().item() for r in chosen]
        points = ax.scatter(x, y, c=c, s=12, cmap="viridis")
        ax.set_title(f"{task}: selected components")
        ax.set_xlabel("singular component index i (0 = largest σ)")
        fig.colorbar(points, ax=ax, label="log10 importance")
    axes[0][0].set_yticks(range(len(layers)), [_short(name) for name in layers], fontsize=7)
    fig.tight_layout()
    return fig


def _short(layer: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    parts = layer.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0] :]) if digits else layer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot the spectral specialisation of one or more runs.")
    parser.add_argument("csv", nargs="+", type=Path, help="spectral_importance.csv files (one per task)")
    parser.add_argument("--output", type=Path, default=Path("specialisation.png"))
    args = parser.parse_args(argv)
    rows = [row for path in args.csv for row in read_rows(path)]
    specialisation_figure(rows).savefig(args.output, dpi=150)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
