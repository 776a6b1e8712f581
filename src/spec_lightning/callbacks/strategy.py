"""What the callbacks share: state keys, strategy checks, the log folder (a collective) and figure output."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.device_mesh import DeviceMesh

from spec_lightning.distributed import sharding_mesh

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


def is_fsdp1(strategy: object) -> bool:
    """Lightning's ``FSDPStrategy`` (FSDP1, flat parameters) or a subclass; FSDP2 is
    ``ModelParallelStrategy``, whatever a subclass of it is called."""
    return isinstance(strategy, FSDPStrategy)


def refuse_fsdp1(trainer: L.Trainer, callback: str) -> None:
    """Refuse FSDP1 (``FSDPStrategy``): it flattens each wrapped block's parameters into one buffer, so
    a callback cannot find a parameter's gradient or rows under its own name."""
    if is_fsdp1(trainer.strategy):
        raise MisconfigurationException(
            f"{callback} under FSDPStrategy (FSDP1): FSDP1 flattens each wrapped block's parameters into one "
            "buffer, so parameters cannot be read under their own names. Use FSDP2 (ModelParallelStrategy, "
            "configs/trainer/fsdp2.yaml), DDP or a single device."
        )


def sharding_mesh_of(callback: str, params: Iterable[torch.Tensor]) -> DeviceMesh | None:
    """The FSDP2 mesh over which ``params`` are sharded (None: not sharded), or a configuration error
    that names ``callback`` when they are sharded in a way the callbacks do not cover."""
    try:
        return sharding_mesh(params)
    except ValueError as error:
        raise MisconfigurationException(f"{callback}: {error}") from error


def log_directory(trainer: L.Trainer) -> Path:
    """The run's log folder. ``Trainer.log_dir`` broadcasts from rank 0, so every rank must call this
    (not only the one that writes), or a multi-process run waits forever."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def publish_figure(trainer: L.Trainer, fig: Figure, path: Path, tag: str, step: int) -> None:
    """Save ``fig`` to ``path``, add it to every logger that takes figures (TensorBoard) as ``tag`` at
    ``step``, and close it. Rank 0 only: take ``path`` from :func:`log_directory` on every rank first."""
    fig.savefig(path, dpi=120)
    for logger in trainer.loggers:
        add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
        if callable(add_figure):
            add_figure(tag, fig, global_step=step)
    import matplotlib.pyplot as plt

    plt.close(fig)
