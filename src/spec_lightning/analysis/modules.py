"""Figures of MFTC: the block-to-module assignment per layer, and the search predictor's quality."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from spec_lightning.naming import layer_role  # noqa: E402
from spec_lightning.spectral.blocks import BlockMap  # noqa: E402


def assignment_matrix(labels: np.ndarray, block_map: BlockMap) -> tuple[np.ndarray, list[str]]:
    """(rows, blocks per row) module ids, one row per parameter role and layer (−1 pads), and the
    row names: the heatmap of which module each block belongs to."""
    rows, names = [], []
    for p in block_map.parameters:
        rows.append(labels[p.first : p.first + p.count])
        names.append(p.name)
    width = max(len(r) for r in rows)
    matrix = np.full((len(rows), width), -1)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix, names


def assignment_figure(labels: np.ndarray, block_map: BlockMap, title: str) -> Figure:
    """A heatmap: one row per matrix (layer by layer), one column per block, colour = module id."""
    matrix, names = assignment_matrix(labels, block_map)
    fig, ax = plt.subplots(figsize=(9, 0.18 * len(names) + 1.5))
    modules = int(matrix.max()) + 1
    cmap = plt.get_cmap("tab20" if modules > 10 else "tab10", modules)
    shown = np.ma.masked_less(matrix, 0)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=modules - 0.5)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=5)
    ax.set_xlabel("block (head or neuron group)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="module", ticks=range(modules))
    fig.tight_layout()
    return fig


def _short(name: str) -> str:
    """``model.bert.encoder.layer.3.attention.self.query.weight`` -> ``3 attention.self.query``."""
    found = layer_role(name)
    if found is None:
        return name.removesuffix(".weight")[-40:]
    return f"{found[1]} {found[0].split('.*.')[1].removesuffix('.weight')}"


def predictor_figure(predicted: np.ndarray, measured: np.ndarray, title: str) -> Figure:
    """Predicted against measured accuracy gains of probed module combinations, with y = x."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(predicted, measured)
    low = float(min(predicted.min(), measured.min()))
    high = float(max(predicted.max(), measured.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=1)
    ax.set_xlabel("predicted ΔA (Σ b^A)")
    ax.set_ylabel("measured ΔA")
    ax.set_title(title)
    fig.tight_layout()
    return fig
