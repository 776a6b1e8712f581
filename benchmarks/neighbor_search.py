"""DSCA's k-NN search against the number of blocks m: where the exact search stops paying (issue 42).

For each m in ``--blocks``: synthetic unit-normalised sketches (s = 32, 10 planted groups plus noise, as
``benchmarks/clustering_cost.py`` makes them), k = ⌈log₂ m⌉ neighbours (DSCA's default). Timed, in one
process, each the median of ``--repeats`` runs: scikit-learn's brute force (the exact path on the CPU;
up to ``--sklearn-up-to``), the blocked exact search on torch matmuls
(``spectral/neighbors.blocked_exact_neighbours``, the exact path on a GPU; here on the CPU, up to
``--blocked-up-to``), and the IVF index with its probes calibrated to ``--recall`` (the default path
above the exact size; the time includes the calibration), with the probes it chose, its own estimate
of its recall and its recall against the exact neighbours (of every block where scikit-learn ran,
else of 500 sampled blocks, by faiss' flat index). Then, at ``--sweep-blocks``, the IVF search at
fixed probe counts: the recall each buys and its time. The ratios are within one run, so they hold
on a busy machine; the seconds need a quiet one.

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


def sampled_exact(points: np.ndarray, k: int, sample: np.ndarray) -> np.ndarray:
    """The exact k nearest other points of the ``sample`` rows (faiss' flat index: every distance)."""
    import faiss

    flat = faiss.IndexFlatL2(points.shape[1])
    flat.add(points.astype(np.float32))
    found = flat.search(points[sample].astype(np.float32), k + 1)[1]
    return np.array([[j for j in row if j != i][:k] for i, row in zip(sample, found, strict=True)])


def row(m: int, args: argparse.Namespace) -> dict[str, float | int]:
    points = sketches(m)
    k = math.ceil(math.log2(m))
    out: dict[str, float | int] = {"blocks": m, "k": k}
    sample = np.sort(np.random.default_rng(1).choice(m, min(m, 500), replace=False))
    if m <= args.sklearn_up_to:
        brute = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(points)
        out["sklearn_brute_s"], exact = timed(lambda: brute.kneighbors(n_neighbors=k), args.repeats)
    else:
        exact = None
    if m <= args.blocked_up_to:
        out["blocked_exact_s"], _ = timed(lambda: neighbors.blocked_exact_neighbours(points, k), args.repeats)
    results: list[neighbors.Neighbours] = []

    def ivf() -> tuple[np.ndarray, np.ndarray]:
        results.append(neighbors.search_neighbours(points, k, "ivf", recall=args.recall))
        return results[-1].distances, results[-1].indices

    out["ivf_s"], found = timed(ivf, args.repeats)
    reference = exact if exact is not None else sampled_exact(points, k, sample)
    out |= {
        "ivf_probes": results[-1].probes,
        "ivf_recall_estimate": results[-1].recall,
        "ivf_recall": neighbors.neighbour_recall(found if exact is not None else found[sample], reference),
        "recall_over": m if exact is not None else len(sample),
    }
    return out


def probe_sweep(m: int, probe_counts: list[int]) -> list[dict[str, float | int]]:
    """IVF's time and recall at m points for each fixed probe count, against the exact neighbours of
    500 sampled points."""
    points = sketches(m)
    k = math.ceil(math.log2(m))
    sample = np.sort(np.random.default_rng(1).choice(m, 500, replace=False))
    exact = sampled_exact(points, k, sample)
    out = []
    for probes in probe_counts:
        start = time.perf_counter()
        found = neighbors.search_neighbours(points, k, "ivf", probes=probes).indices
        seconds = time.perf_counter() - start
        recall = neighbors.neighbour_recall(found[sample], exact)
        out.append({"blocks": m, "probes": probes, "ivf_s": seconds, "ivf_recall": recall})
        print(out[-1], flush=True)
    return out


def exact_only(args: argparse.Namespace) -> None:
    """The blocked exact search on ``--device`` (the exact path on a GPU), timed per m: where ``auto``
    should switch to the IVF index on that device (the GPU suite's ``neighbors`` stage)."""
    device = torch.device(args.device)
    rows = []
    for m in args.blocks:
        points, k = sketches(m), math.ceil(math.log2(m))
        neighbors.blocked_exact_neighbours(points[:1000], k, device)  # warm-up: kernels, allocator

        def search(points: np.ndarray = points, k: int = k) -> tuple[np.ndarray, np.ndarray]:
            found = neighbors.blocked_exact_neighbours(points, k, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return found

        seconds, _ = timed(search, args.repeats)
        rows.append({"blocks": m, "k": k, "device": str(device), "blocked_exact_s": seconds})
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    header = (
        f"# DSCA's exact k-NN search on {name}\n\n`python -m benchmarks.neighbor_search --exact-only "
        f"--device {args.device}`; torch {torch.__version__}; synthetic unit sketches (s = {SKETCH_DIM}), "
        f"k = ⌈log₂ m⌉, median of {args.repeats} runs."
    )
    lines = ["| blocks m | k | blocked exact (s) |", "|---|---|---|"]
    lines += [f"| {r['blocks']:,} | {r['k']} | {r['blocked_exact_s']:.2f} |" for r in rows]
    write_results(args.output, header, "\n".join(lines), rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[5_000, 10_000, 20_000, 50_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recall", type=float, default=neighbors.TARGET_RECALL, help="the IVF's target")
    parser.add_argument("--sklearn-up-to", type=int, default=100_000, help="time scikit-learn up to this m")
    parser.add_argument(
        "--blocked-up-to", type=int, default=20_000, help="time the torch search up to this m"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--sweep-blocks", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--sweep-probes", type=int, nargs="*", default=[4, 16, 32, 64, 128])
    parser.add_argument("--exact-only", action="store_true", help="time only the blocked exact search")
    parser.add_argument("--device", default="cpu", help="where the blocked exact search runs (--exact-only)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/neighbor_search"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.exact_only:
        exact_only(args)
        return
    rows = []
    for m in args.blocks:
        rows.append(row(m, args))
        print(rows[-1], flush=True)
    header = (
        f"# DSCA's k-NN search: exact against IVF\n\n"
        f"`python -m benchmarks.neighbor_search --threads {args.threads}`; {platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}; synthetic unit sketches (s = {SKETCH_DIM}, "
        f"{GROUPS} planted groups), k = ⌈log₂ m⌉, median of {args.repeats} runs; IVF with its probes "
        f"calibrated to {args.recall} recall on 500 sampled blocks (time included); recall against the "
        "exact neighbours of every block (of 500 sampled blocks where marked *)."
    )
    lines = [
        "| blocks m | k | scikit-learn exact (s) | blocked torch exact (s) | IVF (s) | IVF probes "
        "| IVF recall (its estimate) | exact / IVF time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        brute = f"{r['sklearn_brute_s']:.2f}" if "sklearn_brute_s" in r else "–"
        blocked = f"{r['blocked_exact_s']:.2f}" if "blocked_exact_s" in r else "–"
        ratio = f"{r['sklearn_brute_s'] / r['ivf_s']:.2f}" if "sklearn_brute_s" in r else "–"
        star = "" if r["recall_over"] == r["blocks"] else "*"
        lines.append(
            f"| {r['blocks']:,} | {r['k']} | {brute} | {blocked} | {r['ivf_s']:.2f} | {r['ivf_probes']} | "
            f"{r['ivf_recall']:.3f}{star} ({r['ivf_recall_estimate']:.3f}) | {ratio} |"
        )
    sweep = [r for m in args.sweep_blocks for r in probe_sweep(m, args.sweep_probes)]
    if sweep:
        cells = ", ".join(f"{m:,}: {max(1, m // neighbors.CELL_SIZE)}" for m in args.sweep_blocks)
        lines += [
            "",
            f"IVF at fixed probes (cells scanned per query; cells at m = {cells}), one run each, recall on "
            "500 sampled blocks:",
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
