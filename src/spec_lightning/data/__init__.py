"""LightningDataModules for the benchmarks."""

from spec_lightning.data.glue import GLUEDataModule
from spec_lightning.data.glue_tasks import GLUE_TASKS
from spec_lightning.data.instruction import InstructionDataModule
from spec_lightning.data.language_modeling import LanguageModelingDataModule
from spec_lightning.data.mmlu import MMLUDataModule

__all__ = [
    "GLUE_TASKS",
    "GLUEDataModule",
    "InstructionDataModule",
    "LanguageModelingDataModule",
    "MMLUDataModule",
]
