"""The GPU suite: everything this project measures on a GPU, in one command of at most 8 minutes on one H100.

GPU time is scarce (a lent node, about 15 minutes with its start-up, no package index), so the suite is
prepared and tested on CPU (``--dry-run``, in the default test run) and run once when a GPU is there.
Each stage runs in its own process with a time box; its results are written as soon as it ends (rows
even during it), and a stage that fails or overruns is recorded as such while the next one runs:

a. ``tests``: ``pytest -m gpu`` (bf16-mixed fused LoRSA/SpecLoRA, FSDP and FSDP2 on CUDA, every callback
   under FSDP2 on one GPU), its summary line and failures;
b. ``adapter_cost``: step time and peak memory of peft LoRA, DoRA, LoRSA and SpecLoRA (fused, and under
   ``torch.compile``) and full fine-tuning at bert-base and Llama-3.2-1B shapes, bf16-mixed, as ratios to
   peft LoRA (:mod:`benchmarks.adapter_cost`; targets: LoRSA/SpecLoRA at most 1.10x LoRA's step, 1.05x
   its memory);
c. ``pipeline``: ``spec-lightning fit`` against a bare peft loop on the same batches, per step, with a
   profile of the difference (:mod:`benchmarks.pipeline_overhead`; target at most 1.05x);
d. ``neighbors``: DSCA's exact k-NN search (blocked torch matmuls) on the GPU at 10⁵ and 10⁶ blocks
   (:mod:`benchmarks.neighbor_search` ``--exact-only``): where ``auto`` should leave it for the IVF index
   there (``EXACT_NODES["cuda"]`` is an estimate until then);
e. ``grid``: the convergence grid's configs (configs/reproduce/converged.yaml) with the GPU trainer: MRPC
   then SST-2, LoRA, full fine-tuning, LoRSA, SpecLoRA and graph-spectral, seed after seed while time is
   left, at the learning rates the CPU grid's sweep chose (the shipped rates where it has not finished);
   rows go to benchmarks/results/converged_gpu/ in the CPU grid's format, for the same report.

Results: ``<output>/suite.json`` (every stage: status, seconds, results) and ``<output>/suite.md``, rewritten
after each stage. On the GPU node, from the offline bundle (``spec-lightning bundle``)::

    python3 -m pip install --no-index --find-links bundle/wheels spec-lightning
    python3 benchmarks/gpu_suite.py --bundle bundle
    python3 benchmarks/gpu_suite.py --dry-run --output /tmp/suite     # CPU, tiny shapes, about a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Each stage's time box in seconds on the GPU (480 in all).
BUDGETS = {"tests": 90, "adapter_cost": 170, "pipeline": 70, "neighbors": 40, "grid": 110}
DRY_BUDGETS = {"tests": 60, "adapter_cost": 120, "pipeline": 120, "neighbors": 60, "grid": 120}
GRID_METHODS = ["lora", "full", "lorsa", "speclora", "graph_spectral"]


def tiny_backbone(folder: Path) -> Path:
    """A 2-layer BERT with the demo encoder's tokenizer (a dry run's backbone)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from spec_lightning.io.bundle import ENCODER, ENCODER_FILES
    from spec_lightning.io.pretrained import resolve_pretrained

    source = Path(resolve_pretrained(ENCODER))
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    for file in ENCODER_FILES[1:]:
        if (source / file).is_file():
            shutil.copyfile(source / file, folder / file)
    return folder


def tiny_glue(folder: Path) -> Path:
    """SST-2 and MRPC TSVs of a few hundred made-up lines (a dry run's data)."""
    words = ["good", "bad", "fine", "awful", "great", "dull", "lovely", "poor"]
    for task in ("SST-2", "MRPC"):
        (folder / task).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 800), ("dev", 64)):
        lines = ["sentence\tlabel"] + [f"{words[i % 8]} film number {i}\t{(i % 8) % 2}" for i in range(n)]
        (folder / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{i % 2}\t{i}\t{i + 1}\tthe {words[i % 8]} one {i}\tthe {words[(i + i % 2) % 8]} one {i}"
            for i in range(n)
        ]
        (folder / "MRPC" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def run_stage(name: str, command: list[str], budget: float, log: Path) -> dict[str, object]:
    """``command`` with ``budget`` seconds; its status, seconds and the end of its output."""
    start = time.perf_counter()
    print(f"[gpu_suite] {name}: {' '.join(command)} (time box {budget:.0f} s)", flush=True)
    with log.open("w") as out:
        try:
            code = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=budget, cwd=ROOT
            ).returncode
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"stopped at its {budget:.0f} s time box"
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), "tail": tail}


def learning_rates(dry_run: bool) -> dict[str, dict[str, str]]:
    """Per task and method: the CPU convergence grid's tuned rate where its sweep has finished, else
    the method config's shipped rate (marked ``shipped``)."""
    from spec_lightning.experiments.grid import Grid
    from spec_lightning.experiments.records import read_rows

    grid = Grid.load(ROOT / "configs/reproduce/converged.yaml")
    sweep_rows = read_rows(ROOT / "benchmarks/results/converged/sweep.csv")
    rates: dict[str, dict[str, str]] = {}
    for task in grid.tasks:
        for method in GRID_METHODS:
            chosen = None if dry_run or grid.sweep is None else grid.sweep.chosen(sweep_rows, task, method)
            if chosen is None:
                configs = [yaml.safe_load((ROOT / c).read_text()) for c in grid.methods[method]]
                shipped = [
                    c["model"]["init_args"]["learning_rate"]
                    for c in configs
                    if "learning_rate" in c.get("model", {}).get("init_args", {})
                ]
                rates.setdefault(task, {})[method] = f"{shipped[-1]} (shipped)"
            else:
                rates.setdefault(task, {})[method] = chosen
    return rates


def grid_file(args: argparse.Namespace, seed: int, rates: dict[str, dict[str, str]], folder: Path) -> Path:
    """The GPU twin of the convergence grid for one seed: its configs with the GPU trainer (the CPU one
    in a dry run), the bundle's backbone, and per task and method an overlay with the task's data folder
    and the method's rate; no sweep."""
    grid = yaml.safe_load((ROOT / "configs/reproduce/converged.yaml").read_text())
    grid.pop("sweep")
    grid["name"] = "converged_gpu"
    methods = GRID_METHODS[:1] if args.dry_run else GRID_METHODS
    grid["baselines"] = [m for m in ("lora", "full") if m in methods]
    grid["claims"] = [
        {**c, "against": [a for a in c["against"] if a in methods]}
        for c in grid["claims"]
        if c["method"] in methods and set(c["against"]) & set(methods)
    ]
    trainer = "configs/trainer/cpu.yaml" if args.dry_run else "configs/trainer/gpu.yaml"
    grid["base_configs"] = [trainer if c.startswith("configs/trainer/") else c for c in grid["base_configs"]]
    grid["tasks"] = ["mrpc"] if args.dry_run else grid["tasks"]
    grid["seeds"] = [seed]
    grid["logs"] = str(args.logs / "converged_gpu")
    grid["output"] = str(args.output if args.dry_run else args.output.parent)
    grid["keep_checkpoints"] = False
    grid["overrides"] = []
    if args.backbone:
        grid["overrides"].append(f"--model.init_args.backbone={args.backbone}")
    if args.dry_run:
        grid["overrides"] += [
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=2",
            "--trainer.val_check_interval=1",
        ]
    for method in methods:
        for task in grid["tasks"]:
            overlay: dict[str, object] = {
                "model": {"init_args": {"learning_rate": float(rates[task][method].split()[0])}}
            }
            if args.glue:
                overlay["data"] = {
                    "init_args": {"data_dir": str(args.glue / {"sst2": "SST-2", "mrpc": "MRPC"}[task])}
                }
            (folder / f"{task}-{method}.yaml").write_text(yaml.safe_dump(overlay))
        configs = grid["methods"][method]
        grid["methods"][method] = [
            *([configs] if isinstance(configs, str) else configs),
            str(folder / f"{{task}}-{method}.yaml"),
        ]
    grid["methods"] = {m: grid["methods"][m] for m in methods}
    path = folder / f"grid-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def markdown(suite: dict[str, object]) -> str:
    lines = [f"# GPU suite\n\n{suite['setting']}\n", "| stage | status | seconds |", "|---|---|---|"]
    stages: dict[str, dict[str, object]] = suite["stages"]  # type: ignore[assignment]
    for name, stage in stages.items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} |")
    neighbours = stages.get("neighbors", {}).get("result")
    if neighbours:
        rows = neighbours["rows"]  # type: ignore[index]
        lines += ["", "## DSCA's exact k-NN search on the device", ""]
        lines += ["| blocks m | k | seconds |", "|---|---|---|"]
        lines += [f"| {r['blocks']:,} | {r['k']} | {r['blocked_exact_s']:.2f} |" for r in rows]
    for name in ("adapter_cost", "pipeline"):
        result = stages.get(name, {}).get("result")
        if name == "adapter_cost" and result:
            from benchmarks.adapter_cost import table

            lines += [
                "",
                "## Step time and peak memory against peft LoRA (bf16-mixed)",
                "",
                table(result["rows"]),
            ]  # type: ignore[index]
        if name == "pipeline" and result:
            r = result
            lines += [
                "",
                "## spec-lightning fit against a bare peft loop",
                "",
                f"{r['device']}, {r['precision']}, {r['steps']}: "  # type: ignore[index]
                f"fit {r['fit_ms_per_step']} ms/step, bare peft "  # type: ignore[index]
                f"{r['bare_ms_per_step']} ms/step, ratio {r['ratio']} (same batches: {r['same_batches']}).",  # type: ignore[index]
            ]
    return "\n".join(lines) + "\n"


def write(suite: dict[str, object], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name, text in (("suite.json", json.dumps(suite, indent=1)), ("suite.md", markdown(suite))):
        staging = output / f".{name}.tmp"
        staging.write_text(text)
        staging.replace(output / name)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="the offline bundle: its encoder and GLUE data")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/gpu_suite")
    parser.add_argument("--logs", type=Path, default=ROOT / "logs")
    parser.add_argument("--stages", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and data, a few steps each")
    args = parser.parse_args(argv)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    work = args.output / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.backbone, args.glue = None, None
    if args.bundle:
        args.backbone, args.glue = args.bundle / "models/all-MiniLM-L6-v2", args.bundle / "data/glue"
    if args.dry_run:
        args.backbone = args.backbone or tiny_backbone(work / "tiny-bert")
        args.glue = args.glue or tiny_glue(work / "glue")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    suite: dict[str, object] = {
        "setting": f"{device}, torch {torch.__version__}, Python {platform.python_version()}"
        + (" — dry run (tiny shapes on CPU: no figures)" if args.dry_run else ""),
        "stages": {},
    }
    stages: dict[str, dict[str, object]] = suite["stages"]  # type: ignore[assignment]
    python = sys.executable
    for name in args.stages:
        log = work / f"{name}.log"
        if name == "tests":
            command = [
                python,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "tests/test_gpu.py",
                "-p",
                "no:cacheprovider",
            ]
            if args.dry_run:
                command.append("--collect-only")
            stages[name] = run_stage(name, command, budgets[name], log)
        elif name == "adapter_cost":
            out = work / "adapter_cost"
            command = [python, "-m", "benchmarks.adapter_cost", "--output", str(out)]
            stages[name] = run_stage(
                name, command + (["--dry-run"] if args.dry_run else []), budgets[name], log
            )
            if out.with_suffix(".json").is_file():
                stages[name]["result"] = json.loads(out.with_suffix(".json").read_text())
        elif name == "pipeline":
            out = work / "pipeline_overhead"
            trainer = "configs/trainer/cpu.yaml" if args.dry_run else "configs/trainer/gpu.yaml"
            command = [
                python,
                "-m",
                "benchmarks.pipeline_overhead",
                "--trainer",
                trainer,
                "--output",
                str(out),
                "--logs",
                str(args.logs),
                "--profile",
                "--backbone",
                str(args.backbone),
            ]
            if args.glue:
                command += ["--data_dir", str(args.glue / "SST-2")]
            stages[name] = run_stage(
                name, command + (["--dry-run"] if args.dry_run else []), budgets[name], log
            )
            if out.with_suffix(".json").is_file():
                stages[name]["result"] = json.loads(out.with_suffix(".json").read_text())
        elif name == "neighbors":
            out = work / "neighbor_search_gpu"
            command = [python, "-m", "benchmarks.neighbor_search", "--exact-only", "--output", str(out)]
            command += (
                ["--device", "cpu", "--blocks", "2000", "--repeats", "1"]
                if args.dry_run
                else ["--device", "cuda", "--blocks", "100000", "1000000", "--repeats", "1"]
            )
            stages[name] = run_stage(name, command, budgets[name], log)
            if out.with_suffix(".json").is_file():
                stages[name]["result"] = json.loads(out.with_suffix(".json").read_text())
        elif name == "grid":
            rates = learning_rates(args.dry_run)
            start, results = time.perf_counter(), []
            for seed in args.seeds[:1] if args.dry_run else args.seeds:
                left = budgets[name] - (time.perf_counter() - start)
                if left < 20:
                    break
                grid = grid_file(args, seed, rates, work)
                command = [python, "-m", "spec_lightning", "reproduce", "--grid", str(grid)]
                results.append(run_stage(f"{name} seed {seed}", command, left, work / f"grid-seed{seed}.log"))
            stages[name] = {
                "status": "; ".join(
                    f"seed {s}: {r['status']}" for s, r in zip(args.seeds, results, strict=False)
                ),
                "seconds": round(time.perf_counter() - start, 1),
                "rates": rates,
                "runs": [r["tail"] for r in results],
            }
        write(suite, args.output)
        print(f"[gpu_suite] {name}: {stages[name]['status']} in {stages[name]['seconds']} s", flush=True)
    return suite


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
