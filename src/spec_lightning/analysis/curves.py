"""Training curves from TensorBoard runs, side by side (e.g. the convergence ablation of METHODS.md §1)::

    python -m spec_lightning.analysis.curves --tag train/task_loss --output ablation.png \\
        task=logs/graph_spectral-sst2-task_only/paper joint=logs/graph_spectral-sst2/paper
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

Curve = list[tuple[int, float]]


def read_scalars(run_dir: str | Path) -> dict[str, Curve]:
    """Every scalar tag of a TensorBoard run folder as (step, value) pairs in step order."""
    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event file in {run_dir}: is it a run's log folder?")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def seconds_per_step(run_dir: str | Path, tag: str = "train/loss") -> float:
    """Wall seconds per optimiser step between the first and last logged points of ``tag`` (NaN with
    fewer than two): the training pace, without start-up and final evaluation."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    points = (
        sorted((e.step, e.wall_time) for e in events.Scalars(tag)) if tag in events.Tags()["scalars"] else []
    )
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return float("nan")
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def curves_figure(curves: Mapping[str, Curve], tag: str) -> Figure:
    """One line per run of ``tag`` against the optimiser step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(tag)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot one scalar of several TensorBoard runs.")
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR pairs")
    parser.add_argument("--tag", default="train/task_loss")
    parser.add_argument("--output", default="curves.png")
    args = parser.parse_args(argv)
    curves = {}
    for item in args.runs:
        label, _, run_dir = item.partition("=")
        scalars = read_scalars(run_dir)
        if args.tag not in scalars:
            raise KeyError(f"{run_dir} has no scalar {args.tag!r}; it has {sorted(scalars)}")
        curves[label] = scalars[args.tag]
    curves_figure(curves, args.tag).savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
