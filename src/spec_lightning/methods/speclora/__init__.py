"""SpecLoRA: LoRA with a learnable spectral mask (METHODS.md §3)."""

from spec_lightning.methods.speclora.layer import SpecLoRALinear
from spec_lightning.methods.speclora.method import SpecLoRA

__all__ = ["SpecLoRA", "SpecLoRALinear"]
