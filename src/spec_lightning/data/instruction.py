"""Instruction tuning (Alpaca) with the standard prompt template; prompt tokens are masked from the loss."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
from transformers import DataCollatorForSeq2Seq

from spec_lightning.data.base import TokenizedDataModule, load_local_file

#: Stanford Alpaca's templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE_INDEX = -100


def alpaca_prompt(instruction: str, context: str | None) -> str:
    """The Alpaca prompt of an example, with the input section only where its input is not empty."""
    if context:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return PROMPT_NO_INPUT.format(instruction=instruction)


class InstructionDataModule(TokenizedDataModule):
    """Alpaca-style instruction data: tokens of prompt ⧺ response ⧺ EOS, labels −100 on the prompt's.

    The loss is then −(1/|R|) Σ_{t∈R} log p(x_t | x_<t) over the response tokens R only (with
    ``mask_prompt=False``, over every token). Examples are truncated to ``max_length``; one whose
    prompt alone fills it has no response token left and is dropped, with a counted warning.

    Sources: ``data_files`` (split -> ``.json``/``.jsonl``/``.parquet`` with ``instruction``,
    ``input``, ``output``; Alpaca's JSON list works as is), else ``datasets.load_dataset(hub_name)``.
    Without a validation split, ``validation_size`` examples are carved off the training set.

    Args:
        tokenizer: tokenizer name or path (linked from ``model.backbone`` in the CLI).
        data_files: split name -> local file.
        hub_name: dataset id on the hub.
        max_length: truncation length in tokens.
        batch_size: examples per batch.
        train_limit: keep the first N training examples.
        validation_size: examples carved off the training set when the source has no validation split.
        mask_prompt: exclude the prompt tokens from the loss.
        num_workers: DataLoader workers.
        seed: seed of the validation carve and of the per-epoch shuffle.
    """

    def __init__(
        self,
        tokenizer: str = "gpt2",
        data_files: dict[str, str] | None = None,
        hub_name: str = "tatsu-lab/alpaca",
        max_length: int = 512,
        batch_size: int = 8,
        train_limit: int | None = None,
        validation_size: int = 200,
        mask_prompt: bool = True,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers, seed)
        if validation_size < 1:
            raise ValueError(f"data.init_args.validation_size must be >= 1 example, got {validation_size}")
        self.check_positive_length(max_length, "data.init_args.max_length")
        self.save_hyperparameters()
        self.dataset_name = "the instruction data"

    def build_splits(self) -> dict[str, datasets.Dataset]:
        hp = self.hparams
        if hp.data_files:
            raw = {
                split: load_local_file(
                    Path(path), (".json", ".jsonl", ".parquet"), "data.init_args.data_files"
                )
                for split, path in hp.data_files.items()
            }
        else:
            raw = dict(datasets.load_dataset(hp.hub_name))
        train = raw.get("train")
        if train is None or len(train) == 0:
            raise ValueError(
                "the instruction data's training split is empty or missing; check data_files.train"
            )
        if hp.train_limit is not None:
            train = train.select(range(min(hp.train_limit, len(train))))
        if "validation" not in raw:
            parts = train.train_test_split(test_size=hp.validation_size, seed=hp.seed)
            train, raw["validation"] = parts["train"], parts["test"]
        raw["train"] = train
        return {
            split: self._tokenize(split, ds)
            for split, ds in raw.items()
            if split in ("train", "validation", "test")
        }

    def _tokenize(self, split: str, ds: datasets.Dataset) -> datasets.Dataset:
        missing = [c for c in ("instruction", "output") if c not in ds.column_names]
        if missing:
            raise ValueError(f"{split} split: columns {missing} are missing; found {ds.column_names}")
        tokenizer, max_length, mask = self.tokenizer, self.hparams.max_length, self.hparams.mask_prompt
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.hparams.tokenizer!r} has no EOS token to end the responses with"
            )

        def encode(example: dict[str, str]) -> dict[str, list[int]]:
            # As Stanford Alpaca's train.py: tokenise prompt + response + EOS together (a separately
            # tokenised response would tokenise its first word differently), mask the prompt's length.
            prompt = alpaca_prompt(example["instruction"], example.get("input"))
            ids = tokenizer(prompt + example["output"] + tokenizer.eos_token)["input_ids"][:max_length]
            masked = len(tokenizer(prompt)["input_ids"]) if mask else 0
            labels = [IGNORE_INDEX] * min(masked, len(ids)) + ids[masked:]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

        encoded = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenising {split}")
        kept = encoded.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]))
        if len(kept) < len(encoded):
            warnings.warn(
                f"{split} split: dropped {len(encoded) - len(kept)} of {len(encoded)} examples whose prompt "
                f"fills max_length={max_length}; raise data.init_args.max_length to keep them",
                stacklevel=2,
            )
        if len(kept) == 0:
            raise ValueError(f"{split} split: no example has a response token within max_length={max_length}")
        return kept

    def collator(self) -> DataCollatorForSeq2Seq:
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
