"""Language modelling (WikiText-2, OpenWebText-style text) as packed blocks of ``block_size`` tokens."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import datasets
from transformers import default_data_collator

from spec_lightning.data.base import TokenizedDataModule, load_local_file

#: Split -> file names looked for in ``data_dir`` (WikiText's raw and tokenised releases, plain text).
SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}
#: Lines concatenated at a time; each group drops its tail shorter than a block (run_clm: 1,000).
GROUP_LINES = 10_000
SUFFIXES = (".txt", ".raw", ".tokens", ".json", ".jsonl", ".parquet")


class LanguageModelingDataModule(TokenizedDataModule):
    """Text tokenised once (``datasets``' cache keeps it), concatenated and cut into blocks.

    Every split's texts are tokenised without special tokens, concatenated in order and cut into
    blocks of ``block_size`` tokens (per 10,000 lines the tail shorter than a block is dropped, as in
    transformers' ``run_clm``); a block is its own label sequence, so the model scores every token
    but the first.

    Sources, first match wins: ``data_files`` (split -> ``.txt``/``.raw``/``.tokens``, one line per
    example, or ``.json``/``.jsonl``/``.parquet`` with a ``text_column``), ``data_dir`` (a folder with
    WikiText's ``wiki.{train,valid,test}.raw`` or ``{train,valid,test}.txt``), else
    ``datasets.load_dataset(hub_name, hub_config)``.

    Args:
        tokenizer: tokenizer name or path (linked from ``model.backbone`` in the CLI).
        data_dir: a folder of per-split text files.
        data_files: split name (train, validation, test) -> local file, overriding ``data_dir``.
        hub_name: dataset id on the hub.
        hub_config: its configuration.
        text_column: the column holding the text.
        block_size: tokens per training example.
        batch_size: blocks per batch.
        train_limit: keep the first N training blocks.
        validation_size: carve this many training blocks off as validation when the source has none.
        tuning_size: hold out this many of the remaining training blocks as a tuning split (drawn with
            ``seed``; see :class:`~spec_lightning.GLUEDataModule`).
        validate_on: ``"tuning"`` validates on the tuning split (hyper-parameter sweeps).
        num_workers: DataLoader workers.
        seed: seed of the validation carve and of the per-epoch shuffle.
    """

    def __init__(
        self,
        tokenizer: str = "gpt2",
        data_dir: str | None = None,
        data_files: dict[str, str] | None = None,
        hub_name: str = "Salesforce/wikitext",
        hub_config: str | None = "wikitext-2-raw-v1",
        text_column: str = "text",
        block_size: int = 512,
        batch_size: int = 8,
        train_limit: int | None = None,
        validation_size: int | None = None,
        tuning_size: int | None = None,
        validate_on: Literal["validation", "tuning"] = "validation",
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers, seed)
        if block_size < 2:
            raise ValueError(f"data.init_args.block_size must be >= 2 tokens, got {block_size}")
        self.check_tuning(tuning_size, validate_on)
        self.save_hyperparameters()
        self.dataset_name = "the language-modelling data"

    def build_splits(self) -> dict[str, datasets.Dataset]:
        hp = self.hparams
        blocks = {split: self._pack(split, ds) for split, ds in self._load().items()}
        if "train" not in blocks:
            raise ValueError("the language-modelling source has no train split; add data_files.train")
        if hp.train_limit is not None:
            blocks["train"] = blocks["train"].select(range(min(hp.train_limit, len(blocks["train"]))))
        if "validation" not in blocks:
            if hp.validation_size is None:
                raise ValueError(
                    "the language-modelling source has no validation split; add data_files.validation or set "
                    "data.init_args.validation_size"
                )
            blocks["train"], blocks["validation"] = self.hold_out(
                blocks["train"], hp.validation_size, "validation_size"
            )
        return self.tuning(blocks)

    def _load(self) -> dict[str, datasets.Dataset]:
        hp = self.hparams
        if hp.data_files:
            return {
                split: load_local_file(Path(path), SUFFIXES, "data.init_args.data_files")
                for split, path in hp.data_files.items()
            }
        if hp.data_dir:
            folder = Path(hp.data_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"data.init_args.data_dir={hp.data_dir!r} is not a folder")
            found = {
                split: next(folder / n for n in names if (folder / n).is_file())
                for split, names in SPLIT_FILES.items()
                if any((folder / n).is_file() for n in names)
            }
            if not found:
                raise FileNotFoundError(
                    f"{folder} holds none of {sorted(chain(*SPLIT_FILES.values()))}; "
                    "name the files with data_files"
                )
            return {
                split: load_local_file(path, SUFFIXES, "data.init_args.data_dir")
                for split, path in found.items()
            }
        return dict(datasets.load_dataset(hp.hub_name, hp.hub_config))

    def _pack(self, split: str, ds: datasets.Dataset) -> datasets.Dataset:
        """Tokenise, concatenate and cut into blocks: input_ids = labels, each ``block_size`` long."""
        column, size = self.hparams.text_column, self.hparams.block_size
        if column not in ds.column_names:
            raise ValueError(
                f"{split} split: no {column!r} column (found {ds.column_names}); set text_column"
            )

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            return self.tokenizer(batch[column], add_special_tokens=False)

        def group(batch: dict[str, list]) -> dict[str, list]:
            ids = list(chain(*batch["input_ids"]))
            cut = len(ids) - len(ids) % size
            blocks = [ids[i : i + size] for i in range(0, cut, size)]
            return {"input_ids": blocks, "attention_mask": [[1] * size for _ in blocks], "labels": blocks}

        tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenising {split}")
        packed = tokens.map(
            group,
            batched=True,
            batch_size=GROUP_LINES,
            remove_columns=tokens.column_names,
            desc=f"packing {split}",
        )
        if len(packed) == 0:
            total = sum(len(ids) for ids in tokens["input_ids"])
            raise ValueError(
                f"the {split} split has {total} tokens, fewer than one block of {size}; "
                "lower data.init_args.block_size or add text"
            )
        return packed

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return default_data_collator
