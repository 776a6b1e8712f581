"""Fine-tuning methods: one subpackage (or module) per method, all behind ``FineTuningMethod``."""

from typing import TYPE_CHECKING

from spec_lightning._lazy import lazy_exports

_EXPORTS = {
    "AdaLoRA": "spec_lightning.methods.peft_baselines",
    "BitFit": "spec_lightning.methods.bitfit",
    "DoRA": "spec_lightning.methods.peft_baselines",
    "FineTuningMethod": "spec_lightning.methods.base",
    "FullFineTuning": "spec_lightning.methods.full",
    "GraphSpectral": "spec_lightning.methods.graph_spectral",
    "HoulsbyAdapter": "spec_lightning.methods.houlsby",
    "LoRA": "spec_lightning.methods.peft_baselines",
    "LoRSA": "spec_lightning.methods.lorsa",
    "PeftTuner": "spec_lightning.methods.peft_baselines",
    "PiSSA": "spec_lightning.methods.peft_baselines",
    "SpecLoRA": "spec_lightning.methods.speclora",
}
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
    "PeftTuner",
    "PiSSA",
    "SpecLoRA",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from spec_lightning.methods.base import FineTuningMethod
    from spec_lightning.methods.bitfit import BitFit
    from spec_lightning.methods.full import FullFineTuning
    from spec_lightning.methods.graph_spectral import GraphSpectral
    from spec_lightning.methods.houlsby import HoulsbyAdapter
    from spec_lightning.methods.lorsa import LoRSA
    from spec_lightning.methods.peft_baselines import AdaLoRA, DoRA, LoRA, PeftTuner, PiSSA
    from spec_lightning.methods.speclora import SpecLoRA
