"""MkDocs hooks: the reference pages that are generated, not written, so they cannot drift from the code.

- ``reference/api.md``: every name in ``spec_lightning.__all__``, rendered by mkdocstrings from its
  docstring (the module it lives in is read from the imported object);
- ``reference/cli.md``: each subcommand's ``--help``, as the installed ``spec-lightning`` prints it;
- ``reference/configs.md``: every YAML under ``configs/`` with the comment it opens with.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["fit", "validate", "test", "predict", "export", "reproduce", "bundle"]


def api_page() -> str:
    package = importlib.import_module("spec_lightning")
    groups: dict[str, list[str]] = {}
    for name in package.__all__:
        module = getattr(package, name).__module__
        groups.setdefault(module.split(".")[1], []).append(f"::: {module}.{name}")
    titles = {
        "methods": "Methods",
        "callbacks": "Callbacks",
        "modules": "LightningModules",
        "data": "DataModules",
        "spectral": "Spectral maths",
        "io": "Input and output",
    }
    lines = [
        "# Python API",
        "",
        "Every name `spec_lightning` exports (`from spec_lightning import ...`), from its docstring. The "
        "page is generated from `spec_lightning.__all__` when the site is built (`docs/hooks.py`).",
        "",
    ]
    for group in sorted(groups, key=lambda g: list(titles).index(g) if g in titles else len(titles)):
        lines += [f"## {titles.get(group, group)}", "", *groups[group], ""]
    return "\n".join(lines)


def cli_page() -> str:
    env = {**os.environ, "COLUMNS": "100", "PYTHONWARNINGS": "ignore"}
    lines = [
        "# Command line",
        "",
        "`spec-lightning` is LightningCLI (`fit`, `validate`, `test`, `predict`) plus `export`, "
        "`reproduce` and `bundle`. Each section is that subcommand's `--help`, captured when the site is "
        "built (`docs/hooks.py`).",
        "",
    ]
    for command in SUBCOMMANDS:
        out = subprocess.run(
            [sys.executable, "-m", "spec_lightning", command, "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
        ).stdout
        lines += [f"## `spec-lightning {command}`", "", "```text", out.rstrip(), "```", ""]
    return "\n".join(lines)


def configs_page() -> str:
    lines = [
        "# Shipped configs",
        "",
        "Every YAML file under `configs/`, with the comment it opens with (generated when the site is "
        "built; each file is parsed by the tests). Compose them with repeated `--config` (later files "
        "win; see [Composing configs](../getting-started/configs.md)).",
        "",
    ]
    current = None
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        folder = str(path.parent.relative_to(ROOT))
        if folder != current:
            lines += [f"## `{folder}/`", "", "| file | what it is |", "|---|---|"]
            current = folder
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        text = " ".join(comment).replace("|", "\\|") or "(no header comment)"
        lines.append(f"| `{path.name}` | {text} |")
        if path == sorted(path.parent.glob("*.yaml"))[-1]:
            lines.append("")
    return "\n".join(lines)


#: Repository folders the pages link into (results tables, figures, CSVs; configs): copied into the site
#: as they are, so a link such as ``../benchmarks/results/mftc_glue.md`` resolves and the strict build
#: checks it.
LINKED_FOLDERS = ["benchmarks/results", "configs"]


def on_files(files: Files, config: Any) -> Files:
    pages = {"reference/api.md": api_page, "reference/cli.md": cli_page, "reference/configs.md": configs_page}
    for uri, make in pages.items():
        files.append(File.generated(config, uri, content=make()))
    for folder in LINKED_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file():  # a results .md becomes a page of its own
                uri = str(path.relative_to(ROOT))
                files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
