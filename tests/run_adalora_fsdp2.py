"""Run peft's AdaLoRA forward pass on a tiny BERT sharded by FSDP2 (2 CPU processes, gloo, no Lightning)
and write what happens to ``OUT/rank{r}.txt``: ``ok`` or the exception and the file that raised it.

``python tests/run_adalora_fsdp2.py BACKBONE OUT``; run by tests/test_distributed.py, which pins why
AdaLoRA refuses FSDP2.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forward(rank: int, backbone: str, out: Path, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForSequenceClassification

    from spec_lightning import AdaLoRA
    from spec_lightning.distributed import shard_fsdp2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
        model = AdaLoRA(init_r=6, target_r=4, dropout=0.0, total_step=10).apply(base, head=["classifier"])
        shard_fsdp2(model, init_device_mesh("cpu", (2,)))
        ids = torch.randint(0, base.config.vocab_size, (2, 8))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
        result = "ok"
    except Exception as error:  # noqa: BLE001 - what happens is the result
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = next(
            (f for f in reversed(traceback.extract_tb(error.__traceback__)) if "peft" in f.filename), frame
        )
        result = f"{type(error).__name__}: {error}\n{where.filename}:{where.lineno}"
    (out / f"rank{rank}.txt").write_text(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(forward, args=(sys.argv[1], Path(sys.argv[2]), 29000 + os.getpid() % 1000), nprocs=2)
