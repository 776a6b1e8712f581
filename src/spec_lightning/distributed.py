"""Multi-process helpers: one initialisation for all ranks, FSDP2 sharding, gathering sharded state, and
what callbacks need to act on FSDP2's shards (each rank's rows of a parameter, sums over ranks).

Everything here is a no-op in a single process (or on a plain tensor), so callers use it unconditionally.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def world_size() -> int:
    """Processes in the default group; 1 outside ``torch.distributed``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_rank0(module: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's (one broadcast per tensor).

    Initialisations from an SVD (PiSSA, LoRSA, SpecLoRA) or a random draw are thereby computed once
    for all ranks: singular vectors are defined only up to sign, so two processes (other hardware,
    other library builds) may otherwise start from different, equally valid factors. FSDP does not
    synchronise module states by itself; DDP does, but only for what lives in the module.
    """
    if world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            buffer = tensor.data if device is None else tensor.data.to(device)
            dist.broadcast(buffer, src=0)
            if buffer is not tensor.data:
                tensor.data.copy_(buffer)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: instances of the classes its ``_no_split_modules``
    names (``BertLayer``, ``GPT2Block``, ``LlamaDecoderLayer``, ...), outermost first."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer block class (_no_split_modules), so FSDP2 cannot "
            "shard it block by block; train it with DDP (strategy: ddp) instead"
        )
    return blocks


def shard_fsdp2(model: nn.Module, mesh: Any) -> None:
    """FSDP2: ``fully_shard`` every transformer block, then the root (embeddings, head, rest).

    Each block's parameters are then all-gathered just before it runs and freed after; frozen and
    trainable parameters may share a block (FSDP2 keeps per-parameter ``requires_grad``).
    """
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (``DTensor``, also as an ``nn.Parameter``) all-gathered into a plain one (a
    collective: every rank must call it); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_full(state: dict[str, Any]) -> dict[str, Any]:
    """The state with every sharded tensor (``DTensor``) all-gathered into a plain one. A collective:
    every rank must call it. Other values pass through."""
    return {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in state.items()}


def shard_like(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Full tensors of ``state`` cut into the shards that ``model``'s sharded parameters of the same
    name hold on this rank (every rank passes the same full tensors)."""
    targets = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    sharded = {}
    for key, value in state.items():
        target = targets.get(key)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(
                value.to(target.device, target.dtype), target.device_mesh, target.placements
            )
        sharded[key] = value
    return sharded


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a shard (FSDP2)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def sharding_mesh(tensors: Iterable[torch.Tensor]) -> DeviceMesh | None:
    """The mesh over which FSDP2 shards ``tensors`` (dim 0 on a one-dimensional mesh); None when none
    is sharded.

    Raises:
        ValueError: a tensor is sharded another way (tensor parallelism, a 2-D HSDP mesh), which the
            callbacks' row-wise arithmetic does not cover.
    """
    mesh = None
    for tensor in tensors:
        if not isinstance(tensor, DTensor):
            continue
        if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
            raise ValueError(
                f"a parameter is sharded as {tuple(tensor.placements)} on a {tensor.device_mesh.ndim}-D "
                "mesh; spec_lightning's callbacks act on FSDP2's dim-0 shards over one data-parallel "
                "mesh (ModelParallelStrategy with tensor_parallel_size=1)"
            )
        mesh = tensor.device_mesh
    return mesh


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of ``tensor`` this rank holds, the index of the first). FSDP2's ``Shard(0)`` cuts dim
    0 as ``torch.chunk`` does: ⌈n / W⌉ rows per rank, the last ranks possibly fewer or none. A plain
    tensor is whole: (``tensor``, 0). Differentiable: the local part of a parameter passes gradients
    to that rank's shard."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    rows, ranks = tensor.shape[0], tensor.device_mesh.size()
    start = min(tensor.device_mesh.get_local_rank() * -(-rows // ranks), rows)
    return tensor.to_local(), start


def local_rows_of(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter's rows on this rank (the whole tensor off FSDP2); writing into them writes the
    parameter."""
    with torch.no_grad():
        return {n: local_rows(p)[0] for n, p in params.items()}


def local_grads(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Each gradient's rows on this rank (the whole gradient off FSDP2; None where there is none)."""
    with torch.no_grad():
        return {n: None if p.grad is None else local_rows(p.grad)[0] for n, p in params.items()}


def rows_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (shaped like ``like``'s global shape) that this rank holds of ``like``."""
    local, start = local_rows(like)
    return full if local is like else full[start : start + local.shape[0]]


def all_reduce_sum(tensor: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Σ over the mesh's ranks of ``tensor`` (a new tensor on ``tensor``'s device; ``tensor`` when
    ``mesh`` is None). Goes through the mesh's device, so CPU tensors reduce under NCCL too."""
    if mesh is None:
        return tensor
    buffer = tensor.to(mesh.device_type, copy=True)
    dist.all_reduce(buffer, group=mesh.get_group())
    return buffer.to(tensor.device)


def by_unit(model: nn.Module, names: Iterable[str]) -> Iterator[list[str]]:
    """Yield the submodule names ``names`` of ``model`` grouped by the FSDP2 unit (a ``fully_shard``-ed
    module) that holds their parameters, each group while its unit's parameters are whole
    (all-gathered, then freed before the next group: memory for one unit at a time). Unsharded models
    yield all names at once, untouched. A collective: every rank must run the loop to its end."""
    from torch.distributed.fsdp import FSDPModule

    names = list(names)
    units = {n: m for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    if not units:
        yield names
        return
    groups: dict[str, list[str]] = {}
    for name in names:
        owner = max(
            (u for u in units if u == "" or name == u or name.startswith(u + ".")), key=len, default=None
        )
        if owner is None:
            raise ValueError(f"{name} lies outside every FSDP2 unit of the model")
        groups.setdefault(owner, []).append(name)
    for owner, members in groups.items():
        unit = units[owner]
        unit.unshard()
        try:
            yield members
        finally:
            unit.reshard()


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters. FSDP2 keeps the root unit's gathered after a forward
    pass without backward (evaluation), and the next forward would use them, not the shards, which
    may have been written since; a no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
