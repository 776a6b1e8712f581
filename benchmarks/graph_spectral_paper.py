"""The graph-spectral coordination paper's experiments on SST-2, from the shipped configs (METHODS.md §1).

1. comparison: full fine-tuning, Houlsby adapter, peft LoRA and graph-spectral coordination (val
   accuracy, precision, recall);
2. few-shot: LoRA and graph-spectral coordination on 20 / 40 / 60 % of the training sentences;
3. ablation: task loss only / spectral term only / joint, as convergence curves of the task loss.

Every run is ``spec-lightning fit`` with the configs named below, logged under ``--logs``; finished runs
are reused. Writes ``graph_spectral_sst2.{md,json}`` and ``graph_spectral_ablation.png`` into ``--out``::

    python -m benchmarks.graph_spectral_paper --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from benchmarks.common import fit_run
from spec_lightning.analysis.curves import curves_figure, read_scalars

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHODS = {"full": "full", "adapter": "houlsby", "lora": "lora", "graph_spectral": "graph_spectral"}
ABLATION = {"task": "ablation/task_only.yaml", "spectral": "ablation/spectral_only.yaml"}
METRICS = ("val/accuracy", "val/precision", "val/recall")


def runs() -> dict[str, tuple[str, list[Path]]]:
    """run id -> (logger name, configs)."""
    table: dict[str, tuple[str, list[Path]]] = {}
    for label, folder in METHODS.items():
        table[label] = (f"{folder}-sst2", [CONFIGS / folder / "sst2.yaml"])
    for objective, overlay in ABLATION.items():
        configs = [CONFIGS / "graph_spectral" / "sst2.yaml", CONFIGS / "graph_spectral" / overlay]
        table[f"{objective}_only"] = (f"graph_spectral-sst2-{objective}_only", configs)
    for label in ("lora", "graph_spectral"):
        for pct in (20, 40, 60):
            configs = [
                CONFIGS / METHODS[label] / "sst2.yaml",
                CONFIGS / "graph_spectral" / "fewshot" / f"{pct}.yaml",
            ]
            table[f"{label}@{pct}%"] = (f"{METHODS[label]}-sst2", configs)
    return table


def run_dir(logs: Path, run_id: str, name: str) -> Path:
    version = f"fewshot{run_id.split('@')[1].rstrip('%')}" if "@" in run_id else "paper"
    return logs / name / version


def fit(run_id: str, name: str, configs: list[Path], logs: Path, threads: int) -> float:
    """Run one fit; returns its wall time in seconds."""
    return fit_run(configs, logs, run_dir(logs, run_id, name).name, threads, ROOT)


def summarise(logs: Path, walls: dict[str, float]) -> dict[str, dict[str, float]]:
    results = {}
    for run_id, (name, _) in runs().items():
        scalars = read_scalars(run_dir(logs, run_id, name))
        row = {m.split("/")[1]: scalars[m][-1][1] for m in METRICS}
        row["train_steps"] = scalars["train/task_loss"][-1][0]
        if run_id in walls:
            row["wall_s"] = round(walls[run_id], 1)
        results[run_id] = row
    return results


def write(results: dict[str, dict[str, float]], logs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph_spectral_sst2.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| run | accuracy | precision | recall | last logged step | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for run_id, row in results.items():
        wall = row.get("wall_s", "")
        lines.append(
            f"| {run_id} | {row['accuracy']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} "
            f"| {row['train_steps']} | {wall} |"
        )
    (out / "graph_spectral_sst2.md").write_text("\n".join(lines) + "\n")
    table = runs()
    curves = {
        label: read_scalars(run_dir(logs, run_id, table[run_id][0]))["train/task_loss"]
        for label, run_id in (
            ("task only", "task_only"),
            ("spectral only", "spectral_only"),
            ("joint", "graph_spectral"),
        )
    }
    fig = curves_figure(curves, "train/task_loss")
    fig.savefig(out / "graph_spectral_ablation.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=ROOT / "logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run ids to (re)run; default: every run not yet finished")
    args = parser.parse_args()
    walls_file = args.out / "graph_spectral_sst2_walls.json"
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    for run_id, (name, configs) in runs().items():
        finished = any(run_dir(args.logs, run_id, name).glob("checkpoints/last.ckpt"))
        if (args.only is None and not finished) or (args.only and run_id in args.only):
            walls[run_id] = fit(run_id, name, configs, args.logs, args.threads)
            args.out.mkdir(parents=True, exist_ok=True)
            walls_file.write_text(json.dumps(walls, indent=2))
    write(summarise(args.logs, walls), args.logs, args.out)


if __name__ == "__main__":
    main()
