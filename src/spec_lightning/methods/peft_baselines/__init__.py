"""Baselines backed by the peft library (reference implementations)."""

from spec_lightning.methods.peft_baselines.method import AdaLoRA, DoRA, LoRA, PeftMethod, PiSSA
from spec_lightning.methods.peft_baselines.tuner import PeftTuner

__all__ = ["AdaLoRA", "DoRA", "LoRA", "PeftMethod", "PeftTuner", "PiSSA"]
