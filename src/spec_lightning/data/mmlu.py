"""MMLU evaluation: multiple choice scored by the log-likelihood of the answer letter, k-shot prompts."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorWithPadding

from spec_lightning.data.base import TokenizedDataModule

LETTERS = ("A", "B", "C", "D")


def format_question(question: str, choices: list[str], answer: int | None = None) -> str:
    """One question as in Hendrycks et al.: the choices lettered, then ``Answer:`` (and the letter)."""
    lines = [
        question.strip(),
        *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)),
    ]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[answer]}\n\n" if answer is not None else "")


def subject_header(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def read_mmlu_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    """Rows of an MMLU CSV: the original headerless layout (answer a letter) or one with a
    ``question,choice0..3,answer`` header (answer an index 0-3)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][0] == "question":
        rows = rows[1:]
    out = []
    for number, row in enumerate(rows, start=1):
        if len(row) != 6:
            raise ValueError(
                f"{path}, row {number}: expected question, 4 choices and answer, got {len(row)} fields"
            )
        answer = LETTERS.index(row[5]) if row[5] in LETTERS else int(row[5])
        out.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": answer})
    return out


class MMLUDataModule(TokenizedDataModule):
    """MMLU (57 subjects, 4 choices) for ``validate``/``test``: evaluation only.

    Each test question is prompted with the subject header and the subject's first ``shots`` dev
    questions with their answers (Hendrycks et al.'s 5-shot format). The model's answer is
    argmax_c log p(" c" | prompt) over the letters A-D; :class:`CausalLMModule` reports accuracy
    over all questions, the mean of the per-subject accuracies and each subject's. Shots are dropped
    from the front until the prompt fits ``max_length``; a zero-shot prompt that still does not fit
    keeps its last ``max_length`` tokens.

    Sources: ``data_dir`` (MMLU's ``dev/`` and ``test/`` folders of ``<subject>_{dev,test}.csv``),
    else ``datasets.load_dataset(hub_name, "all")``.

    Args:
        tokenizer: tokenizer name or path (linked from ``model.backbone`` in the CLI).
        data_dir: the MMLU data folder.
        hub_name: dataset id on the hub.
        subjects: evaluate these subjects only (all by default).
        shots: dev examples in every prompt (0-5).
        limit_per_subject: evaluate the first N test questions of every subject.
        max_length: prompt length limit in tokens.
        batch_size: questions per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: str = "gpt2",
        data_dir: str | None = None,
        hub_name: str = "cais/mmlu",
        subjects: list[str] | None = None,
        shots: int = 5,
        limit_per_subject: int | None = None,
        max_length: int = 2048,
        batch_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers, seed=0)
        self.check_positive_length(max_length, "data.init_args.max_length")
        if not 0 <= shots <= 5:
            raise ValueError(
                f"data.init_args.shots must be 0-5 (MMLU has 5 dev questions per subject), got {shots}"
            )
        self.save_hyperparameters()
        self.dataset_name = "MMLU"
        self.subjects: list[str] = []

    def build_splits(self) -> dict[str, datasets.Dataset]:
        dev, test = self._load()
        available = sorted({row["subject"] for row in test})
        wanted = self.hparams.subjects or available
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; choose from {available}")
        self.subjects = sorted(wanted)
        limit = self.hparams.limit_per_subject
        rows = [
            row
            for subject in self.subjects
            for row in [r for r in test if r["subject"] == subject][: limit if limit is not None else None]
        ]
        shots = {s: [r for r in dev if r["subject"] == s][: self.hparams.shots] for s in self.subjects}
        choice_ids = self.choice_ids()
        encoded = datasets.Dataset.from_list(
            [self._encode(row, shots[row["subject"]], choice_ids) for row in rows]
        )
        return {"validation": encoded, "test": encoded}

    def _load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        data_dir = self.hparams.data_dir
        if data_dir is None:
            hub = datasets.load_dataset(self.hparams.hub_name, "all")
            return list(hub["dev"]), list(hub["test"])
        folder = Path(data_dir)
        splits = []
        for split in ("dev", "test"):
            files = sorted((folder / split).glob(f"*_{split}.csv"))
            if not files:
                raise FileNotFoundError(
                    f"{folder / split} holds no <subject>_{split}.csv files (data.init_args.data_dir)"
                )
            splits.append([row for f in files for row in read_mmlu_csv(f, f.name[: -len(f"_{split}.csv")])])
        return splits[0], splits[1]

    def _encode(
        self, row: dict[str, Any], shots: list[dict[str, Any]], choice_ids: list[int]
    ) -> dict[str, Any]:
        tokenizer, max_length = self.tokenizer, self.hparams.max_length
        question = format_question(row["question"], row["choices"])
        for k in range(len(shots), -1, -1):
            examples = "".join(format_question(s["question"], s["choices"], s["answer"]) for s in shots[:k])
            ids = tokenizer(subject_header(row["subject"]) + examples + question)["input_ids"]
            if len(ids) <= max_length:
                break
        ids = ids[-max_length:]
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "choice_ids": choice_ids,
            "answer": row["answer"],
            "subject": self.subjects.index(row["subject"]),
        }

    def choice_ids(self) -> list[int]:
        """The token of " A" .. " D" (the letter after ``Answer:``): the last token of each."""
        return [self.tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]

    def collator(self) -> DataCollatorWithPadding:
        return DataCollatorWithPadding(self.tokenizer)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        raise ValueError(
            "MMLU is for evaluation only: fine-tune on another datamodule (e.g. InstructionDataModule), then "
            "`spec-lightning test --config <mmlu.yaml> --ckpt_path <checkpoint>`"
        )
