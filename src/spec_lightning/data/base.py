"""What every DataModule shares: the tokenizer, local-file loading and seeded, rank-aware loaders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from datasets.exceptions import DatasetGenerationError
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from spec_lightning._lightning import TypedHyperparameters
from spec_lightning.io.pretrained import resolve_pretrained

#: File suffix -> ``datasets`` builder for local files.
LOADERS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".raw": "text",
    ".tokens": "text",
}


def load_local_file(path: Path, suffixes: tuple[str, ...], argument: str) -> datasets.Dataset:
    """One local file as a Dataset through ``datasets.load_dataset`` (cached, memory-mapped).

    Text files keep their line breaks, one example per line. ``argument`` names the setting that
    gave the path, for the error messages.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist ({argument})")
    if path.suffix not in suffixes:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r} for {argument}; use {', '.join(suffixes)}"
        )
    builder = LOADERS[path.suffix]
    options: dict[str, Any] = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except ValueError as err:  # e.g. an empty JSON list: "corresponds to no data"
        raise ValueError(f"{path}: no examples could be read ({argument}): {err}") from err
    except DatasetGenerationError as err:  # the reader's own error is its cause
        cause = err.__cause__
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(
                f"{path}: the bytes at offset {cause.start} are not UTF-8 ({cause.reason}); re-save the "
                f"file as UTF-8 ({argument})"
            ) from err
        raise ValueError(f"{path}: could not be read as {builder} ({argument}): {cause or err}") from err


class TokenizedDataModule(TypedHyperparameters, L.LightningDataModule):
    """Splits tokenised once in ``setup``, served by seeded loaders that shard the training set by rank.

    Subclasses fill ``self.splits`` in :meth:`build_splits` and say how to batch in :meth:`collator`.
    ``test`` uses the ``test`` split where it has labels, else ``validation``.

    Args:
        tokenizer: tokenizer name or path (linked from ``model.backbone`` in the CLI).
        batch_size: examples per training batch (also used for evaluation).
        num_workers: DataLoader workers.
        seed: seed of the subset draws and of the per-epoch shuffle.
    """

    #: What the data is, in error messages.
    dataset_name = "the dataset"

    def __init__(self, tokenizer: str, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"data.init_args.batch_size must be >= 1 and num_workers >= 0, got {batch_size} and "
                f"{num_workers}"
            )
        self.seed = seed
        self.splits: dict[str, datasets.Dataset] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.hparams.tokenizer))
            if self._tokenizer.pad_token is None:  # GPT-2 style tokenizers ship without one
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    @staticmethod
    def check_positive_length(length: int, key: str) -> None:
        """Refuse a length below one token when the datamodule is built (0 would mean "no truncation" to
        the tokenizer, and a negative one an OverflowError deep inside it)."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{key} must be a whole number of tokens >= 1, got {length!r}")

    def check_max_length(self, length: int, key: str) -> None:
        """Refuse a length over the model's positions (a position-embedding index error otherwise,
        at the first long batch). Models whose config states no limit are not checked."""
        try:
            config = AutoConfig.from_pretrained(resolve_pretrained(self.hparams.tokenizer))
        except (OSError, ValueError):  # a tokenizer-only folder: nothing to check against
            return
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit is not None and length > limit:
            raise ValueError(
                f"{key}={length} exceeds the {limit} positions of {self.hparams.tokenizer}; set it to at "
                f"most {limit}"
            )

    @staticmethod
    def check_tuning(tuning_size: int | None, validate_on: str) -> None:
        """Refuse an empty tuning split, or validating on one that is not held out."""
        if tuning_size is not None and tuning_size < 1:
            raise ValueError(f"data.init_args.tuning_size must be >= 1 example, got {tuning_size}")
        if validate_on == "tuning" and tuning_size is None:
            raise ValueError(
                "data.init_args.validate_on='tuning' needs a tuning split: set data.init_args.tuning_size"
            )

    def hold_out(
        self, train: datasets.Dataset, size: int, key: str
    ) -> tuple[datasets.Dataset, datasets.Dataset]:
        """(the rest, ``size`` examples drawn with the data seed) of ``train``; ``key`` names the setting."""
        if size >= len(train):
            raise ValueError(
                f"data.init_args.{key}={size} leaves no training example of the {len(train)}; hold out fewer"
            )
        parts = train.train_test_split(test_size=size, seed=self.seed)
        return parts["train"], parts["test"]

    def tuning(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        """Hold ``tuning_size`` training examples out (every run of a comparison, so that all train on the
        same examples); with ``validate_on="tuning"`` (a sweep) they replace the validation split."""
        size = self.hparams.tuning_size
        if size is None:
            return splits
        train, held = self.hold_out(splits["train"], size, "tuning_size")
        validation = held if self.hparams.validate_on == "tuning" else splits["validation"]
        return {**splits, "train": train, "validation": validation}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.build_splits()

    def build_splits(self) -> dict[str, datasets.Dataset]:
        """Load, select and tokenise: split name -> Dataset of model inputs."""
        raise NotImplementedError

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Turns a list of examples into a batch of tensors."""
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"{self.dataset_name} has no {split!r} split in this source")
        ds = self.splits[split]
        sampler: DistributedSampler | None = None
        if shuffle:
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            # A seeded, epoch-indexed shuffle (Lightning calls set_epoch): resuming replays the same order.
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(
            ds,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
            # Its own generator: creating an iterator then leaves the global RNG (dropout) untouched.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.splits else "validation")
