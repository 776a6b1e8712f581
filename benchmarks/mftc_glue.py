"""MFTC against peft LoRA and BitFit on GLUE, from the shipped configs (METHODS.md §4, issue 5).

For every task: ``configs/mftc/<task>.yaml`` (cluster -> search -> modular fine-tune in one fit),
``configs/lora/<task>.yaml``, the same with the ``configs/mftc/lora_matched.yaml`` overlay (LoRA at
MFTC's trainable-parameter count) and ``configs/bitfit/<task>.yaml``, all logged under ``--logs`` as
``<method>-<task>/paper`` (finished runs, those with ``checkpoints/last.ckpt``, are reused). Writes
``mftc_glue.{md,json}`` into ``--out``: dev accuracy, trainable parameters, wall time, and for MFTC
the number of modules, the chosen candidates and the search predictor's MAE / R² / Spearman::

    python -m benchmarks.mftc_glue --tasks sst2 --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import fit_run
from spec_lightning.analysis.curves import read_scalars

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: method -> its configs, given the task.
METHODS = {
    "mftc": lambda task: [CONFIGS / "mftc" / f"{task}.yaml"],
    "lora": lambda task: [CONFIGS / "lora" / f"{task}.yaml"],
    "lora_matched": lambda task: [CONFIGS / "lora" / f"{task}.yaml", CONFIGS / "mftc" / "lora_matched.yaml"],
    "bitfit": lambda task: [CONFIGS / "bitfit" / f"{task}.yaml"],
}


def summarise(run: Path, method: str) -> dict[str, float]:
    scalars = read_scalars(run)
    row = {"accuracy": scalars["val/accuracy"][-1][1]}
    if method == "mftc":
        report = json.loads((run / "module_search.json").read_text())
        row |= {
            "trainable": report["trainable_parameters"],
            "modules": len({c["module"] for c in report["candidates"]}),  # at the search
            "candidates": len(report["candidates"]),
            "chosen": len(report["selected"]),
            "search_gap": report.get("heuristic_gap", float("nan")),
            **{f"predictor_{k}": report["predictor"][k] for k in ("mae", "r2", "spearman")},
        }
    else:
        row["trainable"] = scalars["params/trainable"][0][1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2"], choices=["sst2", "mrpc", "rte"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--logs", type=Path, default=ROOT / "logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    walls_file = args.out / "mftc_glue_walls.json"
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    results = {}
    for task in args.tasks:
        for method in args.methods:
            configs = METHODS[method]
            name = f"{method}-{task}"
            run = args.logs / name / "paper"
            if not (run / "checkpoints" / "last.ckpt").exists():
                walls[name] = fit_run(configs(task), args.logs, "paper", args.threads, ROOT, name)
                args.out.mkdir(parents=True, exist_ok=True)
                walls_file.write_text(json.dumps(walls, indent=2))
            results[name] = {**summarise(run, method), "wall_s": walls.get(name)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mftc_glue.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| run | dev accuracy | trainable | wall (s) | modules | candidates → chosen | search gap "
        "| predictor MAE / R² / Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "(run before)"
        extra = "| | | |"
        if name.startswith("mftc"):
            extra = (
                f"| {r['modules']} | {r['candidates']} → {r['chosen']} | {r['search_gap']:.2g} "
                f"| {r['predictor_mae']:.2g} / {r['predictor_r2']:.4f} / {r['predictor_spearman']:.2f} |"
            )
        lines.append(f"| {name} | {r['accuracy']:.3f} | {int(r['trainable']):,} | {wall} {extra}")
    (args.out / "mftc_glue.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
