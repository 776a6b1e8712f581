"""Every method under CPU DDP and FSDP2 (gloo, 2 processes) against one process with the whole batch:
same adapter, initialisation broadcast from rank 0, gathered adapter checkpoints, FSDP2 resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from spec_lightning import SequenceClassificationModule
from tests.conftest import BACKBONE_TARGETS, METHODS, write_sst2, write_tiny_bert
from tests.run_methods_distributed import fsdp_methods, train

ROOT = Path(__file__).resolve().parents[1]
#: Without the broadcast the ranks' different seeds move GraphSpectral's adapter by ~4e-3; float
#: reordering (another padding length, the all-reduce) by < 1e-5.
ATOL = 5e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("distributed")
    backbone = write_tiny_bert(root / "bert", dropout=0.0)
    return backbone, str(write_sst2(root / "sst2"))


@pytest.fixture(scope="module")
def single(setup: tuple[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each method's adapter from one process with the whole batch (seed 0)."""
    return {method: train(method, *setup) for method in METHODS}


def launch(strategy: str, setup: tuple[str, str], out: Path) -> None:
    command = [sys.executable, str(ROOT / "tests" / "run_methods_distributed.py"), strategy, *setup, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same(adapter: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert set(adapter) == set(reference), what
    for key, value in reference.items():
        torch.testing.assert_close(adapter[key], value, atol=ATOL, rtol=0, msg=f"{what}: {key}")


def test_ddp_trains_every_method_like_one_process(setup, single, tmp_path: Path) -> None:
    launch("ddp", setup, tmp_path)
    for method, reference in single.items():
        ranks = [torch.load(tmp_path / f"{method}-rank{r}.pt") for r in (0, 1)]
        assert_same(ranks[1], ranks[0], f"{method}: rank 1 against rank 0")
        assert_same(ranks[0], reference, f"{method}: DDP against one process")
    scored = train("lorsa", *setup, importance=True)
    chosen = [k for k in scored if k.endswith(".index")]
    assert any(not torch.equal(scored[k], single["lorsa"][k]) for k in chosen)  # the scores chose S
    assert_same(
        torch.load(tmp_path / "lorsa-importance-rank1.pt"), scored, "LoRSA + SpectralImportance under DDP"
    )


def test_fsdp2_trains_gathers_and_resumes_like_one_process(setup, single, tmp_path: Path) -> None:
    launch("fsdp2", setup, tmp_path)
    assert set(METHODS) - set(fsdp_methods()) == {"adalora", "graph_spectral", "peft_fourierft"}
    for method in fsdp_methods():
        ranks = [torch.load(tmp_path / f"{method}-rank{r}.pt") for r in (0, 1)]
        assert_same(ranks[1], ranks[0], f"{method}: rank 1 against rank 0")
        assert_same(ranks[0], single[method], f"{method}: FSDP2 against one process")
    # The checkpoint holds the whole adapter (both ranks' shards), in the shapes of one process ...
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["adapter_state_dict"]
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in single["lora"].items()}
    # ... and a sharded run resumed from it ends where the uninterrupted single process does.
    assert_same(torch.load(tmp_path / "lora-resumed-rank0.pt"), single["lora"], "LoRA resumed under FSDP2")


@pytest.mark.parametrize("method", ["adalora", "graph_spectral", "peft_fourierft"])
def test_methods_that_need_whole_tensors_refuse_fsdp2(setup, method: str) -> None:
    module = SequenceClassificationModule(setup[0], METHODS[method](*BACKBONE_TARGETS["bert"]))
    module._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(MisconfigurationException, match="does not support FSDP: .*shard.*DDP"):
        module.configure_model()


def test_parameter_efficient_methods_refuse_fsdp1(setup) -> None:
    module = SequenceClassificationModule(setup[0], METHODS["lora"](*BACKBONE_TARGETS["bert"]))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())  # Lightning refuses FSDP1 on CPU itself
    with pytest.raises(MisconfigurationException, match="FSDP1 flattens.*fsdp2.yaml"):
        module.configure_model()
