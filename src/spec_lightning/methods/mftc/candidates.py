"""MFTC's candidates (§3.3): for every search node (a layer) and module, the module's blocks inside that
node; the random one-per-node combinations that measure the predictor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """Module ``module``'s blocks inside search node ``node``."""

    node: str
    module: int
    blocks: list[int]
    parameters: int


def candidates_of(nodes: Sequence[str], labels: np.ndarray, sizes: np.ndarray) -> list[Candidate]:
    """One candidate per (search node, module) pair that shares blocks, nodes in first-seen order.

    Args:
        nodes: (n_blocks,) the search node of every block.
        labels: (n_blocks,) the module of every block.
        sizes: (n_blocks,) the parameters of every block.
    """
    node_of = np.array(nodes)
    out = []
    for node in dict.fromkeys(node_of.tolist()):
        for module in np.unique(labels[node_of == node]):
            blocks = np.flatnonzero((node_of == node) & (labels == module))
            out.append(Candidate(node, int(module), blocks.tolist(), int(sizes[blocks].sum())))
    return out


def blocks_of(candidates: Sequence[Candidate], chosen: np.ndarray) -> np.ndarray:
    """The sorted block ids of the chosen candidates."""
    return np.array(sorted(b for c in chosen for b in candidates[c].blocks), dtype=np.int64)


def random_combinations(node: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random selections of candidates (indices): per node one candidate drawn uniformly, each
    kept with probability 1/2 (at least the first node's, so no selection is empty).

    Args:
        node: (n,) the search-node index of every candidate.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        picks = [rng.choice(np.flatnonzero(node == n)) for n in np.unique(node)]
        out.append(np.array([c for c in picks if rng.random() < 0.5] or picks[:1]))
    return out
