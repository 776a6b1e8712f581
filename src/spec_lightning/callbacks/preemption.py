"""A resumable checkpoint when a fit is stopped by SIGTERM (a preempted job) or Ctrl-C."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or KeyboardInterrupt during ``fit``, write ``last.ckpt`` where the trainer's
    ``ModelCheckpoint`` writes it, so ``--ckpt_path last`` continues from the step that was reached.
    On any other error, say when the run's folder holds no checkpoint (nothing to resume there).

    Lightning stops the loop at the end of the current optimiser step on SIGTERM (and raises
    ``SIGTERMException``, a ``SystemExit`` whose status ``spec-lightning`` turns into 143); on Ctrl-C it
    stops at once, so that checkpoint may be taken mid-step. A mid-epoch checkpoint resumes at its
    step, but the epoch's data order restarts (see README, "Resuming and recovering").

    Example::

        trainer = L.Trainer(callbacks=[ModelCheckpoint(save_last=True), PreemptionCheckpoint()])
    """

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != "fit":
            return
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            self._say_what_is_left(trainer)
            return
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            rank_zero_warn(
                f"PreemptionCheckpoint: {type(exception).__name__} but no ModelCheckpoint folder to save to: "
                "the run stops without a checkpoint"
            )
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        # the ModelCheckpoint's own record of its last file, saved in this checkpoint: resumed, it goes on
        # writing last.ckpt (without it, a file it did not write makes it version the name: last-v1.ckpt,
        # and the next --ckpt_path last would find the stale last.ckpt)
        callback.last_model_path = os.path.join(callback.dirpath, path.name)
        # what is written, not how it is read: the full state (optimiser, loops, callbacks) that resuming
        # needs, tensors and plain values only: Lightning reads it back with torch.load's weights_only=True
        trainer.save_checkpoint(path, weights_only=False)
        rank_zero_info(
            f"{type(exception).__name__}: saved a resumable checkpoint at step {trainer.global_step} to "
            f"{path}; continue with --ckpt_path last"
        )

    @staticmethod
    def _say_what_is_left(trainer: L.Trainer) -> None:
        """A run that failed before its first checkpoint leaves a folder with its config and logs only:
        say so, so that nobody tries to resume it."""
        folder = trainer.log_dir
        if folder is not None and Path(folder).is_dir() and not any(Path(folder).rglob("*.ckpt")):
            rank_zero_warn(
                f"the failed run leaves {folder} without a checkpoint (its config and logs only): there "
                "is nothing to resume there; delete it, or keep it for its logs"
            )
