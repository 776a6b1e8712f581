"""Any peft tuner from its peft config: ``class_path: peft.FourierFTConfig`` (or ``peft.VeraConfig``,
``peft.OFTConfig``, ``peft.LoraConfig`` with an SVD initialisation, ...) in YAML, applied by peft."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import peft
import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import nn

from spec_lightning.data.calibration import seeded_sample
from spec_lightning.methods.base import ADAPTER_WEIGHTS, check_state_keys
from spec_lightning.methods.peft_baselines.method import (
    PeftBacked,
    peft_model,
    present_heads,
    task_type_of,
)
from spec_lightning.methods.targets import LINEAR_TYPES, available_suffixes
from spec_lightning.naming import matches

#: ``init_lora_weights`` values that read training data (CorDA's covariance, EVA's activation SVD).
DATA_INITS = ("corda", "eva")
#: Initialisations that subtract the initial adapter from the base weights (W_res = W − s B₀A₀).
RESIDUAL_INITS = ("pissa", "olora", "corda")
#: Prefixes of the extra adapter state of a residual initialisation that cannot be recomputed exactly.
INITIAL, RESIDUAL = "initial_adapter.", "residual_weight."


class PeftTuner(PeftBacked):
    """A peft tuner given by its config: what it adapts and how is peft's (``get_peft_model``), the
    training interface is spec_lightning's.

    The config's ``task_type`` is taken from the model when unset, the task head joins its
    ``modules_to_save``, and an AdaLoRA config without ``total_step`` gets the fit's step count.
    Data-driven LoRA initialisations (``init_lora_weights: corda`` or ``eva``) read
    ``calibration_samples`` training examples, drawn with a generator seeded by ``seed``, before the
    optimiser exists. A tuner with a per-step update (AdaLoRA's ``update_and_allocate``) gets it after
    every optimiser step; peft adds its own regularisers (AdaLoRA's orthogonality) to the loss in the
    forward. Initialisations that move the base weights (PiSSA, OLoRA, CorDA: W_res = W − s B₀A₀) are
    exported as a plain LoRA of rank 2r on the original weights (peft's
    ``path_initial_model_for_weight_conversion``); where B₀A₀ cannot be recomputed (CorDA's data,
    randomised PiSSA) it is kept with the adapter state, with W_res.

    Args:
        config: a peft config (a ``peft.PeftConfig`` subclass with its arguments).
        calibration_samples: training examples that a data-driven initialisation reads.
        calibration_batch_size: their batch size.
        seed: seed of the calibration sample.
    """

    def __init__(
        self,
        config: peft.PeftConfig,
        calibration_samples: int = 256,
        calibration_batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        if not isinstance(config, peft.PeftConfig):
            raise TypeError(
                f"method.init_args.config must be a peft config (class_path: peft.LoraConfig, "
                f"peft.FourierFTConfig, ...), got {type(config).__name__}"
            )
        if calibration_samples < 1 or calibration_batch_size < 1:
            raise ValueError(
                "method.init_args.calibration_samples and calibration_batch_size must be >= 1, got "
                f"{calibration_samples} and {calibration_batch_size}"
            )
        eva = getattr(config, "eva_config", None)
        if self._init_of(config) == "eva" and eva is not None and eva.rho != 1.0:
            raise ValueError(
                f"EVA with eva_config.rho={eva.rho} gives every layer a rank that depends on the calibration "
                "data, so a checkpoint or an exported adapter would not fit a model rebuilt from the config. "
                "Set eva_config.rho: 1.0 (the same rank r everywhere, EVA's initialisation kept)."
            )
        self.config = config
        self.calibration_samples = calibration_samples
        self.calibration_batch_size = calibration_batch_size
        self.seed = seed

    @staticmethod
    def _init_of(config: peft.PeftConfig) -> str:
        """The LoRA initialisation's name ("pissa" for "pissa_niter_4"); "" for other tuners."""
        init = getattr(config, "init_lora_weights", None)
        return init.split("_niter")[0] if isinstance(init, str) else ""

    @property
    def init(self) -> str:
        return self._init_of(self.config)

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return not self.config.is_prompt_learning

    @property
    def supports_fsdp(self) -> bool:  # type: ignore[override]
        return type(self.config) is peft.LoraConfig and self.init not in (*DATA_INITS, *RESIDUAL_INITS)

    @property
    def supports_fsdp_reason(self) -> str:  # type: ignore[override]
        return (
            f"spec_lightning shards peft's LoRA under FSDP2; {type(self.config).__name__} "
            f"(init {self.init or 'default'}) is not checked there."
        )

    def calibration_sample(self, loader: Callable[[], Iterable[Any]]) -> Iterable[Any] | None:
        """``calibration_samples`` seeded training examples for CorDA and EVA; None for other tuners."""
        if self.init not in DATA_INITS:
            return None
        size, batch = self.calibration_samples, self.calibration_batch_size
        return seeded_sample(loader, size, batch, self.seed, f"PeftTuner ({self.init})")

    def _keeps_initial(self) -> bool:
        """Whether B₀A₀ and W_res travel with the adapter state (they cannot be recomputed exactly)."""
        init = getattr(self.config, "init_lora_weights", None)
        return self.init == "corda" or (isinstance(init, str) and init.startswith("pissa_niter"))

    def apply(
        self,
        model: nn.Module,
        head: Sequence[str] = (),
        total_steps: int | None = None,
        calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    ) -> nn.Module:
        """peft's tuner on ``model``; ``calibration`` batches feed CorDA/EVA. Without them (rebuilding a
        model whose trained state is loaded next) the adapter gets its structure only."""
        config = self._config_for(model, head, total_steps)
        _check_targets(model, config)
        structure_only = self.init in DATA_INITS and calibration is None
        if structure_only:
            assert isinstance(config, peft.LoraConfig), "the data-driven initialisations are LoRA's"
            config.init_lora_weights = True
        elif self.init == "corda" and calibration is not None:
            assert isinstance(config, peft.LoraConfig), "CorDA is a LoRA initialisation"
            from peft.tuners.lora.corda import preprocess_corda

            batches = calibration
            preprocess_corda(model, config, run_model=lambda: _run(model, batches))
        tuned = peft.get_peft_model(model, config)
        if self.init == "eva" and calibration is not None:
            batches = list(_on_device(tuned, calibration))
            peft.initialize_lora_eva_weights(tuned, dataloader=batches, show_progress_bar=False)
        if self.init in RESIDUAL_INITS and getattr(config, "init_lora_weights", None) is not True:
            _keep(tuned, "initial_adapter", _lora_factors(tuned))
        if structure_only:
            tuned.register_forward_hook(_UninitialisedWatch(self.init))
        self.watch_step_hook(tuned)
        return tuned

    def _config_for(self, model: nn.Module, head: Sequence[str], total_steps: int | None) -> peft.PeftConfig:
        config = copy.deepcopy(self.config)
        if config.task_type is None:
            config.task_type = task_type_of(model)
        heads = present_heads(model, head)
        if heads and hasattr(config, "modules_to_save"):
            config.modules_to_save = sorted({*(config.modules_to_save or ()), *heads})
        if isinstance(config, peft.AdaLoraConfig) and config.total_step is None:
            config.total_step = total_steps or config.tinit + config.tfinal + 1
        return config

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors, and, where they cannot be recomputed, B₀A₀ and W_res of every target."""
        state = super().adapter_state_dict(model)
        if self._keeps_initial():
            state |= {INITIAL + k: v.clone() for k, v in _initial_adapter(model).items()}
            state |= {RESIDUAL + k: v.detach().clone() for k, v in _residual_weights(model).items()}
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        check_state_keys(self, set(self.adapter_state_dict_keys(model)), set(state))
        initial = {k.removeprefix(INITIAL): v for k, v in state.items() if k.startswith(INITIAL)}
        residual = {k.removeprefix(RESIDUAL): v for k, v in state.items() if k.startswith(RESIDUAL)}
        tensors = {k: v for k, v in state.items() if not k.startswith((INITIAL, RESIDUAL))}
        _keep(model, "adapter_state_loaded", True)
        if initial:
            _keep(model, "initial_adapter", initial)
        with torch.no_grad():
            for name, weight in _residual_weights(model).items():
                if name in residual:
                    weight.copy_(residual[name])
        model.load_state_dict(tensors, strict=False)

    def adapter_state_dict_keys(self, model: nn.Module) -> list[str]:
        keys = [name for name, _ in self.trainable_parameters(model)]
        if self._keeps_initial():
            keys += [INITIAL + k for k in _lora_factors(model)]
            keys += [RESIDUAL + k for k in _residual_weights(model)]
        return keys

    def save_peft_folder(self, model: nn.Module, directory: str | Path) -> None:
        """peft's folder; after a residual initialisation, converted to a plain LoRA of rank 2r that
        applies to the original base weights: ``ΔW = s' [B | B₀][A ; −A₀]`` (peft's conversion, whose
        output lacks the ``modules_to_save`` tensors: they are added from peft's plain save)."""
        initial = getattr(model, "initial_adapter", None)
        if self.init not in RESIDUAL_INITS or initial is None:
            return super().save_peft_folder(model, directory)
        with tempfile.TemporaryDirectory() as scratch:
            start, plain = Path(scratch) / "initial", Path(scratch) / "plain"
            save = peft_model(model).save_pretrained
            save(str(plain))
            parameters = dict(model.named_parameters())
            trained = {k: parameters[k].detach().clone() for k in initial}
            model.load_state_dict(initial, strict=False)
            save(str(start))
            model.load_state_dict(trained, strict=False)
            save(str(directory), path_initial_model_for_weight_conversion=str(start))
            converted = Path(directory) / ADAPTER_WEIGHTS
            kept = load_file(str(plain / ADAPTER_WEIGHTS))
            state = {k: v for k, v in kept.items() if ".lora_" not in k} | load_file(str(converted))
            save_file(state, str(converted))

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise NotImplementedError(
                f"{type(self.config).__name__} is a prompt-learning tuner: it adds virtual tokens, not a "
                "weight update, so it cannot be merged; export the adapter alone (spec-lightning export "
                "--adapter_only) instead."
            )
        return super().merge(model)


class _UninitialisedWatch:
    """Warn once when a model whose data-driven initialisation was skipped (``apply`` got no calibration
    data) trains without a trained state loaded into it: it trains from peft's plain LoRA start."""

    def __init__(self, init: str) -> None:
        self.init, self.done = init, False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.done or not (module.training and torch.is_grad_enabled()):
            return
        self.done = True
        if not getattr(module, "adapter_state_loaded", False):
            rank_zero_warn(
                f"PeftTuner: init_lora_weights={self.init!r} was not applied (apply got no calibration data) "
                "and no trained adapter state was loaded, so this model trains from a plain LoRA start. "
                "Pass calibration=<batches> to apply, or train with spec_lightning's modules or the "
                "ApplyMethod callback, which pass a sample of the fit's training data."
            )


def _check_targets(model: nn.Module, config: peft.PeftConfig) -> None:
    """Every listed target name names a module of ``model`` (regexes and ``all-linear`` are peft's)."""
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, list | set | tuple):
        return
    names = [n for n, _ in model.named_modules()]
    for pattern in sorted(targets):
        if not any(matches(n, pattern) for n in names):
            linears = {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
            raise ValueError(
                f"method.init_args.config.init_args.target_modules: {pattern!r} matches no module of "
                f"{type(model).__name__}. Available linear layers (any dotted suffix works): "
                f"{available_suffixes(linears)}"
            )


def _lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors A and B of every adapted layer, by parameter name."""
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


def _residual_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weight of every LoRA-adapted layer (W_res after a residual initialisation)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if name.endswith(".base_layer")}


def _on_device(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    device = next(model.parameters()).device
    for batch in batches:
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def _run(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> None:
    """CorDA's ``run_model``: a forward pass per calibration example, without its padding (peft's
    covariance hooks take one sequence at a time)."""
    was_training = model.training
    model.eval()
    for batch in _on_device(model, batches):
        mask = batch.get("attention_mask")
        for i in range(len(batch["input_ids"])):
            length = int(mask[i].sum()) if mask is not None else batch["input_ids"].shape[1]
            row = {
                k: v[i : i + 1, :length]
                for k, v in batch.items()
                if isinstance(v, torch.Tensor) and v.dim() == 2
            }
            model(**row)
    model.train(was_training)


def _keep(model: nn.Module, name: str, value: object) -> None:
    """Keep ``value`` on ``model`` as a plain attribute (not a parameter, buffer or submodule), so it
    follows the model through ``deepcopy``; read back with ``getattr(model, name, default)``."""
    object.__setattr__(model, name, value)


def _initial_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """B₀, A₀ of every target as kept at initialisation (:func:`_keep`)."""
    initial = getattr(model, "initial_adapter", None)
    assert isinstance(initial, dict), "a residual initialisation keeps its initial factors"
    return initial
