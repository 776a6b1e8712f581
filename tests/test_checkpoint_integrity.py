"""Checkpoint integrity: a digest of the saved weights checked on load, clear errors for empty or truncated
files, and atomic writes beside the target."""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from spec_lightning import GLUEDataModule, LoRA, SequenceClassificationModule
from spec_lightning.cli import build_cli
from spec_lightning.io.checkpoints import (
    DIGEST_KEY,
    AtomicCheckpointIO,
    check_checkpoint_file,
    load_checkpoint,
    tensor_digest,
)
from spec_lightning.methods import FullFineTuning
from tests.conftest import composed_args


def fit(tiny_bert: str, sst2_dir: str, root: Path, method: object, ckpt_path: str | None = None) -> Path:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)],
        plugins=[AtomicCheckpointIO()],
    )
    module = SequenceClassificationModule(tiny_bert, method)  # type: ignore[arg-type]
    trainer.fit(
        module,
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=8),
        ckpt_path=ckpt_path,
    )
    return root / "ckpt" / "last.ckpt"


def test_digest_by_hand() -> None:
    """Name, dtype, shape and bytes all count; order of insertion does not; non-tensors are skipped."""
    a = {"w": torch.arange(4.0), "b": torch.zeros(2, dtype=torch.bfloat16), "step": 3}
    import hashlib

    expected = hashlib.sha256()
    for name, t in (("b", a["b"]), ("w", a["w"])):
        expected.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        expected.update(t.view(torch.uint8).numpy().tobytes())
    assert tensor_digest(a) == expected.hexdigest()
    assert tensor_digest({"b": a["b"], "w": a["w"]}) == tensor_digest(a)
    assert tensor_digest({**a, "w": torch.arange(4.0).reshape(2, 2)}) != tensor_digest(a)
    assert tensor_digest({**a, "w": torch.arange(4.0).double()}) != tensor_digest(a)


def test_a_changed_adapter_weight_is_refused_on_load(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    last = fit(tiny_bert, sst2_dir, tmp_path, LoRA(r=4))
    checkpoint = load_checkpoint(last)
    assert checkpoint[DIGEST_KEY] == tensor_digest(checkpoint["adapter_state_dict"])
    name = sorted(checkpoint["adapter_state_dict"])[0]
    checkpoint["adapter_state_dict"][name].view(-1)[0] += 1e-3
    torch.save(checkpoint, last)
    with pytest.raises(ValueError, match="is corrupted: its weights do not match the digest"):
        fit(tiny_bert, sst2_dir, tmp_path / "again", LoRA(r=4), ckpt_path=str(last))


def test_flipped_bytes_in_the_file_are_refused(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    """torch's zip reader loads a file whose weight bytes were flipped; the digest does not."""
    last = fit(tiny_bert, sst2_dir, tmp_path, FullFineTuning())
    with zipfile.ZipFile(last) as archive:  # the largest tensor (the word embeddings), stored uncompressed
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(last.read_bytes())
    start = (
        info.header_offset
        + 30
        + int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    )
    start += int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    raw[start + info.file_size // 2] ^= 0xFF
    last.write_bytes(bytes(raw))
    torch.load(last, weights_only=True)  # loads without a word
    with pytest.raises(ValueError, match="is corrupted"):
        fit(tiny_bert, sst2_dir, tmp_path / "again", FullFineTuning(), ckpt_path=str(last))


def test_empty_and_truncated_files_name_the_problem(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\): it was not written to the end"):
        load_checkpoint(empty)
    last = fit(tiny_bert, sst2_dir, tmp_path, LoRA(r=4))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match="is not a complete checkpoint archive"):
        check_checkpoint_file(truncated)
    args = [
        *composed_args(tiny_bert, sst2_dir),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=1",
    ]
    with pytest.raises(ValueError, match=r"empty.ckpt is empty \(0 bytes\)"):
        build_cli(["fit", *args, f"--ckpt_path={empty}"])
    with pytest.raises(ValueError, match="not a complete checkpoint archive"):
        build_cli(["validate", *args, f"--ckpt_path={truncated}"])


def test_atomic_writes_keep_the_previous_file_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    staged: list[str] = []
    real_save = torch.save

    def full_disk(obj: object, f: object, *args: object, **kwargs: object) -> None:
        staged.extend(str(p) for p in target.parent.iterdir() if p.name != "last.ckpt")
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert Path(staged[0]).parent == target.parent  # beside the target: a rename, never a copy
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(target)["step"] == 1


def test_the_cli_writes_checkpoints_atomically(tiny_bert: str, sst2_dir: str, tmp_path: Path) -> None:
    args = [
        *composed_args(tiny_bert, sst2_dir),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=1",
    ]
    cli = build_cli(["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
