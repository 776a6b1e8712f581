"""The GLUE tasks: hub columns, the GLUE TSV layout of each, label maps and metrics."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GlueTaskName = Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
ENTAILMENT = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        text_fields: the hub's text columns (one sentence or a pair).
        num_labels: classes; 1 means regression (STS-B).
        tsv_columns: hub column -> column name in the GLUE TSV files.
        headerless: column names of the TSV files that ship without a header row.
        label_map: TSV label string -> class id, where labels are words.
        validation: the hub's validation split name.
        tsv_files: split -> file name in the GLUE TSV folder.
    """

    text_fields: tuple[str, ...]
    num_labels: int
    tsv_columns: dict[str, str]
    headerless: tuple[str, ...] = ()
    label_map: dict[str, int] = field(default_factory=dict)
    validation: str = "validation"
    tsv_files: dict[str, str] = field(
        default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    )


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        ("sentence",),
        2,
        {"sentence": "sentence", "label": "label"},
        ("source", "label", "original", "sentence"),
    ),
    "sst2": GlueTask(("sentence",), 2, {"sentence": "sentence", "label": "label"}),
    "mrpc": GlueTask(
        ("sentence1", "sentence2"),
        2,
        {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
    ),
    "qqp": GlueTask(
        ("question1", "question2"),
        2,
        {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
        ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
    ),
    "stsb": GlueTask(
        ("sentence1", "sentence2"), 1, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}
    ),
    "mnli": GlueTask(
        ("premise", "hypothesis"),
        3,
        {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
        label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
        validation="validation_matched",
        tsv_files={"train": "train.tsv", "validation_matched": "dev_matched.tsv", "test": "test_matched.tsv"},
    ),
    "qnli": GlueTask(
        ("question", "sentence"),
        2,
        {"question": "question", "sentence": "sentence", "label": "label"},
        label_map=ENTAILMENT,
    ),
    "rte": GlueTask(
        ("sentence1", "sentence2"),
        2,
        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
        label_map=ENTAILMENT,
    ),
    "wnli": GlueTask(
        ("sentence1", "sentence2"), 2, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}
    ),
}


def get_task(name: str) -> GlueTask:
    """The task spec, or a ValueError that lists the known tasks."""
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown GLUE task {name!r}; data.init_args.task must be one of {sorted(GLUE_TASKS)}"
        ) from None


def read_glue_tsv(path: Path, task: GlueTask) -> dict[str, list]:
    """Read one GLUE TSV file into hub-named columns.

    Files are read with ``csv.QUOTE_NONE`` (GLUE text contains bare quotes) and ``utf-8-sig`` (MRPC
    starts with a byte-order mark). A row too short for the needed columns is skipped and counted
    in a warning. The label column is kept only where the file has it (GLUE test files do not).
    """
    limit = csv.field_size_limit(2**31 - 1)  # a long text is truncated by the tokenizer, not refused
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: the bytes at offset {error.start} are not UTF-8 ({error.reason}); re-save the file "
            "as UTF-8"
        ) from error
    finally:
        csv.field_size_limit(limit)
    if not rows:
        raise ValueError(f"{path} is empty; expected a GLUE TSV file with {task.text_fields} columns")
    first = rows[0]
    if all(task.tsv_columns[f] in first for f in task.text_fields):
        header, body, first_line = first, rows[1:], 2
    elif task.headerless:
        header, body, first_line = list(task.headerless), rows, 1
    else:
        raise ValueError(
            f"{path}: header {first} lacks the columns {[task.tsv_columns[f] for f in task.text_fields]} "
            "that this GLUE task needs; is it the right file for the task?"
        )
    wanted = {hub: header.index(col) for hub, col in task.tsv_columns.items() if col in header}
    width = max(wanted.values()) + 1
    columns: dict[str, list] = {hub: [] for hub in wanted}
    lines: list[int] = []
    skipped = 0
    for line, row in enumerate(body, first_line):
        if len(row) < width:
            skipped += 1
            continue
        lines.append(line)
        for hub, i in wanted.items():
            columns[hub].append(row[i])
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} malformed row(s) with fewer than {width} columns", stacklevel=2
        )
    if "label" in columns:
        columns["label"] = [
            parse_label(v, task, f"{path}, line {n}") for v, n in zip(columns["label"], lines, strict=True)
        ]
    return columns


def parse_label(value: str, task: GlueTask, where: str) -> int | float:
    """A TSV label as the hub stores it: class id, or a float score for regression.

    Raises:
        ValueError: naming ``where`` (file and line), when the label is not one of the task's.
    """
    if task.num_labels == 1:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: label {value!r} is not a number (a regression score)") from None
    if task.label_map:
        if value not in task.label_map:
            raise ValueError(f"{where}: label {value!r} is not one of {sorted(task.label_map)}")
        return task.label_map[value]
    classes = [str(c) for c in range(task.num_labels)]
    if value.strip() not in classes:
        raise ValueError(f"{where}: label {value!r} is not one of the task's labels {classes}")
    return int(value)
