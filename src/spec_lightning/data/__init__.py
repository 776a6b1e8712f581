"""LightningDataModules for the benchmarks, and the calibration sample that data-driven initialisations
read (:mod:`spec_lightning.data.calibration`). Names load on first access, so a method that only needs
the calibration helpers does not import ``datasets``."""

from typing import TYPE_CHECKING

from spec_lightning._lazy import lazy_exports

_EXPORTS = {
    "GLUE_TASKS": "spec_lightning.data.glue_tasks",
    "GLUEDataModule": "spec_lightning.data.glue",
    "InstructionDataModule": "spec_lightning.data.instruction",
    "LanguageModelingDataModule": "spec_lightning.data.language_modeling",
    "MMLUDataModule": "spec_lightning.data.mmlu",
}
__all__ = [
    "GLUE_TASKS",
    "GLUEDataModule",
    "InstructionDataModule",
    "LanguageModelingDataModule",
    "MMLUDataModule",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from spec_lightning.data.glue import GLUEDataModule
    from spec_lightning.data.glue_tasks import GLUE_TASKS
    from spec_lightning.data.instruction import InstructionDataModule
    from spec_lightning.data.language_modeling import LanguageModelingDataModule
    from spec_lightning.data.mmlu import MMLUDataModule
