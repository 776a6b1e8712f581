"""Dotted-name rules shared by methods, callbacks and the spectral maths (no torch import)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def matches(name: str, pattern: str) -> bool:
    """peft's rule for a list of target names: the full name, or a suffix after a dot."""
    return name == pattern or name.endswith("." + pattern)


def within(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` or a module that holds it (a dotted prefix) :func:`matches` one of ``patterns``:
    ``query`` covers ``…query.lora_A.default.weight``, ``lora_A`` covers ``…lora_A.default``."""
    parts = name.split(".")
    owners = [".".join(parts[:end]) for end in range(len(parts), 0, -1)]
    return any(matches(owner, p) for owner in owners for p in patterns)


def layer_role(name: str) -> tuple[str, int] | None:
    """Split a parameter name at its first numeric component: the role and the layer index.

    ``encoder.layer.3.attention.self.query.weight`` -> (``encoder.layer.*.attention.self.query.weight``, 3);
    None for names outside a layer stack (embeddings, task heads).
    """
    found = _LAYER_INDEX.search(name)
    if found is None:
        return None
    return f"{name[: found.start()]}.*.{name[found.end() :]}", int(found.group(1))
