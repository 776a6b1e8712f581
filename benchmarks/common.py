"""What the benchmark scripts share: the backbone, a fixed batch, device sync, result files and CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_backbone(path: str, random_init: bool) -> nn.Module:
    torch.manual_seed(0)
    if random_init:
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=2))
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def fixed_batch(path: str, batch_size: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded random token ids (above the special tokens) and labels: the cost does not depend on text."""
    g = torch.Generator().manual_seed(0)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    return {
        "input_ids": torch.randint(1000, vocab, (batch_size, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


def write_results(output: Path, header: str, table: str, rows: list[dict[str, object]]) -> None:
    """Print the table and write ``output``.md (header + table) and ``output``.json (setting + rows)."""
    text = f"{header}\n\n{table}"
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(text)
    output.with_suffix(".json").write_text(json.dumps({"setting": header, "rows": rows}, indent=2))


def fit_run(
    configs: list[Path], logs: Path, version: str, threads: int, root: Path, name: str | None = None
) -> float:
    """``spec-lightning fit`` of ``configs`` logged under ``logs``/<name>/``version``; its wall seconds."""
    command = [sys.executable, "-m", "spec_lightning", "fit"]
    command += [a for c in configs for a in ("--config", str(c))]
    command += [f"--trainer.logger.init_args.name={name}"] if name else []
    command += [
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.logger.init_args.version={version}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(" ".join(command[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=root, env=env)
    return time.perf_counter() - start
