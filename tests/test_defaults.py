"""The shipped learning rates follow the tuned grids' committed sweeps (issue 40, part 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from spec_lightning.experiments.defaults import choices, lower_median, main, plan, rewrite, shipped
from tests.conftest import REPO


def test_every_method_config_ships_what_the_tuned_grids_chose() -> None:
    planned = plan(REPO)
    tuned = {"lora", "full", "dora", "pissa", "lorsa", "speclora", "graph_spectral"}
    assert {p.stem for p in planned} >= tuned
    wrong = {p.name: (shipped(p), v) for p, (v, _) in planned.items() if shipped(p) != float(f"{v:.1e}")}
    assert not wrong, f"run python -m spec_lightning.experiments.defaults --write: {wrong}"
    for path, (_, lines) in planned.items():
        assert "\n".join(lines) in path.read_text(), f"{path}: its header does not list the choices"


def test_lower_median_by_hand() -> None:
    assert lower_median([3e-3]) == 3e-3
    assert lower_median([1e-2, 3e-3, 3e-3, 9e-3]) == 3e-3  # even count: the smaller middle value
    assert lower_median([5e-4, 1.5e-4, 5e-5]) == 1.5e-4
    with pytest.raises(ValueError, match="no values"):
        lower_median([])


def sweep_repo(tmp_path: Path, rows: str) -> Path:
    """A repository root with one tuned grid, its sweep rows and a LoRA method config."""
    (tmp_path / "configs" / "method").mkdir(parents=True)
    method = tmp_path / "configs" / "method" / "lora.yaml"
    method.write_text("# LoRA.\nmodel:\n  init_args:\n    learning_rate: 1.0e-03  # kept comment\n")
    grid = {
        "name": "g",
        "tasks": ["sst2", "mrpc"],
        "output": str(tmp_path / "results"),
        "methods": {"lora": str(method)},
        "sweep": {
            "argument": "model.init_args.learning_rate",
            "values": {"lora": [0.001, 0.003, 0.01]},
            "overrides": ["--data.init_args.validate_on=tuning"],
        },
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    (tmp_path / "results" / "g").mkdir(parents=True)
    header = "task,method,variant,seed,tuned,val/accuracy\n"
    (tmp_path / "results" / "g" / "sweep.csv").write_text(header + rows)
    return tmp_path


def test_choices_and_rewrite_on_a_planted_sweep(tmp_path: Path) -> None:
    rows = (
        "sst2,lora,tune_0.001,42,0.001,0.70\nsst2,lora,tune_0.003,42,0.003,0.84\nsst2,lora,tune_0.01,42,0.01,0.80\n"
        "mrpc,lora,tune_0.001,42,0.001,0.70\nmrpc,lora,tune_0.003,42,0.003,0.71\n"  # mrpc: 0.01 pending
    )
    root = sweep_repo(tmp_path, rows)
    (found,) = choices(root, ["grid.yaml"]).values()
    assert [(c.task, c.value, round(c.score, 1)) for c in found] == [("sst2", 0.003, 84.0)]
    path = root / "configs" / "method" / "lora.yaml"
    value, lines = plan(root, ["grid.yaml"])[path]
    assert value == 0.003 and "g sst2 0.003 (84.0)" in " ".join(lines)
    rewrite(path, value, lines)
    rewrite(path, value, lines)  # idempotent: the header is replaced, not stacked
    text = path.read_text()
    assert text.count("# Shipped learning rate") == 1 and text.startswith("# LoRA.\n# Shipped")
    assert "learning_rate: 3.0e-03  # kept comment" in text and shipped(path) == 0.003


def test_the_check_fails_where_a_config_drifted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    lora = tmp_path / "configs" / "method" / "lora.yaml"
    lora.write_text(lora.read_text().replace("learning_rate: 3.0e-03", "learning_rate: 1.0e-03"))
    monkeypatch.chdir(tmp_path)  # the grids name their configs relative to the repository root
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(tmp_path)])
    assert exit_info.value.code == 1
    main(["--root", str(tmp_path), "--write"])
    main(["--root", str(tmp_path)])  # passes once written
    assert shipped(lora) == 3e-3
