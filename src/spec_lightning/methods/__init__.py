"""Fine-tuning methods: one subpackage (or module) per method, all behind ``FineTuningMethod``."""

from spec_lightning.methods.base import FineTuningMethod
from spec_lightning.methods.bitfit import BitFit
from spec_lightning.methods.full import FullFineTuning
from spec_lightning.methods.graph_spectral import GraphSpectral
from spec_lightning.methods.houlsby import HoulsbyAdapter
from spec_lightning.methods.lorsa import LoRSA
from spec_lightning.methods.peft_baselines import AdaLoRA, DoRA, LoRA, PiSSA
from spec_lightning.methods.speclora import SpecLoRA

__all__ = [
    "AdaLoRA",
    "BitFit",
    "DoRA",
    "FineTuningMethod",
    "FullFineTuning",
    "GraphSpectral",
    "HoulsbyAdapter",
    "LoRA",
    "LoRSA",
    "PiSSA",
    "SpecLoRA",
]
