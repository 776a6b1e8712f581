"""Houlsby bottleneck adapters (Houlsby et al., 2019)."""

from spec_lightning.methods.houlsby.layer import BottleneckAdapter, HoulsbyWrapped
from spec_lightning.methods.houlsby.method import HoulsbyAdapter

__all__ = ["BottleneckAdapter", "HoulsbyAdapter", "HoulsbyWrapped"]
