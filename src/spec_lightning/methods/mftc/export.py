"""MFTC's adapter-only export: the trained parameter slices and the head, a few MB, which
:func:`~spec_lightning.spectral.blocks.load_slices` writes back into a freshly loaded base model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spec_lightning.distributed import full_tensor
from spec_lightning.spectral.blocks import save_slices

#: The file :func:`export_slices` writes.
SLICES_FILE = "mftc_slices.safetensors"


def export_slices(
    model: nn.Module,
    trained: Mapping[str, torch.Tensor | None],
    report: Mapping[str, Any],
    directory: str | Path,
    module: nn.Module | None = None,
) -> Path:
    """Write ``trained`` (parameter name -> mask of its trained slices, None for a whole tensor) to
    ``directory/mftc_slices.safetensors`` and ``report`` to ``module_search.json``; names relative to
    ``module`` (a submodule of ``model``, e.g. the bare model inside a LightningModule) when given.
    Sharded (DTensor) parameters are all-gathered, a collective every rank must call; global rank 0
    writes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    if module is not None:
        prefix = next((f"{n}." for n, m in model.named_modules() if m is module and n), None)
        if prefix is None:
            raise ValueError("ModuleSearch.export: module is not a submodule of pl_module")
        outside = [n for n in trained if not n.startswith(prefix)]
        if outside:
            raise ValueError(
                f"ModuleSearch.export: {outside[:3]} were trained but lie outside module "
                f"({prefix[:-1]}); export from a module that holds them all"
            )
        params = {n.removeprefix(prefix): p for n, p in params.items() if n.startswith(prefix)}
        trained = {n.removeprefix(prefix): mask for n, mask in trained.items()}
    whole = {n: full_tensor(params[n]) for n in trained}
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_slices(whole, trained, directory / SLICES_FILE)
        (directory / "module_search.json").write_text(json.dumps(report, indent=1))
    return directory / SLICES_FILE
