"""Checkpoint files: read safely (tensors and plain values only, never code), written atomically beside
their target, and checked for integrity (a digest of the saved tensors) when read back."""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.distributed.tensor import DTensor

#: The checkpoint key holding :func:`tensor_digest` of the saved weights.
DIGEST_KEY = "tensor_digest"


def check_checkpoint_file(path: str | Path) -> Path:
    """A checkpoint path that exists and is a complete torch zip archive, or a clear error: an empty or
    truncated file (a full disk, a save killed before the atomic writer existed) would otherwise end
    in torch's bare ``EOFError`` or ``PytorchStreamReader`` error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the .ckpt file that fit wrote")
    size = path.stat().st_size
    if size == 0 or not zipfile.is_zipfile(path):
        what = "empty (0 bytes)" if size == 0 else f"not a complete checkpoint archive ({size:,} bytes)"
        raise ValueError(
            f"the checkpoint {path} is {what}: it was not written to the end (a full disk, or a save that "
            "was killed). Resume from another checkpoint of the run (an epoch checkpoint beside it), or "
            "start the run again."
        )
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU: a file that holds anything but tensors and
    plain Python values (a pickled object, which could run code on load) is refused.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty or truncated.
        pickle.UnpicklingError: the file holds objects that ``weights_only`` loading refuses.
    """
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run "
            f"code when unpickled (torch.load weights_only=True said: {str(error).splitlines()[0]}). "
            "spec_lightning's checkpoints never do; load only checkpoints you trust."
        ) from error


def tensor_digest(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (non-tensors skipped).
    torch's zip reader does not check its archive's checksums, so flipped bytes in a weight load
    silently; this digest, recorded at save time, catches them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if not torch.is_tensor(value):
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def saved_weights(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights a spec_lightning checkpoint holds: the adapter alone, or the full state dict."""
    return checkpoint.get("adapter_state_dict") or checkpoint.get("state_dict") or {}


def record_digest(checkpoint: dict[str, Any]) -> None:
    """Record :func:`tensor_digest` of the checkpoint's weights (not of FSDP2 shards, which Lightning
    writes as distributed files of their own)."""
    weights = saved_weights(checkpoint)
    if not any(isinstance(v, DTensor) for v in weights.values()):
        checkpoint[DIGEST_KEY] = tensor_digest(weights)


def verify_digest(checkpoint: Mapping[str, Any], where: str = "the checkpoint") -> None:
    """Raise when the checkpoint's weights do not match the digest it recorded (none recorded: nothing
    to check, a checkpoint written before digests were)."""
    recorded = checkpoint.get(DIGEST_KEY)
    if recorded is not None and tensor_digest(saved_weights(checkpoint)) != recorded:
        raise ValueError(
            f"{where} is corrupted: its weights do not match the digest recorded when it was saved (bytes "
            "changed on disk or in transfer). Use another copy or another checkpoint of the run."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on local disks: the file is written to a temporary file
    beside its target (same filesystem), flushed to disk, then renamed over it. Lightning's own writer
    stages through fsspec in the system's temporary folder, so with TMPDIR on another filesystem
    (a tmpfs) its "move" is a copy, and a kill or a full disk mid-copy leaves a truncated target where the
    good copy was. A failed write leaves the previous file in place and removes the temporary one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
