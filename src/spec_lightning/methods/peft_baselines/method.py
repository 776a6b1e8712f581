"""LoRA, DoRA, PiSSA and AdaLoRA from the ``peft`` library: the reference implementations.

Nothing here re-implements a method: each class turns typed hyper-parameters into a peft config,
calls ``peft.get_peft_model`` and uses peft's own ``merge_and_unload`` and ``save_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spec_lightning.methods.base import (
    ADAPTER_CONFIG,
    FineTuningMethod,
    Regularization,
    check_state_keys,
    describe_in,
)
from spec_lightning.methods.targets import check_rank, find_linear_targets, name_list
from spec_lightning.naming import matches

#: The exact AdaLoRA state beside peft's folder.
ADALORA_STATE = "adalora_state.safetensors"


def task_type_of(model: nn.Module) -> peft.TaskType | None:
    """peft's task type from the transformers class name: it decides which peft wrapper forwards."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return peft.TaskType.SEQ_CLS
    if name.endswith("ForCausalLM"):
        return peft.TaskType.CAUSAL_LM
    return None


class PeftBacked(FineTuningMethod):
    """What every peft-backed method shares: peft's merge, peft's folder format, and a call of the
    tuner's ``update_and_allocate`` after every optimiser step where peft has one (AdaLoRA)."""

    def merge(self, model: nn.Module) -> nn.Module:
        return peft_model(model).merge_and_unload()

    def export_adapter(
        self, model: nn.Module, directory: str | Path, head: Sequence[str] = (), base_model: str | None = None
    ) -> None:
        """Write the adapter in peft's own format (``PeftModel.from_pretrained`` loads it), with the
        portable ``base_model`` name in its config instead of the folder it was loaded from, and the
        method's description beside it."""
        self.save_peft_folder(model, directory)
        config_path = Path(directory) / ADAPTER_CONFIG
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(config, indent=2))
        describe_in(directory, self, head, base_model)

    def save_peft_folder(self, model: nn.Module, directory: str | Path) -> None:
        """peft's ``save_pretrained``."""
        peft_model(model).save_pretrained(str(directory))

    def load_exported(self, model: nn.Module, directory: str | Path, head: Sequence[str] = ()) -> nn.Module:
        """peft's own loader (it also rebuilds AdaLoRA's rank pattern and PiSSA's residual weights)."""
        return peft.PeftModel.from_pretrained(model, str(directory))

    def watch_step_hook(self, model: nn.Module) -> None:
        """Warn once if the tuner has a per-step update and training never calls :meth:`on_optimizer_step`."""
        if has_step_update(model):
            self.expect_calls(model, ["on_optimizer_step"])

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        if has_step_update(model):
            self._called("on_optimizer_step")
            tuned: Any = peft_model(model)  # peft annotates base_model as a plain module
            tuned.base_model.update_and_allocate(global_step)


def has_step_update(model: nn.Module) -> bool:
    """Whether the peft tuner wants ``update_and_allocate(global_step)`` after every optimiser step."""
    return callable(getattr(getattr(model, "base_model", None), "update_and_allocate", None))


def present_heads(model: nn.Module, head: Sequence[str]) -> list[str]:
    """The head names that name a module of ``model`` (peft's ``modules_to_save``)."""
    return [h for h in head if any(matches(n, h) for n, _ in model.named_modules())]


class PeftMethod(PeftBacked):
    """LoRA and its variants from typed hyper-parameters.

    Args:
        target_modules: names (dotted suffixes) of the linear layers to adapt.
        r: rank of the low-rank update.
        alpha: scaling numerator; the update is (alpha / r) · B A.
        dropout: dropout on the adapter input.
    """

    def __init__(
        self,
        target_modules: Sequence[str] = ("query", "value"),
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.1,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"method.init_args.dropout must be in [0, 1), got {dropout}")
        self.target_modules = name_list(target_modules, "method.init_args.target_modules")
        self.r = r
        self.alpha = alpha
        self.dropout = dropout

    def peft_config(
        self, task_type: peft.TaskType | None, head: list[str], total_steps: int | None
    ) -> peft.PeftConfig:
        """The peft config this method stands for."""
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=head or None,
            task_type=task_type,
            **self.lora_options(),
        )

    def lora_options(self) -> dict[str, Any]:
        """Extra ``LoraConfig`` fields that make LoRA into a variant."""
        return {}

    def rank_to_check(self) -> int:
        return self.r

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        targets = find_linear_targets(model, self.target_modules, "method.init_args.target_modules", head)
        for name, module in targets.items():
            check_rank(self.rank_to_check(), module, name, "method.init_args.r")
        config = self.peft_config(task_type_of(model), present_heads(model, head), total_steps)
        model = peft.get_peft_model(model, config)
        self.watch_step_hook(model)
        return model


class LoRA(PeftMethod):
    """LoRA (Hu et al., 2022): W' = W + (α/r) B A, A ∈ R^{r×n} random, B ∈ R^{m×r} zero at init."""


class DoRA(PeftMethod):
    """DoRA (Liu et al., 2024): W' = m ⊙ (W + (α/r) B A) / ||W + (α/r) B A||_c, magnitude m trained."""

    def lora_options(self) -> dict[str, Any]:
        return {"use_dora": True}


class PiSSA(PeftMethod):
    """PiSSA (Meng et al., 2024): B A initialised from the top-r SVD of W, W_res = W − B A frozen.

    Args:
        init: peft's ``init_lora_weights``: "pissa" (exact SVD) or "pissa_niter_K" (randomised).
    """

    def __init__(
        self,
        target_modules: Sequence[str] = ("query", "value"),
        r: int = 8,
        alpha: int = 8,
        dropout: float = 0.0,
        init: str = "pissa",
    ) -> None:
        super().__init__(target_modules, r, alpha, dropout)
        if init != "pissa" and not init.startswith("pissa_niter_"):
            raise ValueError(f"method.init_args.init must be 'pissa' or 'pissa_niter_K', got {init!r}")
        self.init = init

    def lora_options(self) -> dict[str, Any]:
        return {"init_lora_weights": self.init}


class AdaLoRA(PeftMethod):
    """AdaLoRA (Zhang et al., 2023): W' = W + P Λ Q with SVD-form rank budgets reallocated by importance.

    peft adds the orthogonality regulariser R (the mean over P and Q matrices of ||PPᵀ − I||_F and
    ||QᵀQ − I||_F, weighted by ``orth_reg_weight``) to ``outputs.loss`` in its forward, when the model
    computed a loss (labels were given). A module that computes its loss from the logits gets no such
    loss: then :meth:`regularization` returns R (:func:`orthogonality_penalty`), which
    ``FineTuningModule`` and ``ApplyMethod`` add to the objective, so R is counted once either way.
    ``update_and_allocate`` runs after every optimiser step (``on_optimizer_step``).

    Args:
        init_r: initial rank of every target matrix.
        target_r: average rank after budget allocation.
        tinit: warm-up steps before pruning starts.
        tfinal: final steps with a fixed budget.
        delta_t: steps between two budget allocations.
        orth_reg_weight: weight of the orthogonality regulariser.
        total_step: optimiser steps of the fit; None takes the trainer's estimate.
    """

    supports_fsdp = False
    supports_fsdp_reason = (
        "peft's AdaLoraModel.forward adds the orthogonality penalty ||PPᵀ − I|| + ||QᵀQ − I|| over "
        "model.named_parameters() after the model's forward, where FSDP2 holds P and Q as dim-0 shards "
        "(DTensor): its identity, torch.eye(out=torch.empty_like(PPᵀ)), takes the shard's shape and the "
        "subtraction fails (RuntimeError: the size of tensor a (3) must match the size of tensor b (6)); "
        "its RankAllocator (update_and_allocate) ranks importance scores across all layers with "
        "torch.kthvalue over whole tensors too."
    )

    def __init__(
        self,
        target_modules: Sequence[str] = ("query", "value"),
        init_r: int = 12,
        target_r: int = 8,
        alpha: int = 16,
        dropout: float = 0.1,
        tinit: int = 0,
        tfinal: int = 0,
        delta_t: int = 1,
        orth_reg_weight: float = 0.5,
        total_step: int | None = None,
    ) -> None:
        super().__init__(target_modules, target_r, alpha, dropout)
        if target_r > init_r:
            raise ValueError(f"method.init_args.target_r ({target_r}) must not exceed init_r ({init_r})")
        self.init_r = init_r
        self.target_r = target_r
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.orth_reg_weight = orth_reg_weight
        self.total_step = total_step

    def rank_to_check(self) -> int:
        return self.init_r

    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        model = super().apply(model, head, total_steps)
        self._peft_added_penalty = True
        model.register_forward_hook(self._record_loss)
        return model

    def _record_loss(self, module: nn.Module, args: object, output: object) -> None:
        """Whether peft added R to the forward's output (it does exactly when there is a loss)."""
        self._peft_added_penalty = isinstance(getattr(output, "loss", None), torch.Tensor)

    def regularization(self, model: nn.Module) -> Regularization | None:
        """R, when the last forward computed no loss for peft to add it to; else None (peft added it)."""
        if getattr(self, "_peft_added_penalty", True):
            return None
        return Regularization("orth_reg", orthogonality_penalty(model), self.orth_reg_weight)

    def peft_config(
        self, task_type: peft.TaskType | None, head: list[str], total_steps: int | None
    ) -> peft.PeftConfig:
        total = self.total_step or total_steps or self.tinit + self.tfinal + 1
        return peft.AdaLoraConfig(
            init_r=self.init_r,
            target_r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.delta_t,
            orth_reg_weight=self.orth_reg_weight,
            total_step=total,
            target_modules=self.target_modules,
            modules_to_save=head or None,
            task_type=task_type,
        )

    def export_adapter(
        self, model: nn.Module, directory: str | Path, head: Sequence[str] = (), base_model: str | None = None
    ) -> None:
        """peft's folder, plus the exact state (:meth:`adapter_state_dict`: every rank, the rank counters
        and the rank pattern) in ``adalora_state.safetensors``. peft's own folder reloads an AdaLoRA
        whose ranks were pruned with a slightly different update (logits 2e-3 apart on the tiny GPT-2
        of the tests), and loaded for inference it fails on batches with labels."""
        super().export_adapter(model, directory, head, base_model)
        state = {k: v.contiguous() for k, v in self.adapter_state_dict(model).items()}
        save_file(state, str(Path(directory) / ADALORA_STATE))

    def load_exported(self, model: nn.Module, directory: str | Path, head: Sequence[str] = ()) -> nn.Module:
        model = self.apply(model, head=head)
        self.load_adapter_state_dict(model, load_file(str(Path(directory) / ADALORA_STATE)))
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors, the rank counters, the importance EMAs and the current rank pattern."""
        state = super().adapter_state_dict(model)
        params = dict(model.named_parameters())
        state.update({n: params[n].detach().clone() for n in self._ranknum_keys(model)})
        allocator, config = _adalora_parts(model)
        for field in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            state.update(
                {f"rankallocator.{field}.{n}": t.clone() for n, t in getattr(allocator, field).items()}
            )
        pattern = config.rank_pattern or {}
        state.update({f"rank_pattern.{n}": torch.tensor(mask) for n, mask in pattern.items()})
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        allocator, config = _adalora_parts(model)
        allocator.reset_ipt()
        pattern = {}
        tensors = {}
        for key, value in state.items():
            field, _, name = key.partition(".")
            if key.startswith("rankallocator."):
                field, _, name = name.partition(".")
                getattr(allocator, field)[name] = value
            elif field == "rank_pattern":
                pattern[name] = value.tolist()
            else:
                tensors[key] = value
        check_state_keys(
            self, set(super().adapter_state_dict(model)) | self._ranknum_keys(model), set(tensors)
        )
        config.rank_pattern = pattern or None
        model.load_state_dict(tensors, strict=False)

    @staticmethod
    def _ranknum_keys(model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.endswith("ranknum.default")}


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's R as peft's ``AdaLoraModel.forward`` computes it: the mean over the adapter's P
    (``lora_A``, r x n) and Q (``lora_B``, m x r) matrices of ||PPᵀ − I||_F and ||QᵀQ − I||_F (pruned,
    empty matrices skipped)."""
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel() > 0:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(
                torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype))
            )
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def _adalora_parts(model: nn.Module) -> tuple[Any, Any]:
    """An AdaLoRA model's rank allocator and its adapter's config (peft annotates ``base_model`` as a
    plain module and builds both at run time, so they are untyped here)."""
    tuned: Any = peft_model(model)
    return tuned.base_model.rankallocator, tuned.peft_config["default"]


def peft_model(model: nn.Module) -> peft.PeftModel:
    """``model`` as the peft model a peft-backed method's ``apply`` returned (a TypeError names any other)."""
    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"expected the peft model that the method's apply returned, got a {type(model).__name__}"
        )
    return model
