"""Parameter blocks: the nodes of MFTC's clustering graph, their gradient sketches and block masks.

A :class:`BlockRule` splits every parameter whose name matches its pattern into equal slices of
``width`` along ``axis``: per attention head (width = head dim along the projection's head axis) or
per group of ``d_b`` FFN neurons. A :class:`BlockMap` numbers the blocks of a model in parameter
order and maps a block id back to its parameter slice (METHODS.md §4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from spec_lightning.naming import layer_role, matches


@dataclass(frozen=True)
class BlockRule:
    """Split the parameters named like ``pattern`` into slices of ``width`` along ``axis``.

    Args:
        pattern: a full parameter name or a dotted suffix of one (peft's rule), e.g.
            ``attention.self.query.weight``.
        axis: the axis that is sliced (0: output rows of a ``nn.Linear`` weight, 1: its input columns).
        width: the slice width; it must divide the parameter's size along ``axis``.
    """

    pattern: str
    axis: int
    width: int

    def __post_init__(self) -> None:
        if self.axis not in (0, 1) or self.width < 1:
            raise ValueError(f"a block rule needs axis 0 or 1 and width >= 1, got {self}")


def bert_blocks(head_dim: int = 32, ffn_width: int = 32) -> tuple[BlockRule, ...]:
    """BERT-style encoders: W_q, W_k, W_v per head (rows), W_o per head (columns), W_1 and W_2 in
    groups of ``ffn_width`` intermediate neurons. Rules are tried in order: the attention output
    projection comes before the FFN's ``output.dense`` whose suffix it shares."""
    return (
        BlockRule("attention.self.query.weight", 0, head_dim),
        BlockRule("attention.self.key.weight", 0, head_dim),
        BlockRule("attention.self.value.weight", 0, head_dim),
        BlockRule("attention.output.dense.weight", 1, head_dim),
        BlockRule("intermediate.dense.weight", 0, ffn_width),
        BlockRule("output.dense.weight", 1, ffn_width),
    )


def llama_blocks(head_dim: int = 64, ffn_width: int = 32) -> tuple[BlockRule, ...]:
    """Llama-style decoders (Llama, Mistral, Qwen, SmolLM): q/k/v per head (rows; with grouped-query
    attention k and v have one block per key-value head), o per head (columns), gate and up in groups
    of ``ffn_width`` neurons (rows), down in the same groups (columns)."""
    return (
        BlockRule("self_attn.q_proj.weight", 0, head_dim),
        BlockRule("self_attn.k_proj.weight", 0, head_dim),
        BlockRule("self_attn.v_proj.weight", 0, head_dim),
        BlockRule("self_attn.o_proj.weight", 1, head_dim),
        BlockRule("mlp.gate_proj.weight", 0, ffn_width),
        BlockRule("mlp.up_proj.weight", 0, ffn_width),
        BlockRule("mlp.down_proj.weight", 1, ffn_width),
    )


def default_blocks(model: torch.nn.Module, ffn_width: int = 32) -> tuple[BlockRule, ...]:
    """The block rules for a transformers model inside ``model`` (any LightningModule or nn.Module):
    :func:`bert_blocks` or :func:`llama_blocks` by its parameter names, with the head dimension from its
    config (``head_dim``, else ``hidden_size / num_attention_heads``).

    Raises:
        ValueError: no transformers config, or parameter names of neither family: pass rules yourself.
    """
    config = next(
        (c for m in model.modules() if hasattr(c := getattr(m, "config", None), "num_attention_heads")),
        None,
    )
    names = [n for n, _ in model.named_parameters()]
    families = {"attention.self.query.weight": bert_blocks, "self_attn.q_proj.weight": llama_blocks}
    family = next(
        (rules for suffix, rules in families.items() if any(matches(n, suffix) for n in names)), None
    )
    if config is None or family is None:
        raise ValueError(
            "no default block rules for this model (they cover transformers BERT- and Llama-style models); "
            "pass blocks=[BlockRule(pattern, axis, width), ...] for its matrices, e.g. "
            f"{names[:3]}"
        )
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return family(head_dim, ffn_width)


@dataclass(frozen=True)
class ParameterBlocks:
    """The blocks of one parameter: ``count`` slices of ``width`` along ``axis``, ids from ``first``."""

    name: str
    shape: tuple[int, ...]
    axis: int
    width: int
    first: int

    @property
    def count(self) -> int:
        return self.shape[self.axis] // self.width

    @property
    def block_numel(self) -> int:
        return int(np.prod(self.shape)) // self.count

    def as_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The (count, block_numel) view of ``tensor``'s slices (a copy for axis 1)."""
        return tensor.movedim(self.axis, 0).reshape(self.count, self.block_numel)

    def slice_mask(self, selected: torch.Tensor) -> torch.Tensor:
        """A mask shaped like the parameter that is True on the selected blocks' slices."""
        expanded = selected.repeat_interleave(self.width)  # (shape[axis],)
        view = [1] * len(self.shape)
        view[self.axis] = self.shape[self.axis]
        return expanded.view(view).expand(self.shape)


class BlockMap:
    """Block ids 0..m−1 over the parameters matched by ``rules`` (first matching rule wins).

    Args:
        shapes: parameter name -> shape, in model order (``named_parameters``).
        rules: how to slice each kind of parameter.

    Raises:
        ValueError: no parameter matches a rule, or a width does not divide its axis.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], rules: Iterable[BlockRule]) -> None:
        rules = tuple(rules)
        self.parameters: list[ParameterBlocks] = []
        first = 0
        for name, shape in shapes.items():
            rule = next((r for r in rules if matches(name, r.pattern)), None)
            if rule is None:
                continue
            if len(shape) != 2:
                raise ValueError(
                    f"block rule {rule.pattern!r} matches {name} {tuple(shape)}: only matrices split"
                )
            if shape[rule.axis] % rule.width:
                raise ValueError(
                    f"block rule {rule.pattern!r}: width {rule.width} does not divide axis {rule.axis} of "
                    f"{name} {tuple(shape)}; choose a width that divides {shape[rule.axis]}"
                )
            blocks = ParameterBlocks(name, tuple(shape), rule.axis, rule.width, first)
            self.parameters.append(blocks)
            first += blocks.count
        if not self.parameters:
            examples = ", ".join(list(shapes)[:6])
            raise ValueError(
                f"no parameter matches the block rules {[r.pattern for r in rules]}; "
                f"the model's parameters are named like: {examples}"
            )
        self.num_blocks = first

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    def block_parameters(self) -> np.ndarray:
        """Parameters per block, (m,)."""
        return np.concatenate([np.full(p.count, p.block_numel) for p in self.parameters])

    def block_nodes(self) -> list[str]:
        """The search node of every block: ``layer <i>`` for blocks inside a layer stack, else the
        parameter name."""
        nodes = []
        for p in self.parameters:
            found = layer_role(p.name)
            nodes += [f"layer {found[1]}" if found else p.name] * p.count
        return nodes

    def block_layers(self) -> np.ndarray:
        """Layer index of every block (−1 outside a layer stack), (m,)."""
        return np.concatenate(
            [np.full(p.count, (layer_role(p.name) or ("", -1))[1]) for p in self.parameters]
        )

    def masks(self, selected: np.ndarray) -> dict[str, torch.Tensor]:
        """Parameter-shaped boolean masks of the selected block ids, for parameters with any selected."""
        chosen = np.zeros(self.num_blocks, dtype=bool)
        chosen[np.asarray(selected, dtype=np.int64)] = True
        out = {}
        for p in self.parameters:
            part = torch.from_numpy(chosen[p.first : p.first + p.count].copy())
            if part.any():
                out[p.name] = p.slice_mask(part)
        return out


def frozen_values(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The values of every masked parameter outside its mask (the slices that must not move)."""
    return {name: params[name].detach().masked_select(~mask) for name, mask in masks.items()}


def mask_gradients(grads: Mapping[str, torch.Tensor | None], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every masked parameter's gradient outside its mask, in place (masks on the gradients'
    devices; a missing gradient is skipped)."""
    for name, mask in masks.items():
        grad = grads.get(name)
        if grad is not None:
            grad.mul_(mask)


def restore_frozen(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor]
) -> None:
    """Put the values of :func:`frozen_values` back outside the masks, after an optimiser step, so
    that weight decay or momentum cannot move them either."""
    with torch.no_grad():
        for name, values in frozen.items():
            params[name].masked_scatter_(~masks[name], values)


class GradientSketcher:
    """Random projections g_i ↦ Rᵀ g_i ∈ ℝ^s of every block's gradient, R ~ N(0, 1/s), one R per block
    size (so inner products between same-size blocks are preserved in expectation), from ``seed``.

    It also returns every block's exact squared gradient norm ||g_i||² (the module energy).
    """

    def __init__(self, block_map: BlockMap, dim: int, seed: int) -> None:
        self.block_map = block_map
        self.dim = dim
        self.seed = seed
        self._projections: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _projection(self, numel: int, device: torch.device) -> torch.Tensor:
        key = (numel, device)
        if key not in self._projections:
            generator = torch.Generator().manual_seed(self.seed + numel)
            matrix = torch.randn(numel, self.dim, generator=generator) / self.dim**0.5
            self._projections[key] = matrix.to(device)
        return self._projections[key]

    def sketch(
        self, grads: Mapping[str, torch.Tensor | None], starts: Mapping[str, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s) sketches and (m,) squared norms of the gradients (float32, on the gradients' device);
        a parameter whose gradient is None gets zero rows.

        With ``starts``, ``grads[name]`` holds only the rows ``starts[name]``, ``starts[name] + 1``, ...
        of the parameter (an FSDP2 shard): the result is then this part's contribution, and since
        both are sums over a block's entries, the contributions of all parts add up to the whole
        gradient's sketches and norms."""
        device = next(g.device for g in grads.values() if g is not None)
        sketches, norms = [], []
        for p in self.block_map.parameters:
            grad = grads[p.name]
            sketch = torch.zeros(p.count, self.dim, device=device)
            norm = torch.zeros(p.count, device=device)
            if grad is not None:
                start = 0 if starts is None else starts[p.name]
                first, blocks, projection = self._part(p, grad, start)
                sketch[first : first + len(blocks)] = blocks @ projection
                norm[first : first + len(blocks)] = torch.linalg.vector_norm(blocks, dim=1).square()
            sketches.append(sketch)
            norms.append(norm)
        return torch.cat(sketches), torch.cat(norms)

    def _part(
        self, p: ParameterBlocks, rows: torch.Tensor, start: int
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """For the rows [start, start + n) of parameter ``p``: the first block they touch, their entries
        of each touched block in float32, flattened as :meth:`ParameterBlocks.as_blocks` orders a whole
        block (zeros elsewhere, for row blocks), and the projection rows that those entries meet. The
        copies are the cost (at 1B parameters they, not the projection, were most of a sketch's time):
        row blocks are a view of the float32 gradient (padded only where the part is not whole blocks),
        column blocks one transpose, made before the float32 cast."""
        projection = self._projection(p.block_numel, rows.device)
        n = rows.shape[0]
        if p.axis == 0:  # row blocks: pad the part to whole blocks (a view where it is whole blocks)
            first, end = start // p.width, -(-(start + n) // p.width)
            before, after = start - first * p.width, end * p.width - start - n
            rows = rows.float()  # no copy when it is float32 already
            if before or after:
                rows = torch.nn.functional.pad(rows, (0, 0, before, after))
            return first, rows.reshape(end - first, p.block_numel), projection  # none for an empty part
        # column blocks: every block has n of its rows here; block entry (c, r) sits at c * n + r, so the
        # blocks are the rows of the transpose, w at a time
        blocks = rows.t().contiguous().float().view(p.count, p.width * n)  # transposed in the narrower dtype
        projection = projection.view(p.width, p.shape[0], self.dim)[:, start : start + n]
        return 0, blocks, projection.reshape(p.width * n, self.dim)


def save_slices(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], path: Path
) -> None:
    """Write the trained part of every parameter in ``masks`` to a safetensors file: the values where
    the mask is True (the whole tensor for None) and the mask itself, so the file alone restores them."""
    tensors = {}
    for name, mask in masks.items():
        value = params[name].detach().cpu()
        if mask is None:
            tensors[name] = value.contiguous()
        else:
            tensors[name] = value[mask.cpu()].contiguous()
            tensors[f"{name}::mask"] = mask.cpu().to(torch.uint8).contiguous()
    save_file(tensors, str(path))


def load_slices(model: torch.nn.Module, path: str | Path, prefix: str = "") -> list[str]:
    """Write the slices of :func:`save_slices` into ``model``'s parameters (in place); returns their names.

    Args:
        model: the model to write into (e.g. the freshly loaded base model).
        path: the ``.safetensors`` file.
        prefix: a leading part of the saved names that ``model``'s names lack, e.g. ``model.`` for
            slices saved from a LightningModule that holds the model as ``self.model``.

    Raises:
        KeyError: the file names a parameter ``model`` does not have (the message suggests a prefix).
    """
    tensors = {
        name.removeprefix(prefix) if name.startswith(prefix) else name: value
        for name, value in load_file(str(path)).items()
    }
    params = dict(model.named_parameters())
    names = [n for n in tensors if not n.endswith("::mask")]
    missing = [n for n in names if n not in params]
    if missing:
        first = missing[0].split(".")[0] + "."
        hint = (
            f"; they carry a prefix the model lacks: pass prefix={first!r}"
            if all(n.startswith(first) and n.removeprefix(first) in params for n in missing)
            else ""
        )
        raise KeyError(f"{path} holds slices of {missing[:3]}, which the model does not have{hint}")
    with torch.no_grad():
        for name in names:
            mask = tensors.get(f"{name}::mask")
            target = params[name]
            if mask is None:
                target.copy_(tensors[name])
            else:
                target[mask.bool().to(target.device)] = tensors[name].to(target.device, target.dtype)
    return names
