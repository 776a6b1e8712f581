"""Every Python and shell snippet of the documentation site (docs/) is executed or checked, so an example
cannot go stale; README's are checked the same way.

- ```python blocks run, page by page in one namespace per page (so a page may build on its earlier
  blocks). A Lightning ``Trainer`` a snippet builds is capped at 2 optimiser steps and 2 validation
  batches and writes under ``tmp_path`` only; the names a snippet says it expects from the reader
  (``model``, ``train_loader``, ``val_loader``, ``fresh_base_model``) are the tiny project of
  ``examples/foreign_project``.
- ```bash blocks: every command is checked against the code it calls, in a sandbox under ``tmp_path``
  (``configs/`` and ``examples/`` linked in, ``../shared`` beside it):
  ``spec-lightning fit|validate|test|predict`` parses with ``--print_config`` (every config file, class
  path and argument is resolved, as the real run would; a command with a ``<placeholder>`` or an elided
  ``...`` must only use options that exist); ``spec-lightning reproduce`` runs with
  ``--dry_run``; ``export`` and ``bundle``, ``python -m <module>`` and ``python3 <script>`` must accept
  every option the snippet passes (their ``--help``); ``pip install`` may only name this project's extras
  and files that exist. Commands of other programs (``torchrun``'s own options, ``srun``, ``tensorboard``)
  are not run; a ``spec_lightning`` command inside them is checked as above.
- ```yaml blocks parse.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import lightning
import pytest
import tomllib
import yaml

from spec_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict"}


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def commands(body: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments and ``...`` elisions dropped,
    ``a && b`` split."""
    text = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            if words:
                out.append(words)
    return out


def named(pages: list[Path], language: str) -> list[tuple[Path, str]]:
    return [(page, body) for page in pages for body in blocks(page, language)]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A working folder shaped like a checkout: configs/, examples/, benchmarks/ linked, ../shared beside."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("configs", "examples", "benchmarks", "constraints", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared)
    return root


def run_help(argv: list[str], cwd: Path) -> str:
    """What ``argv --help`` prints: ``spec_lightning``, a module or a script, run in this process (the
    imports are paid once for the whole test run)."""
    code, out, err = in_process([*argv, "--help"], cwd)
    assert code == 0, f"{' '.join(argv)} --help failed:\n{err[-2000:]}"
    return out


def in_process(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run what ``python -m spec_lightning ...``, ``python -m <module> ...`` or ``python <script> ...`` runs
    (``argv`` without the interpreter) in this process, in ``cwd``: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    before, argv_before = os.getcwd(), sys.argv
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if argv[:2] == ["-m", "spec_lightning"]:
                    sys.argv = ["spec-lightning"]  # the arguments go to main: LightningCLI warns at both
                    main(argv[2:])
                elif argv[0] == "-m":
                    sys.argv = [argv[1], *argv[2:]]
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = list(argv)
                    runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as stop:
                code = stop.code
    finally:
        os.chdir(before)
        sys.argv = argv_before
    return (code if isinstance(code, int) else (0 if code is None else 1)), out.getvalue(), err.getvalue()


def options(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--") and w != "--"]


def check_cli(words: list[str], sandbox: Path) -> None:
    """``words`` after ``spec-lightning``: check them as the module docstring says."""
    if "..." in words or any("<" in w for w in words):
        # an elided command ("spec-lightning export ... --adapter_only") or one with a placeholder
        # ("--config <run>/config.yaml"): its options must exist
        words = [words[0], *[w for w in words[1:] if w.startswith("--") and "=" not in w]]
        known = run_help(["-m", "spec_lightning", words[0]], sandbox)
        for option in options(words):
            assert option in known, f"spec-lightning {words[0]} has no option {option}"
        return
    sub = words[0]
    if sub in LIGHTNING_COMMANDS:
        code, _, err = in_process(["-m", "spec_lightning", *words, "--print_config"], sandbox)
        assert code == 0, f"spec-lightning {' '.join(words)} does not parse:\n{err[-3000:]}"
    elif sub == "reproduce":
        words = [w for w in words if w != "--report_only"] + ["--dry_run"]
        if "--readme" in words:  # the dry run writes nothing; the file it names must exist
            i = words.index("--readme")
            assert (REPO / words[i + 1]).is_file()
            words = words[:i] + words[i + 2 :]
        code, _, err = in_process(["-m", "spec_lightning", *words], sandbox)
        assert code == 0, f"spec-lightning {' '.join(words)} failed:\n{err[-3000:]}"
    else:
        known = run_help(["-m", "spec_lightning", sub], sandbox)
        for option in options(words[1:]):
            assert option in known, f"spec-lightning {sub} has no option {option}"


def check_pip(words: list[str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    for word in words[2:]:
        match = re.fullmatch(r"(?:-e\s*)?\.\[([\w,]+)\]", word)
        if match:
            assert set(match.group(1).split(",")) <= extras, f"pip install names an unknown extra: {word}"
    if "-c" in words:
        assert (REPO / words[words.index("-c") + 1]).is_file()


def check_command(words: list[str], sandbox: Path) -> None:
    program = words[0]
    if program == "spec-lightning":
        check_cli(words[1:], sandbox)
    elif program in ("python", "python3") and words[1:2] == ["-m"]:
        if words[2] == "spec_lightning":
            check_cli(words[3:], sandbox)
            return
        known = run_help(["-m", words[2]], sandbox)
        for option in options(words[3:]):
            assert option in known, f"python -m {words[2]} has no option {option}"
    elif program in ("python", "python3"):
        script = REPO / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        known = run_help([str(script)], sandbox)
        for option in options(words[2:]):
            assert option in known, f"{words[1]} has no option {option}"
    elif program == "pip" or words[:3] == ["python3", "-m", "pip"]:
        check_pip(words)
    elif program == "torchrun":
        inner = words.index("-m")
        check_command(["python", *words[inner:]], sandbox)
    elif program in ("pytest", "tensorboard", "srun"):
        pass  # other programs: nothing of this project to check in the line itself
    else:
        raise AssertionError(f"a snippet runs {program!r}, which this test does not know how to check")


SHELL = named(PAGES, "bash")
PYTHON = [page for page in PAGES if blocks(page, "python")]
YAML = named(PAGES, "yaml")


@pytest.mark.parametrize(
    ("page", "body"), SHELL, ids=[f"{p.relative_to(REPO)}:{i}" for i, (p, _) in enumerate(SHELL)]
)
def test_shell_snippet(page: Path, body: str, sandbox: Path) -> None:
    for words in commands(body):
        if words[:2] == ["pip", "install"] or words[:4] == ["python3", "-m", "pip", "install"]:
            check_pip(words if words[0] == "pip" else words[2:])
        else:
            check_command(words, sandbox)


@pytest.mark.parametrize("page", PYTHON, ids=[str(p.relative_to(REPO)) for p in PYTHON])
def test_python_snippets(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.foreign_project.data import loaders
    from examples.foreign_project.model import TextClassifier
    from examples.foreign_project.train import base_model

    capped = functools.partialmethod(
        lightning.Trainer.__init__,
        max_steps=2,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    monkeypatch.setattr(lightning.Trainer, "__init__", capped)
    monkeypatch.chdir(tmp_path)
    train_loader, val_loader = loaders(examples=64)
    namespace = {
        "model": TextClassifier(),
        "train_loader": train_loader,
        "val_loader": val_loader,
        "fresh_base_model": base_model(),
    }
    for body in blocks(page, "python"):
        exec(compile(body, f"{page.name}:snippet", "exec"), namespace)


@pytest.mark.parametrize(("page", "body"), YAML, ids=[str(p.relative_to(REPO)) for p, _ in YAML])
def test_yaml_snippet_parses(page: Path, body: str) -> None:
    assert isinstance(yaml.safe_load(body), dict)


def test_the_snippets_are_found() -> None:
    """The fences are read: the site has shell, Python and YAML snippets (a broken pattern finds none)."""
    assert len(SHELL) >= 10 and len(PYTHON) >= 4 and len(YAML) >= 3
