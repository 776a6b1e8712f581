"""Imports flow one way: the maths (spectral/, method layers) never imports Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spec_lightning"
PURE = sorted(
    [
        *(SRC / "spectral").glob("*.py"),
        *(SRC / "methods").glob("*/layer.py"),
        *(SRC / "methods" / "mftc").glob("*.py"),
    ]
)


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(SRC)))
def test_maths_does_not_import_lightning(path: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"lightning", "pytorch_lightning"}, f"{path.name} imports Lightning"
