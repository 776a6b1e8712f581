"""The GPU suite's dry run (tiny shapes and data on CPU): every stage runs end to end, so the suite that
waits for a lent GPU cannot rot."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_runs_every_stage_and_writes_its_results(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "benchmarks/gpu_suite.py",
        "--dry-run",
        "--output",
        str(tmp_path / "suite"),
        "--logs",
        str(tmp_path / "logs"),
    ]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    suite = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert {name: stage["status"] for name, stage in suite["stages"].items()} == {
        "tests": "passed",
        "adapter_cost": "passed",
        "pipeline": "passed",
        "neighbors": "passed",
        "grid": "seed 42: passed",
    }
    (neighbours,) = suite["stages"]["neighbors"]["result"]["rows"]
    assert neighbours["blocks"] == 2000 and neighbours["blocked_exact_s"] > 0
    rows = suite["stages"]["adapter_cost"]["result"]["rows"]
    assert {(r["shape"], r["method"]) for r in rows} >= {
        ("bert-base", "peft LoRA r=8"),
        ("llama-1b", "SpecLoRA r=8 k=32"),
    }
    assert all("error" not in r and r["x_lora_step"] > 0 for r in rows), rows
    pipeline = suite["stages"]["pipeline"]["result"]
    assert pipeline["same_batches"] and pipeline["fit_ms_per_step"] > 0 and pipeline["bare_ms_per_step"] > 0
    assert (tmp_path / "suite" / "work" / "pipeline_overhead_profile.txt").is_file()
    with (tmp_path / "suite" / "converged_gpu" / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["task"], row["method"], row["seed"], row["steps"]) == ("mrpc", "lora", "42", "2")
    assert json.loads(
        (tmp_path / "suite" / "converged_gpu" / "curves" / "lora-mrpc-seed42.json").read_text()
    )["val/accuracy"]
    text = (tmp_path / "suite" / "suite.md").read_text()
    assert "## DSCA's exact k-NN search on the device" in text
    assert "dry run" in text and "| llama-1b | full fine-tuning |" in text and "ratio" in text
