"""DSCA's k-NN search against the number of blocks m: where the exact search stops paying (issue 42).

For each m in ``--blocks``: synthetic unit-normalised sketches (s = 32, 10 planted groups plus noise, as
``benchmarks/clustering_cost.py`` makes them), k = ⌈log₂ m⌉ neighbours (DSCA's default). Timed, in one
process, each the median of ``--repeats`` runs: the blocked exact search on torch matmuls
(``spectral/neighbors.blocked_exact_neighbours``, the exact path on a GPU; here on the CPU),
scikit-learn's brute force (the exact path on the CPU), and the IVF index (``ivf``, ``--probes``
cells per query) with its recall against the exact neighbours (every row; the exact search's result
is the reference). The ratios are within one run, so they hold on a busy machine; the seconds need a
quiet one.

Example::

    python -m benchmarks.neighbor_search --threads 2
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from benchmarks.common import write_results
from spec_lightning.spectral import neighbors

GROUPS = 10
SKETCH_DIM = 32


def sketches(m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((GROUPS, SKETCH_DIM))
    points = directions[rng.integers(0, GROUPS, m)] + 0.5 * rng.standard_normal((m, SKETCH_DIM))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def timed(run: Callable[[], tuple[np.ndarray, np.ndarray]], repeats: int) -> tuple[float, np.ndarray]:
    times, found = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        found = run()[1]
        times.append(time.perf_counter() - start)
    assert found is not None
    return statistics.median(times), found


def row(m: int, repeats: int, probes: int, sklearn_up_to: int) -> dict[str, float | int]:
    points = sketches(m)
    k = math.ceil(math.log2(m))
    blocked_s, exact = timed(lambda: neighbors.blocked_exact_neighbours(points, k), repeats)
    out: dict[str, float | int] = {"blocks": m, "k": k, "blocked_exact_s": blocked_s}
    if m <= sklearn_up_to:
        brute = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(points)
        out["sklearn_brute_s"], _ = timed(lambda: brute.kneighbors(n_neighbors=k), repeats)
    ivf_s, found = timed(lambda: neighbors._ivf_neighbours(points.astype(np.float32), k, probes, 0), repeats)
    out |= {"ivf_s": ivf_s, "ivf_recall": neighbors.neighbour_recall(found, exact)}
    return out


def probe_sweep(m: int, probe_counts: list[int]) -> list[dict[str, float | int]]:
    """IVF's time and recall at m points for each probe count, against scikit-learn's exact neighbours."""
    points = sketches(m)
    k = math.ceil(math.log2(m))
    exact = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(points).kneighbors(n_neighbors=k)[1]
    out = []
    for probes in probe_counts:
        start = time.perf_counter()
        found = neighbors._ivf_neighbours(points.astype(np.float32), k, probes, 0)[1]
        seconds = time.perf_counter() - start
        recall = neighbors.neighbour_recall(found, exact)
        out.append({"blocks": m, "probes": probes, "ivf_s": seconds, "ivf_recall": recall})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[5_000, 10_000, 20_000, 50_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, default=neighbors.PROBES)
    parser.add_argument("--sklearn-up-to", type=int, default=50_000, help="time scikit-learn up to this m")
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--sweep-blocks", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--sweep-probes", type=int, nargs="*", default=[4, 16, 32, 64])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/neighbor_search"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row(m, args.repeats, args.probes, args.sklearn_up_to) for m in args.blocks]
    header = (
        f"# DSCA's k-NN search: exact (blocked torch matmuls) against IVF\n\n"
        f"`python -m benchmarks.neighbor_search --threads {args.threads}`; {platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}; synthetic unit sketches (s = {SKETCH_DIM}, "
        f"{GROUPS} planted groups), k = ⌈log₂ m⌉, median of {args.repeats} runs; IVF with "
        f"{args.probes} probes, recall against the exact neighbours of every block."
    )
    lines = [
        "| blocks m | k | blocked exact (s) | scikit-learn brute (s) | IVF (s) | IVF recall "
        "| exact / IVF time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        brute = f"{r['sklearn_brute_s']:.2f}" if "sklearn_brute_s" in r else "–"
        lines.append(
            f"| {r['blocks']:,} | {r['k']} | {r['blocked_exact_s']:.2f} | {brute} | {r['ivf_s']:.2f} | "
            f"{r['ivf_recall']:.3f} | {r['blocked_exact_s'] / r['ivf_s']:.2f} |"
        )
    sweep = [r for m in args.sweep_blocks for r in probe_sweep(m, args.sweep_probes)]
    if sweep:
        cells = ", ".join(f"{m:,}: {max(1, m // neighbors.CELL_SIZE)}" for m in args.sweep_blocks)
        lines += [
            "",
            f"IVF's probes (cells scanned per query; cells at m = {cells}), one run each:",
            "",
            "| blocks m | probes | IVF (s) | IVF recall |",
            "|---|---|---|---|",
            *(
                f"| {r['blocks']:,} | {r['probes']} | {r['ivf_s']:.2f} | {r['ivf_recall']:.3f} |"
                for r in sweep
            ),
        ]
    write_results(args.output, header, "\n".join(lines), rows + sweep)


if __name__ == "__main__":
    main()
