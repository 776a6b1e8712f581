"""Multi-process helpers: one initialisation for all ranks, FSDP2 sharding, gathering sharded state.

Everything here is a no-op in a single process, so the LightningModules call it unconditionally.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


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


def gather_full(state: dict[str, Any]) -> dict[str, Any]:
    """The state with every sharded tensor (``DTensor``) all-gathered into a plain one. A collective:
    every rank must call it. Other values pass through."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


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
