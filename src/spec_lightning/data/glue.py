"""GLUE as a LightningDataModule: from the hub, a GLUE TSV folder, or CSV/JSON/parquet files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import datasets
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from spec_lightning.data.base import TokenizedDataModule, load_local_file
from spec_lightning.data.glue_tasks import GlueTask, GlueTaskName, get_task, read_glue_tsv


class GLUEDataModule(TokenizedDataModule):
    """A GLUE task, tokenised once, batched with dynamic padding.

    Sources, first match wins: ``data_files`` (split -> file; ``.tsv`` in the GLUE layout, or
    ``.csv``/``.json``/``.jsonl``/``.parquet`` with the hub's column names), ``data_dir`` (a GLUE TSV
    folder such as ``glue_data/SST-2``), else ``datasets.load_dataset(hub_name, task)``.

    GLUE's test labels are not public, so ``test`` evaluates the validation split; ``predict`` runs
    on the unlabelled test split where one is present.

    Args:
        task: the GLUE task.
        tokenizer: tokenizer name or path (linked from ``model.backbone`` in the CLI).
        data_dir: a folder in the GLUE TSV layout.
        data_files: split name -> local file, overriding ``data_dir``.
        hub_name: dataset id on the hub.
        max_length: truncation length in tokens.
        batch_size: examples per training batch (also used for evaluation).
        train_limit: keep the first N training examples.
        train_fraction: then keep this seeded random fraction of them (few-shot subsets).
        validation_size: carve a validation split of this many training examples when the source
            has none (e.g. the QQP subset, which ships train lines only).
        tuning_size: hold out this many of the remaining training examples as a tuning split, drawn
            with ``seed`` (not the run's seed: every run of a sweep holds out the same examples). Give it
            to every run of a comparison, so that the sweep and the reported runs train on the same data.
        validate_on: ``"tuning"`` validates on the tuning split instead of the validation split: a
            hyper-parameter sweep then never sees the split that is reported.
        num_workers: DataLoader workers.
        seed: seed of the subset draw and of the per-epoch shuffle.
    """

    def __init__(
        self,
        task: GlueTaskName = "sst2",
        tokenizer: str = "bert-base-uncased",
        data_dir: str | None = None,
        data_files: dict[str, str] | None = None,
        hub_name: str = "nyu-mll/glue",
        max_length: int = 128,
        batch_size: int = 32,
        train_limit: int | None = None,
        train_fraction: float | None = None,
        validation_size: int | None = None,
        tuning_size: int | None = None,
        validate_on: Literal["validation", "tuning"] = "validation",
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers, seed)
        self.spec = get_task(task)
        if train_fraction is not None and not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"data.init_args.train_fraction must be in (0, 1], got {train_fraction}")
        if train_limit is not None and train_limit < 1:
            raise ValueError(f"data.init_args.train_limit must be >= 1, got {train_limit}")
        if validation_size is not None and validation_size < 1:
            raise ValueError(f"data.init_args.validation_size must be >= 1 example, got {validation_size}")
        self.check_tuning(tuning_size, validate_on)
        self.check_positive_length(max_length, "data.init_args.max_length")
        self.save_hyperparameters()
        self.task = task
        self.num_labels = self.spec.num_labels
        self.dataset_name = f"GLUE {task}"

    def build_splits(self) -> dict[str, datasets.Dataset]:
        self.check_max_length(self.hparams.max_length, "data.init_args.max_length")
        selected = self._select(self._load())
        for name, ds in selected.items():
            check_examples(
                ds, self.spec, self._sources.get(name, f"{self.hparams.hub_name} {self.task}"), name
            )
        return {name: self._tokenize(ds) for name, ds in selected.items()}

    def _load(self) -> dict[str, datasets.Dataset]:
        hp = self.hparams
        self._sources: dict[str, str] = {}
        if hp.data_files:
            self._sources = {self._split_name(s): str(path) for s, path in hp.data_files.items()}
            return {split: self._load_file(Path(path)) for split, path in hp.data_files.items()}
        if hp.data_dir and not Path(hp.data_dir).is_dir():
            return self._load_hub(missing=hp.data_dir)
        if hp.data_dir:
            folder = Path(hp.data_dir)
            found = {s: folder / f for s, f in self.spec.tsv_files.items() if (folder / f).is_file()}
            if "train" not in found:
                raise FileNotFoundError(f"{folder / self.spec.tsv_files['train']} is missing")
            self._sources = {self._split_name(s): str(path) for s, path in found.items()}
            return {split: self._load_file(path) for split, path in found.items()}
        return self._load_hub()

    def _load_hub(self, missing: str | None = None) -> dict[str, datasets.Dataset]:
        """``hub_name``/``task`` from the hub; where a configured local folder is ``missing``, say so in
        one line first, and if the hub fails too, name both sources and how to provide either."""
        hp = self.hparams
        if missing is not None:
            rank_zero_info(
                f"GLUE {self.task}: data.init_args.data_dir={missing!r} does not exist; loading "
                f"{hp.hub_name} {self.task} from the hub instead"
            )
        try:
            return dict(datasets.load_dataset(hp.hub_name, self.task))
        except Exception as error:  # offline, unknown dataset, no access: all end the same way here
            local = (
                f"the local folder data.init_args.data_dir={missing!r} does not exist, and "
                if missing is not None
                else ""
            )
            raise FileNotFoundError(
                f"GLUE {self.task}: no data: {local}the hub dataset {hp.hub_name!r} ({self.task}) could not "
                f"be loaded ({type(error).__name__}: {str(error)[:200]}). Either point "
                "data.init_args.data_dir at a GLUE TSV folder (train.tsv and dev.tsv, e.g. "
                "../shared/data/glue/SST-2 beside this repository) or data_files at local files, or give "
                "this machine access to the hub."
            ) from error

    def _load_file(self, path: Path) -> datasets.Dataset:
        if path.suffix == ".tsv" and path.is_file():
            return datasets.Dataset.from_dict(read_glue_tsv(path, self.spec))
        ds = load_local_file(
            path, (".tsv", ".csv", ".json", ".jsonl", ".parquet"), "data.init_args.data_files"
        )
        missing = [c for c in self.spec.text_fields if c not in ds.column_names]
        if missing:
            raise ValueError(f"{path}: columns {missing} are missing; found {ds.column_names}")
        return ds

    def _split_name(self, split: str) -> str:
        """The split's name after :meth:`_select` renames the task's validation split."""
        return "validation" if split == self.spec.validation else split

    def _select(self, raw: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        """Rename the validation split, apply the limit, carve validation if needed, hold out the tuning
        split, then draw the fraction."""
        hp = self.hparams
        if self.spec.validation in raw:
            raw["validation"] = raw.pop(self.spec.validation)
        train = raw.get("train")
        if train is None or len(train) == 0:
            raise ValueError(
                f"GLUE {self.task}: the training split is empty or missing; check the data source"
            )
        if hp.train_limit is not None:
            train = train.select(range(min(hp.train_limit, len(train))))
        if hp.validation_size is not None and "validation" not in raw:
            train, raw["validation"] = self.hold_out(train, hp.validation_size, "validation_size")
        if "validation" not in raw:
            raise ValueError(
                f"GLUE {self.task}: no validation split in the source; set data.init_args.validation_size"
            )
        raw = self.tuning({**raw, "train": train})
        if hp.train_fraction is not None:
            keep = max(1, round(hp.train_fraction * len(raw["train"])))
            raw["train"] = raw["train"].shuffle(seed=hp.seed).select(range(keep))
        return {k: v for k, v in raw.items() if k in ("train", "validation", "test")}

    def _tokenize(self, ds: datasets.Dataset) -> datasets.Dataset:
        fields = self.spec.text_fields
        keep = {"label"} & set(ds.column_names)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[f] for f in fields]
            return self.tokenizer(*texts, truncation=True, max_length=self.hparams.max_length)

        ds = ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])
        return ds.rename_column("label", "labels") if "labels" not in ds.column_names and keep else ds

    def collator(self) -> DataCollatorWithPadding:
        return DataCollatorWithPadding(self.tokenizer)

    def test_dataloader(self) -> DataLoader:
        rank_zero_info(
            f"GLUE {self.task}: test evaluates the validation (dev) split; GLUE's test labels are not public"
        )
        return self._loader("validation")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.splits else "validation")


def check_examples(ds: datasets.Dataset, spec: GlueTask, source: str, split: str) -> None:
    """Refuse, before training, a split with an empty text field or a label outside the task's labels
    (an out-of-range class id fails only when its batch comes, possibly hours in). The error names
    the source and the 1-based example; GLUE's unlabelled test splits (label −1) are left alone.

    Raises:
        ValueError: a text field is null, the label column is missing from a train or validation
            split, or a label is not one of the task's.
    """
    for name in spec.text_fields:
        nulls = [i for i, text in enumerate(ds[name]) if text is None]
        if nulls:
            raise ValueError(
                f"{source}: example {nulls[0] + 1} of the {split} split has no {name!r} ({len(nulls)} such "
                "examples); fill or drop them"
            )
    if "label" not in ds.column_names:
        if split in ("train", "validation"):
            raise ValueError(f"{source}: the {split} split has no 'label' column; found {ds.column_names}")
        return
    if split == "test":
        return
    labels = ds["label"]
    if spec.num_labels == 1:
        bad = [i for i, y in enumerate(labels) if not isinstance(y, int | float) or not math.isfinite(y)]
        expected = "a finite number (a regression score)"
    else:
        bad = [i for i, y in enumerate(labels) if isinstance(y, bool) or y not in range(spec.num_labels)]
        expected = f"one of the class ids {list(range(spec.num_labels))}"
    if bad:
        raise ValueError(
            f"{source}: example {bad[0] + 1} of the {split} split has the label {labels[bad[0]]!r}, which is "
            f"not {expected} ({len(bad)} such examples); fix the labels or the task"
        )
