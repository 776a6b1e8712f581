"""Memory per GPU for fine-tuning a 7B decoder (Llama-2-7B shapes) with every method, from parameter
counts (issue 7's scaling note).

Each method is applied to the model built on the meta device (no weights, no memory), so the counts are
the methods' own. Per GPU, with bf16 mixed precision and AdamW::

    M = (2 · N_frozen + (16 + e) · N_trainable) / G + 2 · N_block

frozen weights in bf16 (2 B), trainable ones with an fp32 master copy, fp32 gradient and two fp32 Adam
moments (16 B), plus e bytes of the method's own (graph-spectral keeps θ₀ in fp32: e = 4, sharded
like the weights under FSDP2); G = 1 for
DDP (every rank holds everything), the number of shards for FSDP, which also holds one all-gathered
transformer block (N_block parameters, bf16) at a time. Activations are left out
(they scale with batch x sequence; gradient checkpointing keeps one block's)::

    python -m benchmarks.memory_7b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from spec_lightning.methods import (
    AdaLoRA,
    DoRA,
    FineTuningMethod,
    FullFineTuning,
    GraphSpectral,
    HoulsbyAdapter,
    LoRA,
    LoRSA,
    SpecLoRA,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
ATTENTION = ["q_proj", "v_proj"]
#: The methods as the GLUE configs set them, on Llama's attention names. PiSSA's factors have LoRA's
#: shapes (its SVD initialisation cannot run on the meta device); BitFit has no biases to train in Llama.
METHODS: dict[str, FineTuningMethod] = {
    "full fine-tuning": FullFineTuning(),
    "graph-spectral (full fine-tuning + L_spec)": GraphSpectral(),
    "LoRA / PiSSA r=8 q,v": LoRA(target_modules=ATTENTION, r=8),
    "DoRA r=8 q,v": DoRA(target_modules=ATTENTION, r=8),
    "AdaLoRA init_r=12 q,v": AdaLoRA(target_modules=ATTENTION, init_r=12, target_r=8, total_step=1000),
    "Houlsby adapter b=64 o,down": HoulsbyAdapter(target_modules=["o_proj", "down_proj"]),
    "LoRSA q,v": LoRSA(target_modules=ATTENTION),
    "SpecLoRA r=8 q,v": SpecLoRA(target_modules=ATTENTION, r=8),
}
#: MFTC trains the chosen modules' slices of the full model (on SST-2 it chose 9.3 % of the weights);
#: its callbacks act on each rank's shard under FSDP2.
MFTC_FRACTION = 0.10
#: Bytes per trainable parameter a method keeps besides the optimiser's: graph-spectral's θ₀ (fp32).
EXTRA_BYTES = {"graph-spectral (full fine-tuning + L_spec)": 4}
GIB = 2**30


def counts(method: FineTuningMethod) -> tuple[int, int, bool]:
    """(trainable, total) parameters after ``method.apply`` on Llama-2-7B shapes, and whether the
    method trains under FSDP."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LLAMA_7B)
    model = method.apply(model)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    return trainable, sum(p.numel() for p in model.parameters()), method.supports_fsdp


def per_gpu(trainable: int, total: int, block: int, shards: int, extra: int = 0) -> float:
    """GiB per GPU: (2 · frozen + (16 + extra) · trainable) / shards, plus one gathered block under FSDP."""
    gathered = 2 * block if shards > 1 else 0
    return ((2 * (total - trainable) + (16 + extra) * trainable) / shards + gathered) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with torch.device("meta"):
        block = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(LLAMA_7B).model.layers[0].parameters()
        )
    rows = {name: counts(method) for name, method in METHODS.items()}
    full_total = rows["full fine-tuning"][1]
    rows[f"MFTC ({MFTC_FRACTION:.0%} of the weights chosen)"] = (
        int(MFTC_FRACTION * full_total),
        full_total,
        True,
    )
    results = {
        name: {
            "trainable": trainable,
            "total": total,
            "ddp_gib": per_gpu(trainable, total, block, 1, EXTRA_BYTES.get(name, 0)),
            **{
                f"fsdp{g}_gib": per_gpu(trainable, total, block, g, EXTRA_BYTES.get(name, 0))
                if fsdp
                else None
                for g in args.shards
            },
        }
        for name, (trainable, total, fsdp) in rows.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_7b.json").write_text(json.dumps(results, indent=2))
    header = " | ".join(f"FSDP, {g} GPUs" for g in args.shards)
    lines = [
        f"| method | trainable | % | DDP (GiB per GPU) | {header} |",
        "|---|---|---|---|" + "---|" * len(args.shards),
    ]
    for name, r in results.items():
        sharded = " | ".join(
            "DDP only" if r[f"fsdp{g}_gib"] is None else f"{r[f'fsdp{g}_gib']:.1f}" for g in args.shards
        )
        share = 100 * r["trainable"] / r["total"]
        lines.append(f"| {name} | {r['trainable']:,} | {share:.3f} | {r['ddp_gib']:.1f} | {sharded} |")
    (args.out / "memory_7b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
