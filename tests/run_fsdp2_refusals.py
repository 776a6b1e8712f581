"""What the spectral callbacks refuse on FSDP2 shards, in one process with a gloo group of one: prints one
line per case, ``<case>: <exception type>: <message>`` (or ``<case>: accepted``).

``python tests/run_fsdp2_refusals.py BACKBONE``; run by tests/test_callbacks_fsdp2.py (a process group
of its own keeps the test process free of torch.distributed state).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def attempt(case: str, action: Callable[[], object]) -> None:
    try:
        action()
        print(f"{case}: accepted")
    except Exception as error:  # noqa: BLE001 - the outcome is the result
        print(f"{case}: {type(error).__name__}: {error}")


def main(backbone: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from spec_lightning import LoRSA, SequenceClassificationModule, SpectralGradientFilter, SpectralImportance

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
            module = SequenceClassificationModule(backbone, LoRSA(target_modules=["query"], num_components=2))
            module._device_mesh = {"data_parallel": mesh, "tensor_parallel": SimpleNamespace(size=lambda: 1)}
            trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
            importance = SpectralImportance(budget="global")
            attempt("importance_global", lambda: importance.setup(trainer, module, "fit"))  # type: ignore[arg-type]

            grid = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
            weight = distribute_tensor(torch.zeros(4, 4, requires_grad=True), grid, [Replicate(), Shard(0)])
            stack = SimpleNamespace(named_parameters=lambda: [("blocks.0.fc1.weight", weight)])
            attempt("hsdp_mesh", lambda: SpectralGradientFilter().on_fit_start(trainer, stack))  # type: ignore[arg-type]
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
