"""Finding the modules a method adapts, with errors that list what is there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spec_lightning.naming import matches


class WrappedLinear(Protocol):
    """A layer that wraps a frozen linear ``base`` and adds ``delta_weight()`` (out, in) to it."""

    base: nn.Module

    def delta_weight(self) -> torch.Tensor: ...


#: Module types whose weight is a 2-D matrix that methods can adapt.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored transposed)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def base_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as stored (a Conv1D's is (in, out)); a module without a weight tensor is a bug."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) matrix, so that y = x Wᵀ (a view for Conv1D)."""
    weight = base_weight(module)
    return weight.T if isinstance(module, Conv1D) else weight


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """W ← W + Δ for an (out, in) update Δ, in the weight's own dtype and layout."""
    weight_matrix(module).add_(delta.to(base_weight(module).dtype))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def name_list(names: Sequence[str], key: str) -> list[str]:
    """A list of module names; a bare string (which would iterate as characters) is refused."""
    if isinstance(names, str):
        raise TypeError(f"{key} must be a list of names, got the string {names!r}; write [{names!r}]")
    return list(names)


def find_linear_targets(
    model: nn.Module, patterns: Sequence[str], key: str = "target_modules", exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Map module name -> module for every linear layer whose name matches one of ``patterns``.

    Raises:
        ValueError: when ``patterns`` is empty, or a pattern matches no linear layer (the message names
            the available suffixes).
    """
    if not patterns:
        raise ValueError(f"{key} is empty: name at least one linear layer to adapt, e.g. [query, value]")
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LINEAR_TYPES) and not any(matches(name, x) for x in exclude)
    }
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {name: m for name, m in linears.items() if matches(name, pattern)}
        if not hits:
            raise ValueError(
                f"{key}: {pattern!r} matches no linear layer of {type(model).__name__}. "
                f"Available names (any dotted suffix works): {available_suffixes(linears)}"
            )
        found.update(hits)
    return found


def available_suffixes(linears: dict[str, nn.Module]) -> list[str]:
    """The distinct layer-independent name suffixes, e.g. ``attention.self.query``."""
    suffixes = set()
    for name in linears:
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        suffixes.add(".".join(parts[digits[-1] + 1 :]) if digits else name)
    return sorted(suffixes)


def check_rank(rank: int, module: nn.Module, name: str, key: str) -> None:
    """Raise when a rank exceeds what the matrix can hold."""
    fan_in, fan_out = linear_in_out(module)
    if rank < 1 or rank > min(fan_in, fan_out):
        raise ValueError(
            f"{key}={rank} does not fit {name} ({fan_out} x {fan_in}): the rank must lie in "
            f"[1, {min(fan_in, fan_out)}]. Lower {key} or target larger matrices."
        )


def resolve_top_k(top_k: int | None, default: int, module: nn.Module, name: str) -> int:
    """k for one matrix: ``top_k`` if given (it must fit the matrix), else min(default, m, n)."""
    if top_k is None:
        return min(default, *linear_in_out(module))
    check_rank(top_k, module, name, "method.init_args.top_k")
    return top_k


@torch.no_grad()
def merge_wrapped(model: nn.Module, layer_type: type[WrappedLinear]) -> nn.Module:
    """Fold every ``layer_type`` wrapper's ``delta_weight()`` into its ``base`` and put the base back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            add_to_weight(module.base, module.delta_weight())
            replace_module(model, name, module.base)
    return model
