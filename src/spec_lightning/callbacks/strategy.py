"""What the callbacks share: state keys, strategy checks, the log folder (a collective) and figure output."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class KeyedCallback(L.Callback):
    """A callback whose checkpoint state is keyed by its class and the arguments that tell two
    instances apart (:meth:`key_arguments`), so that several can share one Trainer and each resumes
    its own state. Checkpoints written before keys carried arguments (the bare class name) still load."""

    def key_arguments(self) -> Mapping[str, Any]:
        """The constructor arguments that identify this instance."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.key_arguments())

    @property
    def _legacy_state_key(self) -> Any:  # Lightning's fallback key on load: the bare class name
        return type(self).__qualname__


def refuse_fsdp(trainer: L.Trainer, message: str) -> None:
    """Raise ``message`` when the trainer shards weights, with FSDP (``FSDPStrategy``) or FSDP2 / tensor
    parallelism (``ModelParallelStrategy``): the callback needs whole matrices."""
    if "FSDP" in type(trainer.strategy).__name__ or isinstance(trainer.strategy, ModelParallelStrategy):
        raise MisconfigurationException(message)


def log_directory(trainer: L.Trainer) -> Path:
    """The run's log folder. ``Trainer.log_dir`` broadcasts from rank 0, so every rank must call this
    (not only the one that writes), or a multi-process run waits forever."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def publish_figure(trainer: L.Trainer, fig: Figure, path: Path, tag: str, step: int) -> None:
    """Save ``fig`` to ``path``, add it to every logger that takes figures (TensorBoard) as ``tag`` at
    ``step``, and close it. Rank 0 only: take ``path`` from :func:`log_directory` on every rank first."""
    fig.savefig(path, dpi=120)
    for logger in trainer.loggers:
        if hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure(tag, fig, global_step=step)
    import matplotlib.pyplot as plt

    plt.close(fig)
