"""The ``spec-lightning`` command: LightningCLI (fit/validate/test/predict), ``export`` and ``reproduce``.

Examples::

    spec-lightning fit --config configs/quickstart.yaml
    spec-lightning fit --config configs/trainer/cpu.yaml --config configs/glue/sst2.yaml \\
        --config configs/method/lora.yaml
    spec-lightning export --config logs/quickstart/version_0/config.yaml \\
        --ckpt_path logs/quickstart/version_0/checkpoints/last.ckpt --output_dir exports/sst2-lora
    spec-lightning reproduce --grid configs/reproduce/glue_small.yaml
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spec_lightning._lightning import callbacks_of, fast_dev_run_of, set_callbacks
from spec_lightning.callbacks.preemption import PreemptionCheckpoint
from spec_lightning.experiments.reproduce import main as reproduce
from spec_lightning.io.adapters import refuse_non_empty
from spec_lightning.io.checkpoints import AtomicCheckpointIO, check_checkpoint_file, load_checkpoint
from spec_lightning.io.runs import RunConfig, resolve_fit_folders, root_logs
from spec_lightning.modules import FineTuningModule

#: What ``spec-lightning --help`` says besides LightningCLI's own subcommands.
OTHER_SUBCOMMANDS = """\
other subcommands:
  export     write a fit's checkpoint as a merged save_pretrained folder, or the adapter alone
             (spec-lightning export --help)
  reproduce  run a grid of fits, resumably, and write its comparison report
             (spec-lightning reproduce --help)
  bundle     write the wheels, half-precision demo encoder and data an air-gapped GPU node needs
             (spec-lightning bundle --help)
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's lines kept as written."""


class SpecLightningCLI(LightningCLI):
    """LightningCLI over every LightningModule and DataModule (``class_path`` in YAML), with the backbone
    linked into the tokenizer and, where both sides have them, the task facts into the model.

    ``--model`` takes spec_lightning's modules or any LightningModule whose constructor has a
    ``backbone`` argument (the tokenizer's name) and, for GLUE, ``task`` and ``num_labels``. The
    optimiser is the module's own (``configure_optimizers``): no ``--optimizer``/``--lr_scheduler``. A
    logger's relative ``save_dir`` lies under ``--trainer.default_root_dir`` when that is given."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")
        parser.link_arguments("data.init_args.task", "model.init_args.task")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """The config decides what runs, not the checkpoint. Lightning's ``LightningCLI`` replaces the
        config's model with the hyper-parameters stored in ``--ckpt_path <file>`` (so a LoRSA config ran
        the checkpoint's LoRA and a learning rate changed for the resume was dropped, while the run's
        config.yaml said otherwise); here nothing replaces the config. A
        checkpoint of another backbone, task or method is then refused when it is loaded (the run-facts
        check), on this path as on ``--ckpt_path last``; changed optimisation settings (learning rate,
        weight decay) are taken from the config and said in one line (see ``FineTuningModule``). The
        file itself is checked in :meth:`before_instantiate_classes`, once ``last`` is resolved."""

    def before_instantiate_classes(self) -> None:
        """Logs under ``default_root_dir``; ``fit``: ``--ckpt_path last`` resumes the newest run of this
        name in its own folder, and a run without a logger writes into a folder of its own (see
        :mod:`spec_lightning.io.runs`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root_logs(config)
        if self.subcommand == "fit":
            resolve_fit_folders(config)
        ckpt_path = config.get("ckpt_path")  # `last` resolved to a file just now (fit)
        if ckpt_path not in (None, "last", "best", "hpc", "registry") and "://" not in str(ckpt_path):
            check_checkpoint_file(ckpt_path)  # an empty or truncated file: a clear error, not EOFError

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's trainer, writing its checkpoints atomically beside their target
        (:class:`~spec_lightning.io.checkpoints.AtomicCheckpointIO`) unless another writer was chosen."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        """Save a resumable checkpoint on SIGTERM or Ctrl-C wherever checkpoints are kept; a
        ``fast_dev_run`` keeps none (Lightning's ``save_last`` would write one into the working folder)."""
        if fast_dev_run_of(self.trainer):
            kept = [c for c in callbacks_of(self.trainer) if not isinstance(c, ModelCheckpoint)]
            set_callbacks(self.trainer, kept)
            rank_zero_info("fast_dev_run: no checkpoints are written")
        if self.trainer.checkpoint_callback is not None:
            callbacks_of(self.trainer).append(PreemptionCheckpoint())


class ExportCLI(SpecLightningCLI):
    """The parser of ``export``: accepts ``Trainer.fit``'s own keys, which a run's config.yaml carries."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_method_arguments(
            L.Trainer, "fit", skip={"model", "train_dataloaders", "val_dataloaders", "datamodule"}
        )


def import_public_classes() -> None:
    """Import every public class, so that jsonargparse knows them as subclasses and the CLI takes short
    names (``--model.init_args.method LoRSA``, ``--trainer.callbacks+=SpectralImportance``): the package's
    lazy exports would otherwise leave them unimported until first used."""
    import spec_lightning

    for name in spec_lightning.__all__:
        getattr(spec_lightning, name)


def build_cli(args: list[str] | None = None, run: bool = True) -> SpecLightningCLI:
    import_public_classes()
    cli_class = SpecLightningCLI if run else ExportCLI
    return cli_class(
        L.LightningModule if run else FineTuningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": OTHER_SUBCOMMANDS, "formatter_class": HelpFormatter},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def export(argv: list[str]) -> None:
    """``spec-lightning export``: a merged ``save_pretrained`` folder, or the adapter alone."""
    parser = argparse.ArgumentParser(
        prog="spec-lightning export",
        description="Export a fine-tuned checkpoint. Other arguments (--config ...) describe the run.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit")
    parser.add_argument("--output_dir", required=True, help="folder to write")
    parser.add_argument("--adapter_only", action="store_true", help="write the adapter alone, unmerged")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    known, rest = parser.parse_known_args(argv)
    refuse_non_empty(Path(known.output_dir), known.overwrite)  # before the model is built
    cli = build_cli(rest, run=False)
    module: Any = cli.model
    checkpoint = load_checkpoint(known.ckpt_path)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    if checkpoint["state_dict"]:
        module.load_state_dict(checkpoint["state_dict"])
    out = module.export(known.output_dir, adapter_only=known.adapter_only, overwrite=known.overwrite)
    print(f"exported {'adapter' if known.adapter_only else 'merged model'} to {out}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["export"]:
        export(args[1:])
        return
    if args[:1] == ["reproduce"]:
        reproduce(args[1:])
        return
    if args[:1] == ["bundle"]:
        from spec_lightning.io.bundle import main as bundle

        bundle(args[1:])
        return
    try:
        build_cli(argv)  # None: LightningCLI reads sys.argv itself
    except SIGTERMException:
        print("spec-lightning: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
