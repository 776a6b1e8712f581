"""LightningDataModules for the benchmarks."""

from spec_lightning.data.glue import GLUEDataModule
from spec_lightning.data.glue_tasks import GLUE_TASKS

__all__ = ["GLUE_TASKS", "GLUEDataModule"]
