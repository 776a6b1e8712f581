"""Fine-tune the project's own model with spec_lightning's callbacks and methods, resume, and export.

    python -m examples.foreign_project.train --out runs/foreign --steps 40

Three runs, each a plain ``trainer.fit(model, train_loader, val_loader)``:

1. LoRSA applied by :class:`~spec_lightning.ApplyMethod`, its components chosen by
   :class:`~spec_lightning.SpectralImportance` (calibrated on the fit's own loader), two
   :class:`~spec_lightning.SpectrumMonitor` s and a :class:`~spec_lightning.SpectralGradientFilter`;
   interrupted, resumed from its checkpoint, and the adapter exported and rebuilt on a bare model
   with :func:`~spec_lightning.load_adapter`.
2. Full fine-tuning with :class:`~spec_lightning.DynamicSpectralClustering` and
   :class:`~spec_lightning.ModuleSearch` (the project's own probe function), interrupted, resumed from
   its checkpoint, and its trained slices loaded into a bare model.
3. GraphSpectral over peft LoRA applied by ApplyMethod: its spectral term joins the project's loss.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from examples.foreign_project.data import loaders
from examples.foreign_project.model import TextClassifier, TinyTransformer, probe
from spec_lightning import (
    ApplyMethod,
    BlockRule,
    DynamicSpectralClustering,
    GraphConfig,
    GraphSpectral,
    LoRA,
    LoRSA,
    ModuleSearch,
    SpectralGradientFilter,
    SpectralImportance,
    SpectrumMonitor,
    load_adapter,
    load_slices,
)

#: Blocks of the project's layers: attention per head (width 8), the MLP in groups of 16 neurons.
BLOCKS = [
    BlockRule("q_proj.weight", 0, 8),
    BlockRule("k_proj.weight", 0, 8),
    BlockRule("v_proj.weight", 0, 8),
    BlockRule("o_proj.weight", 1, 8),
    BlockRule("fc1.weight", 0, 16),
    BlockRule("fc2.weight", 1, 16),
]


@dataclass
class Outcome:
    """What a run left behind, for the caller (and the tests) to check."""

    trainer: L.Trainer
    model: TextClassifier
    callbacks: dict[str, Any]
    rebuilt: torch.nn.Module | None = None


def base_model() -> TinyTransformer:
    """The 'pretrained' model the project starts from (seeded as TextClassifier builds it)."""
    return TextClassifier().net


def trainer(root: Path, steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=5)
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        default_root_dir=root,
        logger=CSVLogger(root, name="logs"),
        callbacks=[*callbacks, checkpoints],
        enable_progress_bar=False,
        log_every_n_steps=5,
        val_check_interval=steps,
    )


def lorsa_callbacks() -> dict[str, Any]:
    lorsa = LoRSA(target_modules=["q_proj", "v_proj"], num_components=8, rank=2)
    return {
        "apply": ApplyMethod(lorsa, "net", ["head"]),
        "importance": SpectralImportance(num_samples=64, batch_size=16),
        "monitor_q": SpectrumMonitor(target_modules=["q_proj"], top_k=4),
        "monitor_v": SpectrumMonitor(target_modules=["v_proj"], top_k=4),
        "filter": SpectralGradientFilter(GraphConfig(targets=("q_proj", "v_proj")), filter="heat", tau=0.5),
    }


def fit_then_resume(
    root: Path, steps: int, resume_at: int, make_callbacks: Callable[[], dict[str, Any]]
) -> tuple[L.Trainer, TextClassifier, dict[str, Any], dict[str, Any]]:
    """Fit to ``resume_at`` steps, then a new model with new callbacks resumes from the checkpoint to
    ``steps``. Returns the resumed trainer and model, the first callbacks and the resumed ones."""
    train, validation = loaders()
    first = make_callbacks()
    trainer(root, resume_at, list(first.values())).fit(TextClassifier(), train, validation)
    model, callbacks = TextClassifier(), make_callbacks()
    resumed = trainer(root, steps, list(callbacks.values()))
    resumed.fit(model, train, validation, ckpt_path=str(root / "checkpoints" / "last.ckpt"))
    return resumed, model, first, callbacks


def lorsa_run(root: Path, steps: int, resume_at: int) -> Outcome:
    """LoRSA + SpectralImportance + two SpectrumMonitors + SpectralGradientFilter: stopped at
    ``resume_at`` steps, resumed to ``steps``, then the adapter is exported and rebuilt on a bare model."""
    resumed, model, first, callbacks = fit_then_resume(root, steps, resume_at, lorsa_callbacks)
    callbacks["apply"].export_adapter(model, root / "adapter")
    rebuilt = load_adapter(base_model(), root / "adapter")
    return Outcome(resumed, model, {**callbacks, "first_importance": first["importance"]}, rebuilt)


def mftc_callbacks() -> dict[str, Any]:
    clustering = DynamicSpectralClustering(
        BLOCKS, update_every_n_steps=5, eigenvectors=6, clusters=(2, 4), min_module_size=2
    )
    search = ModuleSearch(
        search_at_step=10,
        always_train=["head"],
        probe_steps=2,
        probe_batches=2,
        predictor_samples=0,
        probe_fn=probe,
    )
    return {"clustering": clustering, "search": search}


def mftc_run(root: Path, steps: int, resume_at: int) -> Outcome:
    """DSCA + ModuleSearch on full fine-tuning: stopped at ``resume_at`` steps, resumed to ``steps``,
    then the trained slices alone are loaded into a bare model."""
    resumed, model, first, callbacks = fit_then_resume(root, steps, resume_at, mftc_callbacks)
    slices = callbacks["search"].export(model, root / "slices", module=model.net)
    rebuilt = base_model()
    load_slices(rebuilt, slices)
    return Outcome(resumed, model, {**callbacks, "first_search": first["search"]}, rebuilt)


def graph_spectral_run(root: Path, steps: int) -> Outcome:
    """GraphSpectral's joint loss over peft LoRA factors, on the project's own loop."""
    model = TextClassifier()
    train, validation = loaders()
    method = GraphSpectral(LoRA(target_modules=["q_proj", "v_proj"], r=4, dropout=0.0), spectral_weight=0.1)
    apply = ApplyMethod(method, "net", ["head"])
    fitted = trainer(root, steps, [apply])
    fitted.fit(model, train, validation)
    return Outcome(fitted, model, {"apply": apply})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/foreign_project"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    lorsa = lorsa_run(args.out / "lorsa", args.steps, resume_at=args.steps // 2)
    mftc = mftc_run(args.out / "mftc", args.steps, resume_at=args.steps // 2)
    graph = graph_spectral_run(args.out / "graph_spectral", args.steps)
    for name, outcome in (("lorsa", lorsa), ("mftc", mftc), ("graph_spectral", graph)):
        metrics = {k: round(float(v), 4) for k, v in outcome.trainer.callback_metrics.items()}
        print(f"{name}: {metrics}")


if __name__ == "__main__":
    main()
