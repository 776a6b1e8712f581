"""``spec-lightning fit`` against a bare peft training loop on the same batches and settings, per step.

Both train peft LoRA r=8 (alpha 16, dropout 0) on query/value of the same backbone, on the same tokenised
batches in the same order (the fit's own datamodule, reseeded), with AdamW, the same linear warm-up and
decay, and the fit's precision (32 on CPU, bf16-mixed on a GPU). The fit runs as a user runs it: the CLI's
configs (TensorBoard logger, progress bar, checkpoint at the end), built in-process so that a callback can
time it. Each side synchronises the device after every optimiser step and records the time; the cost per
step is the slope between steps ``--first`` and ``--last`` (start-up, compilation and the first steps'
allocations left out). The ratio fit / bare is the pipeline's overhead. ``--profile`` also writes the
fit's cProfile over the timed steps, by own time (``<output>_profile.txt``): what the rest is.

    python -m benchmarks.pipeline_overhead --threads 2                       # CPU, MiniLM, SST-2
    python -m benchmarks.pipeline_overhead --trainer configs/trainer/gpu.yaml --profile
    python -m benchmarks.pipeline_overhead --dry-run --output /tmp/overhead   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class StepClock(L.Callback):
    """The time after every optimiser step (device synchronised), a digest of every batch's inputs,
    and optionally a cProfile of steps [first, last)."""

    def __init__(self, profile_steps: tuple[int, int] | None = None) -> None:
        self.times: list[float] = []
        self.digests: list[str] = []
        self.profile_steps = profile_steps
        self.profiler = cProfile.Profile() if profile_steps else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        self.digests.append(digest(batch))
        if self.profiler is not None and self.profile_steps and trainer.global_step == self.profile_steps[0]:
            self.profiler.enable()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.profiler is not None and self.profile_steps and trainer.global_step == self.profile_steps[1]:
            self.profiler.disable()


def digest(batch: Any) -> str:
    return hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]


def fit_arguments(args: argparse.Namespace, steps: int) -> list[str]:
    configs = [
        args.trainer,
        ROOT / "configs/model/minilm.yaml",
        ROOT / "configs/glue/sst2.yaml",
        ROOT / "configs/method/lora.yaml",
    ]
    out = [a for c in configs for a in ("--config", str(c))]
    out += [
        "--model.init_args.method.init_args.dropout=0.0",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.logger.init_args.save_dir={args.logs}",
        "--trainer.logger.init_args.name=pipeline_overhead",
        f"--data.init_args.train_limit={32 * (steps + 5)}",
        "--data.init_args.batch_size=32",
        "--data.init_args.max_length=64",
    ]
    if args.backbone:
        out.append(f"--model.init_args.backbone={args.backbone}")
    if args.data_dir:
        out.append(f"--data.init_args.data_dir={args.data_dir}")
    if args.trainer_args:
        out += args.trainer_args
    return out


def run_fit(args: argparse.Namespace, steps: int) -> tuple[StepClock, Any, Any]:
    from spec_lightning.cli import build_cli

    cli = build_cli(fit_arguments(args, steps), run=False)
    clock = StepClock((args.first, args.last) if args.profile else None)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    return clock, cli.model, cli.datamodule


def run_bare(module: Any, datamodule: Any, steps: int, seed: int) -> tuple[list[float], list[str]]:
    """The peft loop a user writes by hand, on the fit's datamodule (same batches, same order)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from spec_lightning.io.pretrained import load_pretrained, resolve_pretrained

    hp = module.hparams
    device = module.device
    L.seed_everything(seed)
    base = load_pretrained(
        AutoModelForSequenceClassification, resolve_pretrained(hp.backbone), ("classifier",), num_labels=2
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"]
    )
    model = get_peft_model(base, config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * steps), steps)
    bf16 = device.type == "cuda"
    L.seed_everything(seed)
    loader = datamodule.train_dataloader()
    times, digests = [], []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        digests.append(digest(batch))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times, digests


def slope(times: list[float], first: int, last: int) -> float:
    return (times[last - 1] - times[first - 1]) / (last - first)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", type=Path, default=ROOT / "configs/trainer/cpu.yaml")
    parser.add_argument("--backbone", help="another backbone (e.g. the offline bundle's encoder)")
    parser.add_argument("--data_dir", help="another SST-2 TSV folder (e.g. the offline bundle's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--first", type=int, default=30)
    parser.add_argument("--last", type=int, default=90)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--logs", type=Path, default=ROOT / "logs")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/pipeline_overhead")
    parser.add_argument("--dry-run", action="store_true", help="--first 2 --last 6 on what --backbone names")
    parser.add_argument("trainer_args", nargs="*", help="more fit arguments (after --)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.first, args.last = 2, 6
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.last + 1
    clock, module, datamodule = run_fit(args, steps)
    bare_times, bare_digests = run_bare(module, datamodule, steps, seed=42)
    if bare_digests[: args.last] != clock.digests[: args.last]:
        raise RuntimeError("the bare loop saw other batches than the fit; the comparison would not be fair")
    fit_s, bare_s = slope(clock.times, args.first, args.last), slope(bare_times, args.first, args.last)
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name()
        if module.device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "precision": str(module.trainer.precision),
        "steps": f"slope between steps {args.first} and {args.last}",
        "fit_ms_per_step": round(1000 * fit_s, 3),
        "bare_ms_per_step": round(1000 * bare_s, 3),
        "ratio": round(fit_s / bare_s, 3),
        "same_batches": True,
        "dry_run": args.dry_run,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if clock.profiler is not None:
        text = io.StringIO()
        pstats.Stats(clock.profiler, stream=text).sort_stats("tottime").print_stats(30)
        args.output.with_name(args.output.name + "_profile.txt").write_text(text.getvalue())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
