"""GLUEDataModule on tiny local files (and on the real GLUE copy in ../shared/data when present)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from spec_lightning import GLUEDataModule
from spec_lightning.data.glue_tasks import GLUE_TASKS, get_task, read_glue_tsv
from tests.conftest import SHARED_DATA, write_sst2


def test_tsv_folder_tokenises_with_dynamic_padding(tiny_bert: str, sst2_dir: str) -> None:
    dm = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, batch_size=4)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 96 and len(dm.splits["validation"]) == 32
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (4, int(lengths.max()))  # padded to the longest in the batch only


def test_limit_then_fraction_is_seeded(tiny_bert: str, sst2_dir: str) -> None:
    def train_ids(seed: int) -> list:
        dm = GLUEDataModule(
            "sst2", tokenizer=tiny_bert, data_dir=sst2_dir, train_limit=60, train_fraction=0.5, seed=seed
        )
        dm.setup("fit")
        return dm.splits["train"]["input_ids"]

    first = train_ids(1)
    assert len(first) == 30
    assert train_ids(1) == first and train_ids(2) != first


def test_shuffle_depends_on_epoch_and_seed_only(tiny_bert: str, sst2_dir: str) -> None:
    dm = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_columnar_files(tiny_bert: str, tmp_path: Path, suffix: str) -> None:
    import datasets

    rows = {
        "sentence1": ["the movie", "the plot was bad"],
        "sentence2": ["was good", "not fine"],
        "label": [1, 0],
    }
    ds = datasets.Dataset.from_dict(rows)
    files = {}
    for split in ("train", "validation"):
        path = tmp_path / f"{split}{suffix}"
        if suffix == ".csv":
            ds.to_csv(path)
        elif suffix == ".parquet":
            ds.to_parquet(path)
        else:
            records = [dict(zip(rows, v, strict=True)) for v in zip(*rows.values(), strict=True)]
            path.write_text("\n".join(json.dumps(r) for r in records))
        files[split] = str(path)
    dm = GLUEDataModule("mrpc", tokenizer=tiny_bert, data_files=files)
    dm.setup("fit")
    assert dm.splits["train"]["labels"] == [1, 0]
    assert dm.num_labels == 2


def test_validation_carved_from_train(tiny_bert: str, tmp_path: Path) -> None:
    folder = write_sst2(tmp_path / "x")
    dm = GLUEDataModule(
        "sst2", tokenizer=tiny_bert, data_files={"train": str(folder / "train.tsv")}, validation_size=16
    )
    dm.setup("fit")
    assert len(dm.splits["validation"]) == 16 and len(dm.splits["train"]) == 80


def test_tuning_split_is_held_out_of_train_and_the_same_for_every_run(tiny_bert: str, tmp_path: Path) -> None:
    """A sweep validates on examples held out of train (never on dev), drawn with the data seed only; the
    reported runs hold out the same examples (same training data) and validate on dev."""
    folder = write_sst2(tmp_path / "x", n_train=96, n_dev=32)

    def splits(**kwargs: object) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        dm = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(folder), train_limit=64, **kwargs)
        dm.setup("fit")
        return [tuple(x) for x in dm.splits["validation"]["input_ids"]], [
            tuple(x) for x in dm.splits["train"]["input_ids"]
        ]

    dev, everything = splits()
    tuning, rest = splits(tuning_size=16, validate_on="tuning")
    assert len(dev) == 32 and len(tuning) == 16 and len(rest) == 48
    assert Counter(tuning) + Counter(rest) == Counter(everything)  # a partition of the first 64 rows
    assert splits(tuning_size=16) == (dev, rest)  # the reported runs: same training data, dev validation
    assert splits(tuning_size=16, validate_on="tuning") == (tuning, rest)  # every run: the same split
    assert splits(tuning_size=16, validate_on="tuning", seed=7)[0] != tuning
    with pytest.raises(
        ValueError, match=r"tuning_size=64 leaves no training example of the 64; hold out fewer"
    ):
        splits(tuning_size=64)
    with pytest.raises(ValueError, match="tuning_size must be >= 1 example, got 0"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, tuning_size=0)
    with pytest.raises(
        ValueError, match="validate_on='tuning' needs a tuning split: set data.init_args.tuning_size"
    ):
        GLUEDataModule("sst2", tokenizer=tiny_bert, validate_on="tuning")


def test_label_words_and_headerless_files(tmp_path: Path) -> None:
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n")
    assert read_glue_tsv(rte, get_task("rte"))["label"] == [0, 1]
    qqp = tmp_path / "qqp.tsv"
    qqp.write_text("1\t2\t3\tq one\tq two\t1\nbroken line\n4\t5\t6\tq three\tq four\t0\n")
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        cols = read_glue_tsv(qqp, get_task("qqp"))
    assert cols == {"question1": ["q one", "q three"], "question2": ["q two", "q four"], "label": [1, 0]}
    stsb = tmp_path / "stsb.tsv"
    stsb.write_text(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tg\tf\ty\t0\ts\ts\ta cat\ta dog\t3.2\n"
    )
    assert read_glue_tsv(stsb, get_task("stsb"))["label"] == [3.2]


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst3'.*must be one of \['cola'"):
        GLUEDataModule("sst3")  # type: ignore[arg-type]


def test_a_missing_local_folder_falls_back_to_the_hub_or_names_both_sources(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A clone without ../shared: the hub's copy with a one-line notice, or, offline, one error that
    names the missing folder, the hub dataset and how to provide either."""
    import datasets

    from spec_lightning.data import glue

    asked = []

    def hub(name: str, task: str) -> datasets.DatasetDict:
        asked.append((name, task))
        split = {"sentence": ["a good film", "a bad film"], "label": [1, 0], "idx": [0, 1]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(split) for s in ("train", "validation")})

    monkeypatch.setattr(glue.datasets, "load_dataset", hub)
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(tmp_path / "nope"), batch_size=2)
    with caplog.at_level("INFO"):
        data.setup("fit")
    assert asked == [("nyu-mll/glue", "sst2")] and len(data.splits["train"]) == 2
    assert "nope' does not exist; loading nyu-mll/glue sst2 from the hub instead" in caplog.text

    def offline(name: str, task: str) -> None:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(glue.datasets, "load_dataset", offline)
    both = (
        r"data_dir=.*nope' does not exist, and the hub dataset 'nyu-mll/glue'.*ConnectionError.*Either point"
    )
    with pytest.raises(FileNotFoundError, match=both):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(tmp_path / "nope")).setup("fit")


def test_missing_folder_and_file(tiny_bert: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.tsv is missing"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_files={"train": str(tmp_path / "x.tsv")}).setup(
            "fit"
        )


def test_empty_training_split(tiny_bert: str, tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe movie\t1\n")
    with pytest.raises(ValueError, match="training split is empty"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(tmp_path)).setup("fit")


def test_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\]"):
        GLUEDataModule("sst2", train_fraction=1.5)


def test_every_task_has_a_consistent_spec() -> None:
    for name, task in GLUE_TASKS.items():
        assert set(task.text_fields) | {"label"} == set(task.tsv_columns), name
        assert "train" in task.tsv_files and task.validation in task.tsv_files, name


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize(
    ("task", "folder", "train", "dev"),
    [("sst2", "SST-2", 67349, 872), ("mrpc", "MRPC", 3667, 408), ("rte", "RTE", 2490, 277)],
)
def test_real_glue_copies(task: str, folder: str, train: int, dev: int) -> None:
    spec = get_task(task)
    cols = read_glue_tsv(SHARED_DATA / "glue" / folder / "train.tsv", spec)
    assert len(cols["label"]) == train
    assert len(read_glue_tsv(SHARED_DATA / "glue" / folder / "dev.tsv", spec)["label"]) == dev
    assert set(cols["label"]) == {0, 1}


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data is not present")
def test_real_qqp_subset_skips_its_malformed_line() -> None:
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        cols = read_glue_tsv(SHARED_DATA / "glue" / "QQP" / "train_subset_23497.tsv", get_task("qqp"))
    assert len(cols["label"]) == 23496


def write_tsv(path: Path, rows: list[str], header: str = "sentence\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            ["good\t1", "bad\t0", "fine\t5"],
            r"train.tsv, line 4: label '5' is not one of the task's labels \['0', '1'\]",
        ),
        (["good\t1", "bad\tx"], r"train.tsv, line 3: label 'x' is not one of"),
    ],
    ids=["out of range", "not a label"],
)
def test_a_bad_tsv_label_is_named_with_file_and_line(
    tiny_bert: str, tmp_path: Path, rows: list[str], match: str
) -> None:
    write_tsv(tmp_path / "glue" / "train.tsv", rows)
    write_tsv(tmp_path / "glue" / "dev.tsv", ["good\t1"])
    with pytest.raises(ValueError, match=match):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(tmp_path / "glue")).setup("fit")


def test_json_labels_and_null_texts_are_checked_before_training(tiny_bert: str, tmp_path: Path) -> None:
    def data(train: list[dict]) -> GLUEDataModule:
        (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
        (tmp_path / "dev.jsonl").write_text(json.dumps({"sentence": "fine", "label": 1}))
        files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "dev.jsonl")}
        return GLUEDataModule("sst2", tokenizer=tiny_bert, data_files=files)

    good = {"sentence": "good", "label": 1}
    with pytest.raises(
        ValueError, match=r"train.jsonl: example 2 of the train split has the label 2, which is not one"
    ):
        data([good, {"sentence": "odd", "label": 2}]).setup("fit")
    with pytest.raises(ValueError, match=r"train.jsonl: example 3 of the train split has no 'sentence'"):
        data([good, good, {"sentence": None, "label": 0}]).setup("fit")
    with pytest.raises(ValueError, match=r"the train split has no 'label' column"):
        data([{"sentence": "good"}]).setup("fit")


def test_undecodable_bytes_and_long_fields(tiny_bert: str, tmp_path: Path) -> None:
    folder = tmp_path / "glue"
    write_tsv(folder / "dev.tsv", ["good\t1"])
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe\t0\n")
    with pytest.raises(
        ValueError, match=r"train.tsv: the bytes at offset 26 are not UTF-8.*re-save the file"
    ):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(folder)).setup("fit")
    write_tsv(
        folder / "train.tsv", ["good " * 40_000 + "\t1", "bad\t0"]
    )  # 200,000 characters: over csv's limit
    data = GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=str(folder), max_length=16)
    data.setup("fit")
    assert len(data.splits["train"][0]["input_ids"]) == 16


def test_max_length_over_the_model_positions_is_refused(tiny_bert: str, sst2_dir: str) -> None:
    with pytest.raises(
        ValueError, match=r"data.init_args.max_length=512 exceeds the 128 positions of .*at most 128"
    ):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_dir=sst2_dir, max_length=512).setup("fit")


def test_undecodable_csv_names_the_file(tiny_bert: str, tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_bytes(b"sentence,label\ngood,1\nbad \xff\xfe,0\n")
    files = {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "train.csv")}
    with pytest.raises(ValueError, match=r"train.csv: the bytes at offset \d+ are not UTF-8"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_files=files).setup("fit")


def test_bad_sizes_are_named(tiny_bert: str, sst2_dir: str) -> None:
    with pytest.raises(ValueError, match="validation_size must be >= 1 example, got 0"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, validation_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        GLUEDataModule("sst2", tokenizer=tiny_bert, batch_size=0)
    files = {"train": str(Path(sst2_dir) / "train.tsv")}
    with pytest.raises(
        ValueError, match=r"validation_size=500 leaves no training example of the 96; hold out fewer"
    ):
        GLUEDataModule("sst2", tokenizer=tiny_bert, data_files=files, validation_size=500).setup("fit")


@pytest.mark.parametrize("length", [0, -5])
def test_a_length_below_one_token_is_refused_when_built(tiny_bert: str, length: int) -> None:
    """0 used to mean "no truncation" and -5 ended in the tokenizer's raw OverflowError."""
    from spec_lightning import InstructionDataModule, MMLUDataModule

    pattern = rf"data.init_args.max_length must be a whole number of tokens >= 1, got {length}"
    with pytest.raises(ValueError, match=pattern):
        GLUEDataModule("sst2", tokenizer=tiny_bert, max_length=length)
    with pytest.raises(ValueError, match=pattern):
        InstructionDataModule(tokenizer=tiny_bert, max_length=length)
    with pytest.raises(ValueError, match=pattern):
        MMLUDataModule(tokenizer=tiny_bert, max_length=length)
