"""Step time and peak memory of every adapter against peft LoRA at real model shapes, bf16-mixed.

Shapes decide the cost, so the weights come from a config (seeded random): ``bert-base`` (110M, sequence
classification, batch 32 x 128 tokens, query/value adapted) and ``llama-1b`` (the Llama-3.2-1B shape,
1.24B parameters, causal LM, batch 4 x 512 tokens, q_proj/v_proj adapted). Each method gets a fresh
model; a step is forward + backward + AdamW step under bf16 autocast with fp32 weights (Lightning's
``bf16-mixed``); the time is the median of ``--steps`` steps after ``--warmup``, synchronised; the memory is
``torch.cuda.max_memory_allocated`` over those steps (weights, gradients, AdamW states and activations).
LoRSA and SpecLoRA run their fused paths, and again under ``torch.compile``. Ratios are to peft LoRA of the
same shape. Rows are written to ``--output``.json as each finishes (a time-boxed run keeps what it did)::

    python -m benchmarks.adapter_cost --device cuda                     # both shapes, all methods
    python -m benchmarks.adapter_cost --dry-run --output /tmp/cost      # tiny shapes on CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from spec_lightning.methods import DoRA, FineTuningMethod, FullFineTuning, LoRA, LoRSA, SpecLoRA


def shapes(dry_run: bool) -> dict[str, dict[str, object]]:
    """Each shape's model factory, targets, head and batch."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertConfig,
        LlamaConfig,
    )

    if dry_run:
        bert = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=1000,
            num_labels=2,
        )
        llama = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            tie_word_embeddings=True,
        )
        sizes = {"bert": (2, 16), "llama": (2, 16)}
    else:
        bert = BertConfig(num_labels=2)  # bert-base-uncased's shape
        llama = LlamaConfig(  # Llama-3.2-1B's shape
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        )
        sizes = {"bert": (32, 128), "llama": (4, 512)}
    return {
        "bert-base": {
            "make": lambda: AutoModelForSequenceClassification.from_config(bert),
            "targets": ["query", "value"],
            "head": ["classifier"],
            "vocab": bert.vocab_size,
            "batch": sizes["bert"],
            "lm": False,
        },
        "llama-1b": {
            "make": lambda: AutoModelForCausalLM.from_config(llama),
            "targets": ["q_proj", "v_proj"],
            "head": [],
            "vocab": llama.vocab_size,
            "batch": sizes["llama"],
            "lm": True,
        },
    }


def methods(targets: list[str], dry_run: bool = False) -> dict[str, Callable[[], FineTuningMethod]]:
    """The methods at the spectral adapters benchmark's matched sizes (tiny ones for the dry run's 32-wide
    matrices)."""
    components, rank, top_k = (8, 4, 4) if dry_run else (64, 48, 32)

    def lorsa() -> FineTuningMethod:
        return LoRSA(target_modules=targets, num_components=components, rank=rank)

    def speclora() -> FineTuningMethod:
        return SpecLoRA(target_modules=targets, r=8, alpha=16, dropout=0.0, top_k=top_k)

    return {
        "peft LoRA r=8": lambda: LoRA(target_modules=targets, r=8, alpha=16, dropout=0.0),
        "peft DoRA r=8": lambda: DoRA(target_modules=targets, r=8, alpha=16, dropout=0.0),
        "LoRSA |S|=64 r=48": lorsa,
        "SpecLoRA r=8 k=32": speclora,
        "full fine-tuning": FullFineTuning,
        "LoRSA compiled": lorsa,
        "SpecLoRA compiled": speclora,
    }


def batch_for(shape: dict[str, object], device: torch.device) -> dict[str, torch.Tensor]:
    size, length = shape["batch"]  # type: ignore[misc]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, int(shape["vocab"]), (size, length), generator=g)  # type: ignore[call-overload]
    labels = ids.clone() if shape["lm"] else torch.randint(0, 2, (size,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def measure(
    shape_name: str, method_name: str, args: argparse.Namespace, device: torch.device
) -> dict[str, object]:
    shape = shapes(args.dry_run)[shape_name]
    torch.manual_seed(0)
    model: nn.Module = shape["make"]().to(device)  # type: ignore[operator]
    method = methods(shape["targets"], args.dry_run)[method_name]()  # type: ignore[arg-type]
    model = method.apply(model, head=shape["head"]).to(device).train()  # type: ignore[arg-type]
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    forward: Callable[..., torch.Tensor] = model
    if method_name.endswith("compiled"):
        forward = torch.compile(model)
    batch = batch_for(shape, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    row = {
        "shape": shape_name,
        "method": method_name,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "step_ms": round(1000 * statistics.median(times), 3),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
    }
    del model, forward, optimizer, params, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def with_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each row's step time and memory over peft LoRA's of the same shape."""
    lora = {r["shape"]: r for r in rows if r["method"] == "peft LoRA r=8" and "error" not in r}
    out = []
    for row in rows:
        base = lora.get(row["shape"])
        ratio = {}
        if base is not None and "error" not in row:
            ratio["x_lora_step"] = round(float(row["step_ms"]) / float(base["step_ms"]), 3)  # type: ignore[arg-type]
            if row["peak_mib"] is not None and base["peak_mib"]:
                ratio["x_lora_memory"] = round(float(row["peak_mib"]) / float(base["peak_mib"]), 3)  # type: ignore[arg-type]
        out.append({**row, **ratio})
    return out


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| shape | method | trainable | step (ms) | x LoRA step | peak memory (MiB) | x LoRA memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | – | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['method']} | {int(r['trainable']):,} | {r['step_ms']} | "  # type: ignore[call-overload]
            f"{r.get('x_lora_step', '–')} | {r['peak_mib'] if r['peak_mib'] is not None else '–'} | "
            f"{r.get('x_lora_memory', '–')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=["bert-base", "llama-1b"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16-mixed")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps, no torch.compile")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/adapter_cost"))
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup, args.bf16 = 1, 1, False
    device = torch.device(args.device)
    rows: list[dict[str, object]] = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for shape_name in args.shapes:
        for method_name in methods([]):
            if args.dry_run and method_name.endswith("compiled"):
                continue
            try:
                rows.append(measure(shape_name, method_name, args, device))
            except Exception as error:  # out of memory, a compile failure: the row says so, the rest run
                message = f"{type(error).__name__}: {error}"[:120]
                rows.append({"shape": shape_name, "method": method_name, "error": message})
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
            setting = {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "precision": "bf16-mixed" if args.bf16 else "32",
                "steps": args.steps,
                "warmup": args.warmup,
                "dry_run": args.dry_run,
            }
            staging = args.output.with_name(args.output.name + ".json.tmp")
            staging.write_text(json.dumps({"setting": setting, "rows": with_ratios(rows)}, indent=1))
            staging.replace(args.output.with_suffix(".json"))
    print(table(with_ratios(rows)))


if __name__ == "__main__":
    main()
