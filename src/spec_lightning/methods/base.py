"""The interface every fine-tuning method implements.

A method turns a pretrained model into a trainable one (``apply``), names what it trains
(``trainable_parameters``), saves and restores only what it trains (``adapter_state_dict`` /
``load_adapter_state_dict``) and folds its update back into plain weights (``merge``). The
training loop lives once, in the LightningModules of ``spec_lightning.modules``; a method only
adds an optional regulariser to the objective and an optional hook after each optimiser step.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import nn

from spec_lightning._version import __version__
from spec_lightning.naming import matches


@dataclass(frozen=True)
class Regularization:
    """A named term of the objective: loss = task_weight · L_task + weight · value.

    The LightningModule logs ``value`` as ``train/<name>`` and ``weight`` as ``train/<name>_weight``,
    apart from the task loss.
    """

    name: str
    value: torch.Tensor
    weight: float
    task_weight: float = 1.0


class FineTuningMethod(ABC):
    """Base class of all fine-tuning methods.

    Subclasses hold only hyper-parameters (typed constructor arguments, so that LightningCLI can
    build them from YAML with ``class_path``); all model state lives in the model they modify.
    """

    #: False where every weight trains (full fine-tuning): checkpoints then hold the whole model.
    parameter_efficient: bool = True
    #: False where the update is not linear in the weights (bottleneck adapters): no merge.
    mergeable: bool = True
    #: False where the method reads or writes whole weights outside the forward pass, which FSDP2
    #: shards; ``supports_fsdp_reason`` then says why.
    supports_fsdp: bool = True
    supports_fsdp_reason: str = ""

    @abstractmethod
    def apply(self, model: nn.Module, head: Sequence[str] = (), total_steps: int | None = None) -> nn.Module:
        """Freeze the pretrained weights and add the method's trainable state.

        Args:
            model: the pretrained model; it may be modified in place.
            head: names (suffixes) of freshly initialised task-head modules that must train fully.
            total_steps: optimiser steps of the whole fit, for methods with a schedule.

        Returns:
            The model to train (the same object, or a wrapper around it).
        """

    def calibration_sample(self, loader: Callable[[], Iterable[Any]]) -> Iterable[Any] | None:
        """The training batches that :meth:`apply` reads as ``calibration=`` (a data-driven
        initialisation), drawn from the fit's ``loader``; None, the default, for a method that reads none."""
        return None

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimiser updates, in a fixed order."""
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the fine-tuned model from the pretrained one."""
        return {name: p.detach().clone() for name, p in self.trainable_parameters(model)}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a state saved by :meth:`adapter_state_dict` into a model prepared by :meth:`apply`."""
        check_state_keys(self, set(self.adapter_state_dict(model)), set(state))
        model.load_state_dict(state, strict=False)

    def export_adapter(
        self, model: nn.Module, directory: str | Path, head: Sequence[str] = (), base_model: str | None = None
    ) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json``: the method (class path and init
        args), the head names it was applied with and the base model's name, which is all
        :func:`spec_lightning.load_adapter` needs to rebuild the fine-tuned model from the base one."""
        applied = tuple(getattr(model, APPLIED_HEAD, ()))
        if not head:  # without it the adapter's head weights would find no module at load time
            head = applied
        elif set(head) != set(applied) and applied:
            raise ValueError(
                f"{type(self).__name__}.export_adapter: head={list(head)}, but the method was applied with "
                f"head={list(applied)}; the adapter holds those modules' weights, so export with the same "
                "names (or leave head out)"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.adapter_state_dict(model).items()},
            str(directory / ADAPTER_WEIGHTS),
        )
        describe_in(directory, self, head, base_model, ADAPTER_CONFIG)

    def load_exported(self, model: nn.Module, directory: str | Path, head: Sequence[str] = ()) -> nn.Module:
        """The base ``model`` with the adapter that :meth:`export_adapter` wrote into ``directory``."""
        model = self.apply(model, head=head)
        self.load_adapter_state_dict(model, load_file(str(Path(directory) / ADAPTER_WEIGHTS)))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the update into the base weights and return a plain model without method modules."""
        if not self.mergeable:
            raise NotImplementedError(
                f"{type(self).__name__} is non-linear in its parameters and cannot be merged into the base "
                "weights; export the adapter alone (spec-lightning export --adapter_only) instead."
            )
        return model

    def regularization(self, model: nn.Module) -> Regularization | None:
        """A term of the training objective besides the task loss, or None."""
        return None

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """Called after every optimiser step, before gradients are zeroed. Does nothing by default."""
        return None

    def expect_calls(self, model: nn.Module, hooks: Sequence[str]) -> None:
        """Warn once if ``model`` trains for :data:`WATCHED_FORWARDS` forward passes while a hook this
        method depends on (``regularization``, ``on_optimizer_step``) is never called: the method was
        applied outside spec_lightning's modules and its loop does not call it (the fix: the
        :class:`~spec_lightning.callbacks.ApplyMethod` callback). The hooks report with :meth:`_called`."""
        self.__dict__["_calls"] = set()
        model.register_forward_hook(_CallWatch(self, tuple(hooks)))

    def _called(self, hook: str) -> None:
        """Record that ``hook`` was called (see :meth:`expect_calls`)."""
        self.__dict__.setdefault("_calls", set()).add(hook)


class _CallWatch:
    """The forward hook of :meth:`FineTuningMethod.expect_calls` (a class, so that models stay picklable)."""

    def __init__(self, method: FineTuningMethod, hooks: tuple[str, ...]) -> None:
        self.method, self.hooks, self.forwards, self.done = method, hooks, 0, False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.done or not (module.training and torch.is_grad_enabled()):
            return
        self.forwards += 1
        if self.forwards < WATCHED_FORWARDS:
            return
        self.done = True
        missing = [h for h in self.hooks if h not in self.method.__dict__.get("_calls", ())]
        if missing:
            rank_zero_warn(
                f"{type(self.method).__name__}: the model trained {self.forwards} steps but {missing} was "
                f"never called, so the method is incomplete ({HOOK_EFFECTS[missing[0]]}). Train it with "
                "spec_lightning's modules, add spec_lightning.ApplyMethod(method) to the Trainer's "
                "callbacks, or call them from your loop."
            )


#: File names of an exported adapter: the weights, the config, and (where the config is a foreign
#: format, peft's) the description of the method that wrote it.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METHOD_FILE = "spec_lightning.json"
#: Training forward passes after which :meth:`FineTuningMethod.expect_calls` checks its hooks.
WATCHED_FORWARDS = 8
HOOK_EFFECTS = {
    "regularization": "its term never reaches the loss: it trains as the method it wraps, without it",
    "on_optimizer_step": "its per-step update (e.g. AdaLoRA's rank reallocation) never runs",
}


def describe_in(
    directory: str | Path,
    method: FineTuningMethod,
    head: Sequence[str],
    base_model: str | None,
    name: str = METHOD_FILE,
) -> None:
    """Write the method and the adapter's facts into ``directory/name``: ``adapter_config.json`` of
    spec_lightning's own format, or ``spec_lightning.json`` beside a folder whose ``adapter_config.json``
    is another library's (peft's) or another method's."""
    config = {**describe(method), **adapter_facts(head, base_model)}
    (Path(directory) / name).write_text(json.dumps(config, indent=2))


def adapter_facts(head: Sequence[str], base_model: str | None) -> dict[str, Any]:
    """What an exported adapter records beside its method: the head names and the base model."""
    return {"head": list(head), "base_model_name_or_path": base_model, "spec_lightning_version": __version__}


def check_state_keys(method: FineTuningMethod, expected: set[str], given: set[str]) -> None:
    """Raise a KeyError naming the mismatch when a saved adapter state does not fit the model."""
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise KeyError(
            f"{type(method).__name__}: the adapter state does not fit this model: missing keys {missing[:5]}"
            f" ({len(missing)} in all), unexpected keys {unexpected[:5]} ({len(unexpected)} in all). "
            "Was it saved with the same backbone, method and target modules?"
        )


#: The attribute of an adapted model that records the head names its method was applied with.
APPLIED_HEAD = "_spec_lightning_head"


def freeze_except_head(model: nn.Module, head: Sequence[str]) -> None:
    """Freeze every parameter, then unfreeze the task-head modules named in ``head`` (suffix match); the
    model remembers ``head``, which :meth:`FineTuningMethod.export_adapter` records when not given it."""
    object.__setattr__(model, APPLIED_HEAD, tuple(head))
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if any(matches(name, h) for h in head):
            module.requires_grad_(True)


def describe(value: Any) -> Any:
    """A plain, JSON-able description of a method's configuration: class path and init args (the
    constructor's parameters, which every method keeps as attributes of the same names), recursively
    (nested methods, dataclasses such as GraphConfig, sequences). It is the adapter's
    ``adapter_config.json``, what a checkpoint records of its method, and what
    :func:`spec_lightning.io.adapters.build_method` builds a method from again."""
    if isinstance(value, FineTuningMethod):
        parameters = inspect.signature(type(value).__init__).parameters.values()
        named = [
            p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        args = {name: _describe_argument(getattr(value, name)) for name in named}
        return {"class_path": _class_path(value), "init_args": args}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, set | frozenset):
        return sorted(describe(v) for v in value)
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _describe_argument(value: Any) -> Any:
    """A method's argument: a dataclass of another library (a peft config, typed by its base class in the
    method's signature) as ``class_path`` and the ``init_args`` that differ from a default-built one (so
    fields its constructor derives, such as peft's version, are left out), as jsonargparse reads it;
    anything else as :func:`describe`."""
    foreign = dataclasses.is_dataclass(value) and not type(value).__module__.startswith("spec_lightning.")
    if not foreign or isinstance(value, type):
        return describe(value)
    defaults = _defaults(type(value))
    changed = {
        f.name: describe(getattr(value, f.name))
        for f in dataclasses.fields(value)
        if f.init and getattr(value, f.name) != defaults[f.name]
    }
    return {"class_path": _class_path(value), "init_args": changed}


def _defaults(cls: type) -> dict[str, Any]:
    """The field values of a default-built ``cls``; its declared defaults where it needs arguments."""
    try:
        default = cls()
    except (TypeError, ValueError):
        return {f.name: _declared_default(f) for f in dataclasses.fields(cls)}
    return {f.name: getattr(default, f.name) for f in dataclasses.fields(cls)}


def _declared_default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _class_path(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"
