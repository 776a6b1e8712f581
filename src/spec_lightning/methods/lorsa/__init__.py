"""LoRSA: low-rank spectral adaptation (METHODS.md §2)."""

from spec_lightning.methods.lorsa.layer import LoRSALinear
from spec_lightning.methods.lorsa.method import LoRSA

__all__ = ["LoRSA", "LoRSALinear"]
