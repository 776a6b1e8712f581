"""Language-modelling, instruction and MMLU DataModules on tiny local files made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from spec_lightning import InstructionDataModule, LanguageModelingDataModule, MMLUDataModule
from spec_lightning.data.instruction import IGNORE_INDEX, alpaca_prompt
from spec_lightning.data.mmlu import format_question, read_mmlu_csv
from tests.conftest import WORDS


def write_text(folder: Path, lines: dict[str, int]) -> Path:
    """``<split>.txt`` files of made-up sentences, one per line (with WikiText's blank lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, n) in enumerate(lines.items()):
        text = [" ".join(WORDS[(i * 7 + j + index) % len(WORDS)] for j in range(3 + i % 5)) for i in range(n)]
        (folder / name).write_text("\n \n".join(text) + "\n")
    return folder


def test_blocks_are_the_token_stream_cut_in_order(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    folder = write_text(tmp_path, {"train.txt": 40, "valid.txt": 10})
    data = LanguageModelingDataModule(tokenizer=tiny_gpt2_lm, data_dir=str(folder), block_size=8)
    data.setup()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    stream = tokenizer((folder / "train.txt").read_text(), add_special_tokens=False)["input_ids"]
    blocks = data.splits["train"]
    assert len(blocks) == len(stream) // 8 and set(blocks.column_names) == {
        "input_ids",
        "attention_mask",
        "labels",
    }
    assert [t for block in blocks["input_ids"] for t in block] == stream[: len(blocks) * 8]
    assert blocks["labels"] == blocks["input_ids"]
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (8, 8) and (batch["labels"] == batch["input_ids"]).all()


def test_language_modeling_sources_and_errors(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    rows = [{"body": " ".join(WORDS[i % 5 :])} for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def blocks_of(**tuning: object) -> LanguageModelingDataModule:
        module = LanguageModelingDataModule(
            tokenizer=tiny_gpt2_lm,
            data_files={"train": str(tmp_path / "train.jsonl")},
            text_column="body",
            block_size=4,
            validation_size=5,
            train_limit=40,
            **tuning,
        )
        module.setup()
        return module

    data = blocks_of()
    assert len(data.splits["train"]) == 35 and len(data.splits["validation"]) == 5
    blocks = {tuple(b) for b in data.splits["train"]["input_ids"]}
    sweep, reported = blocks_of(tuning_size=7, validate_on="tuning"), blocks_of(tuning_size=7)
    assert len(sweep.splits["validation"]) == 7 and len(sweep.splits["train"]) == 28
    assert sweep.splits["train"]["input_ids"] == reported.splits["train"]["input_ids"]  # same training blocks
    assert reported.splits["validation"]["input_ids"] == data.splits["validation"]["input_ids"]
    held = [tuple(b) for b in sweep.splits["validation"]["input_ids"]]
    assert set(held) <= blocks  # held out of the training blocks, not of the validation carve
    with pytest.raises(ValueError, match="no validation split"):
        LanguageModelingDataModule(
            tiny_gpt2_lm,
            data_files={"train": str(tmp_path / "train.jsonl")},
            text_column="body",
            block_size=4,
        ).setup()
    with pytest.raises(ValueError, match="no 'text' column"):
        LanguageModelingDataModule(tiny_gpt2_lm, data_files={"train": str(tmp_path / "train.jsonl")}).setup()
    with pytest.raises(ValueError, match="fewer than one block of 100000"):
        LanguageModelingDataModule(
            tiny_gpt2_lm, data_dir=str(write_text(tmp_path / "t", {"train.txt": 3})), block_size=100_000
        ).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LanguageModelingDataModule(tiny_gpt2_lm, data_files={"train": str(tmp_path / "missing.txt")}).setup()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        LanguageModelingDataModule(tiny_gpt2_lm, data_dir=str(tmp_path / "t" / "..")).setup()
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        LanguageModelingDataModule(tiny_gpt2_lm, block_size=1)


def write_alpaca(path: Path, n: int = 12) -> Path:
    rows = [
        {
            "instruction": f"answer the question {WORDS[i % 6]}",
            "input": "the movie was good" if i % 2 else "",
            "output": f"{WORDS[i % 6]} plot",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_instruction_labels_mask_exactly_the_prompt(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    path = write_alpaca(tmp_path / "alpaca.json")
    data = InstructionDataModule(
        tiny_gpt2_lm, data_files={"train": str(path)}, validation_size=2, batch_size=4
    )
    data.setup()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    rows = {r["instruction"] + r["input"]: r for r in json.loads(path.read_text())}
    assert len(data.splits["train"]) == 10 and len(data.splits["validation"]) == 2
    for example in data.splits["train"]:
        labels, ids = example["labels"], example["input_ids"]
        masked = labels.count(IGNORE_INDEX)
        assert labels[:masked] == [IGNORE_INDEX] * masked and labels[masked:] == ids[masked:]
        prompt = tokenizer.decode(ids[:masked])
        row = next(
            r
            for r in rows.values()
            if prompt == tokenizer.decode(tokenizer(alpaca_prompt(r["instruction"], r["input"]))["input_ids"])
        )
        assert ids[masked:] == tokenizer(row["output"] + tokenizer.eos_token)["input_ids"]
    assert "### Input:" in alpaca_prompt("x", "y") and "### Input:" not in alpaca_prompt("x", "")
    batch = next(iter(data.train_dataloader()))
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all()


def test_instruction_truncation_and_errors(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    path = write_alpaca(tmp_path / "alpaca.json")
    with (
        pytest.warns(UserWarning, match=r"dropped 10 of 10 examples.*raise data.init_args.max_length"),
        pytest.raises(ValueError, match="no example has a response token"),
    ):
        InstructionDataModule(
            tiny_gpt2_lm, data_files={"train": str(path)}, validation_size=2, max_length=5
        ).setup()
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x", "output": "y"}] * 4))
    with pytest.raises(ValueError, match=r"columns \['instruction'\] are missing"):
        InstructionDataModule(
            tiny_gpt2_lm, data_files={"train": str(tmp_path / "bad.json")}, validation_size=1
        ).setup()
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json: no examples could be read"):
        InstructionDataModule(tiny_gpt2_lm, data_files={"train": str(tmp_path / "empty.json")}).setup()
    unmasked = InstructionDataModule(
        tiny_gpt2_lm, data_files={"train": str(path)}, validation_size=2, mask_prompt=False
    )
    unmasked.setup()
    assert all(ex["labels"] == ex["input_ids"] for ex in unmasked.splits["train"])


def write_mmlu(folder: Path, per_subject: int = 6) -> Path:
    """Two subjects with a header (answer index), one in MMLU's original headerless layout (letter)."""
    for split in ("dev", "test"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for subject in ("movie_plot", "bad_movie"):
            rows = ["question,choice0,choice1,choice2,choice3,answer"]
            rows += [f"the movie was {WORDS[i]},good,bad,very,not,{i % 4}" for i in range(per_subject)]
            (folder / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
        rows = [
            f'"the plot was {WORDS[i]}",good,bad,"very, very",not,{"ABCD"[i % 4]}' for i in range(per_subject)
        ]
        (folder / split / f"plot_{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_mmlu_prompts_choices_and_subjects(tiny_gpt2_lm: str, tmp_path: Path) -> None:
    folder = write_mmlu(tmp_path)
    data = MMLUDataModule(tiny_gpt2_lm, data_dir=str(folder), shots=2, limit_per_subject=4)
    data.setup("test")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    assert data.subjects == ["bad_movie", "movie_plot", "plot"]
    test = data.splits["test"]
    assert len(test) == 12 and test["subject"] == [0] * 4 + [1] * 4 + [2] * 4
    assert test["choice_ids"][0] == [tokenizer.convert_tokens_to_ids(c) for c in "abcd"]
    plot = read_mmlu_csv(folder / "test" / "plot_test.csv", "plot")
    assert plot[1]["choices"][2] == "very, very" and [r["answer"] for r in plot[:4]] == [0, 1, 2, 3]
    dev = read_mmlu_csv(folder / "dev" / "plot_dev.csv", "plot")
    expected = (
        "The following are multiple choice questions (with answers) about plot.\n\n"
        + format_question(dev[0]["question"], dev[0]["choices"], dev[0]["answer"])
        + format_question(dev[1]["question"], dev[1]["choices"], dev[1]["answer"])
        + format_question(plot[0]["question"], plot[0]["choices"])
    )
    assert test["input_ids"][8] == tokenizer(expected)["input_ids"]
    assert expected.endswith("D. not\nAnswer:") and "Answer: B\n\n" in expected
    short = MMLUDataModule(tiny_gpt2_lm, data_dir=str(folder), shots=5, max_length=40, subjects=["plot"])
    short.setup("test")
    zero_shot = tokenizer(
        "The following are multiple choice questions (with answers) about plot.\n\n"
        + format_question(plot[0]["question"], plot[0]["choices"])
    )["input_ids"]
    assert short.splits["test"]["input_ids"][0] == zero_shot  # every shot dropped to fit 40 tokens
    with pytest.raises(ValueError, match=r"unknown MMLU subjects \['astronomy'\]"):
        MMLUDataModule(tiny_gpt2_lm, data_dir=str(folder), subjects=["astronomy"]).setup()
    with pytest.raises(ValueError, match="evaluation only"):
        data.train_dataloader()
    with pytest.raises(FileNotFoundError, match="holds no <subject>_dev.csv"):
        MMLUDataModule(tiny_gpt2_lm, data_dir=str(tmp_path / "nothing")).setup()
    with pytest.raises(ValueError, match="shots must be 0-5"):
        MMLUDataModule(tiny_gpt2_lm, shots=6)
