"""Where a ``fit`` run writes, and which checkpoint ``--ckpt_path last`` resumes.

Lightning resolves ``ckpt_path="last"`` inside the new run's own folder, where a crashed run's
checkpoint never is: with a TensorBoard logger every fit gets a new ``version_N``. Here ``last``
means the newest ``last.ckpt`` of the same run name, and the resumed run goes on writing into that
run's folder. Without a logger every run gets a folder of its own under ``default_root_dir``, so two
concurrent runs never write into each other's checkpoints and config.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback

#: Folder of a run without a logger, under default_root_dir.
RUN_PREFIX = "run_"
#: Runs without a logger this process has started (see :func:`resolve_fit_folders`).
_RUNS_STARTED = itertools.count()


def root_logs(config: Namespace) -> None:
    """Put a logger's relative ``save_dir`` under ``trainer.default_root_dir`` when that is given, so that
    ``--trainer.default_root_dir`` decides where a run writes (configs say ``save_dir: logs``)."""
    trainer = config.get("trainer")
    root = trainer.get("default_root_dir") if trainer is not None else None
    logger = trainer.get("logger") if trainer is not None else None
    loggers = logger if isinstance(logger, list) else [logger]
    for each in loggers:
        init = each.get("init_args") if isinstance(each, Namespace) else None
        if root and init is not None and init.get("save_dir") and not Path(init["save_dir"]).is_absolute():
            init["save_dir"] = str(Path(root) / init["save_dir"])


def newest_last_checkpoint(pattern_root: Path, pattern: str) -> Path | None:
    """The most recently written ``last.ckpt`` matching ``pattern`` under ``pattern_root``."""
    found = sorted(pattern_root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_fit_folders(config: Namespace) -> None:
    """Rewrite a ``fit`` config in place: ``ckpt_path: last`` becomes the newest ``last.ckpt`` of this
    run name (and the logger's version that run's), and a run without a logger gets its own folder.

    Raises:
        FileNotFoundError: ``ckpt_path: last`` and no ``last.ckpt`` of this run exists.
    """
    trainer = config["trainer"]
    resume = config.get("ckpt_path") == "last"
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger = trainer.get("logger")
    init: Any = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init is not None and init.get("save_dir") is not None:
        if resume:
            folder = Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
            found = _require(
                newest_last_checkpoint(folder, "*/checkpoints/last.ckpt"), folder / "*/checkpoints"
            )
            init["version"] = found.parent.parent.name
            config["ckpt_path"] = str(found)
        return
    if logger is False:
        if resume:
            found = _require(newest_last_checkpoint(root, f"{RUN_PREFIX}*/checkpoints/last.ckpt"), root)
            trainer["default_root_dir"] = str(found.parent.parent)
            config["ckpt_path"] = str(found)
        else:
            # the second and the process name a run; a count tells apart the runs one process starts
            # within a second (two in a row used to get the same folder and the second was refused)
            started = next(_RUNS_STARTED)
            name = f"{RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            trainer["default_root_dir"] = str(root / (f"{name}-{started}" if started else name))
        return
    if resume:  # the default logger: resume the newest run, log into a new version
        folder = root / "lightning_logs"
        config["ckpt_path"] = str(_require(newest_last_checkpoint(folder, "*/checkpoints/last.ckpt"), folder))


def _require(found: Path | None, where: Path) -> Path:
    if found is None:
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt of this run under {where}, so there is nothing to resume. Drop "
            "--ckpt_path to start a new run, or pass the checkpoint file itself."
        )
    return found


#: A marker a fresh fit creates exclusively in its log folder: a second fit started into the same folder
#: (the same name and a fixed version, or two that counted the same version_N) is refused, not mixed in.
OWNER = ".spec-lightning-run"


class RunConfig(SaveConfigCallback):
    """LightningCLI's config.yaml beside a run's logs, with two guards:

    - a ``validate``/``test``/``predict`` without a logger has no run folder of its own, so it writes no
      config (Lightning would write config.yaml into the working folder);
    - a fresh ``fit`` (no ``ckpt_path``) claims its log folder by creating :data:`OWNER` exclusively; a
      folder another fit already claimed is refused with the fix, so two runs never write their event
      files, checkpoints and configs into one folder. A resumed fit continues in the folder it resumes.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if stage != "fit" and trainer.logger is None:
            return
        if stage == "fit" and self.config.get("ckpt_path") is None:
            claim_run_folder(trainer)
        super().setup(trainer, pl_module, stage)


def claim_run_folder(trainer: L.Trainer) -> None:
    log_dir = trainer.log_dir
    claimed = False
    if trainer.is_global_zero and log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(Path(log_dir) / OWNER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            claimed = True
    if trainer.strategy.broadcast(claimed):
        raise FileExistsError(
            f"{log_dir} already holds another run (its config, events and checkpoints would mix with "
            "this one's): give this run another trainer.logger.init_args.version (or name), leave the "
            "version unset to get a new one, or resume that run with --ckpt_path last"
        )
