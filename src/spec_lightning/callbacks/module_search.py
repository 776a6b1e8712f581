"""MFTC's module search and modular fine-tuning: choose which modules train, then train only them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from spec_lightning._lightning import callbacks_of
from spec_lightning.analysis.modules import predictor_figure
from spec_lightning.callbacks.dynamic_spectral_clustering import DynamicSpectralClustering
from spec_lightning.callbacks.probe import Probe, Probeable, plain_batch, probe
from spec_lightning.callbacks.slices import SliceTraining
from spec_lightning.callbacks.strategy import KeyedCallback, log_directory, publish_figure, refuse_fsdp1
from spec_lightning.methods.mftc.candidates import Candidate, blocks_of, candidates_of, random_combinations
from spec_lightning.methods.mftc.export import export_slices
from spec_lightning.methods.mftc.search import SearchProblem, best_selection, predictor_quality
from spec_lightning.naming import matches
from spec_lightning.spectral.blocks import BlockMap


class ModuleSearch(KeyedCallback):
    """Pick the modules to fine-tune (MFTC §3.3), then train only their parameter slices.

    Until step ``search_at_step`` only the ``always_train`` parameters (the task head) update: that
    network is N_e, and the blocks' gradients still reach a :class:`DynamicSpectralClustering`
    callback, which must come before this one in ``callbacks``. At that step the search:

    1. makes the candidates: for each search node (a layer) and module, the module's blocks in it;
    2. probes N_e and every candidate: from the current weights, ``probe_steps`` optimiser steps on
       training batches, training the head plus the candidate only, then loss and accuracy on
       ``probe_batches`` held-out batches; b^A, b^L are the differences to N_e's probe and σ the
       standard error of the per-batch accuracy difference. The held-out batches are those of the
       ``probe_batches`` optimiser steps just before the search: their gradients are dropped (they
       still reach the clustering), so no weight, the head's included, was ever trained on the
       batches the probes are scored on, and the validation set stays unseen by the search. The
       probe-training batches are the ``probe_steps`` batches before those. Every probe runs under
       ``isolate_rng`` and restores the weights and the optimiser state;
    3. solves max Σ (b^A − τσ) o s.t. L(N_e) + Σ b^L o ≤ L̂, one candidate per node, and an optional
       parameter budget, by greedy + 2-opt, and by ``scipy.optimize.milp`` up to ``exact_up_to``
       candidates (the better feasible one of the two is used and the heuristic's gap logged);
    4. measures the predictor on ``predictor_samples`` random combinations plus the chosen one
       (MAE, R², Spearman; ``module_search.png`` plots predicted against measured gains).

    From then on only the selected blocks' slices (and the head) train: matrices with no selected
    slice stop requiring gradients (none is computed for them, so a step is cheaper than full
    fine-tuning; under DDP this needs ``find_unused_parameters=True``, else their gradients are
    computed and dropped, with a warning), the other matrices' gradients are masked before every
    optimiser step and their frozen slices restored after it, so no optimiser (weight decay,
    momentum) moves them. Under FSDP2 (``ModelParallelStrategy``) the masks, gradients and restored
    slices are each rank's rows of them, every rank takes part in each probe's forward and backward
    (the gradient is the whole batch's, as in one process), the probe scores are averaged over the
    ranks' batches and the selection is broadcast from rank 0. The probes step the optimiser outside
    the trainer's precision plugin, so ``16-mixed`` (a GradScaler) is refused; use ``bf16-mixed`` or
    32-bit. The selection, increments and predictor quality go to ``module_search.json`` in the log
    dir and into the checkpoint; :meth:`export` writes the trained slices alone (a few MB), which
    ``load_slices`` puts back into the base model. The module must implement :class:`Probeable`, or
    ``probe_fn`` does its part.

    Parameters outside every block and outside ``always_train`` (biases, LayerNorms, embeddings
    unless a block rule covers them) never train while this callback runs: a warning at fit start
    counts and names them; add them to ``always_train`` to train them.

    Example::

        trainer = L.Trainer(callbacks=[DynamicSpectralClustering(), ModuleSearch(search_at_step=100)])

    Args:
        search_at_step: the optimiser step after which the search runs.
        always_train: dotted-name suffixes of modules (or parameters) that train throughout (the task
            head).
        probe_steps: optimiser steps per probe (also the number of held-back training batches).
        probe_batches: held-back batches each probe is evaluated on.
        confidence: τ of the lower bound b^A − τσ.
        loss_margin: L̂ = L(N_e) + ``loss_margin``.
        parameter_budget: most block parameters the selection may train (None: no budget).
        exact_up_to: solve exactly with ``milp`` up to this many candidates.
        predictor_samples: random combinations probed to measure the predictor (0: skip; else >= 2).
        seed: sampling seed of those combinations.
        probe_fn: ``probe_fn(pl_module, batch) -> (mean loss, score)`` instead of the module's
            ``probe_step(batch)`` (higher scores are better).
    """

    def __init__(
        self,
        search_at_step: int = 100,
        always_train: Sequence[str] = ("classifier", "score"),
        probe_steps: int = 3,
        probe_batches: int = 4,
        confidence: float = 1.0,
        loss_margin: float = 0.0,
        parameter_budget: int | None = None,
        exact_up_to: int = 400,
        predictor_samples: int = 6,
        seed: int = 0,
        probe_fn: Callable[[L.LightningModule, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if search_at_step < 1 or probe_steps < 1 or probe_batches < 2 or confidence < 0:
            raise MisconfigurationException(
                "ModuleSearch: need search_at_step >= 1, probe_steps >= 1, probe_batches >= 2 and "
                f"confidence >= 0; got {search_at_step}, {probe_steps}, {probe_batches}, {confidence}"
            )
        if predictor_samples == 1 or predictor_samples < 0:
            raise MisconfigurationException(
                f"ModuleSearch: predictor_samples must be 0 or >= 2, got {predictor_samples}"
            )
        if isinstance(always_train, str) or not always_train:
            raise MisconfigurationException(
                f"ModuleSearch: always_train must list the head's names, got {always_train!r}"
            )
        self.search_at_step = search_at_step
        self.always_train = list(always_train)
        self.probe_steps = probe_steps
        self.probe_batches = probe_batches
        self.confidence = confidence
        self.loss_margin = loss_margin
        self.parameter_budget = parameter_budget
        self.exact_up_to = exact_up_to
        self.predictor_samples = predictor_samples
        self.seed = seed
        self.probe_fn = probe_fn
        self.selected: list[int] | None = None
        self.report: dict[str, Any] = {}
        self._clustering: DynamicSpectralClustering | None = None
        self._slices = SliceTraining([])
        self._held_back: list[Any] = []

    def key_arguments(self) -> Mapping[str, Any]:
        return {"search_at_step": self.search_at_step, "always_train": self.always_train, "seed": self.seed}

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_fsdp1(trainer, "ModuleSearch")
        if isinstance(trainer.strategy, ModelParallelStrategy) and pl_module.strict_loading:
            pl_module.strict_loading = False
            rank_zero_info(
                "ModuleSearch: strict_loading set to False under FSDP2: until the search the blocks get no "
                "optimiser step, hence no optimiser state, which torch refuses to load strictly on resume"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise MisconfigurationException(
                f"ModuleSearch under precision={trainer.precision!r}: its probes step the optimiser outside "
                "the trainer's gradient scaler, so fp16 gradients would be unscaled and could overflow. "
                "Use precision: bf16-mixed (or 32-true)."
            )
        if self.probe_fn is None and not isinstance(pl_module, Probeable):
            raise MisconfigurationException(
                f"ModuleSearch probes candidates through probe_step(batch) -> (loss, score), which "
                f"{type(pl_module).__name__} does not define; add that method, or pass "
                "ModuleSearch(probe_fn=fn) with fn(pl_module, batch) -> (loss, score)"
            )
        order = [c for c in callbacks_of(trainer) if isinstance(c, DynamicSpectralClustering | ModuleSearch)]
        if not order or not isinstance(order[0], DynamicSpectralClustering):
            raise MisconfigurationException(
                "ModuleSearch needs a DynamicSpectralClustering callback before it in trainer callbacks "
                "(it clusters the gradients this callback masks)"
            )
        self._clustering = order[0]
        if self._clustering.update_every_n_steps > self.search_at_step:
            raise MisconfigurationException(
                f"ModuleSearch.search_at_step ({self.search_at_step}) comes before the first clustering "
                f"(update_every_n_steps={self._clustering.update_every_n_steps}); search later"
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = [
            n
            for n, _ in pl_module.named_parameters()
            if any(matches(n, p) or matches(n.rpartition(".")[0], p) for p in self.always_train)
        ]
        self._slices = SliceTraining(head)
        if not head:
            raise MisconfigurationException(
                f"ModuleSearch: always_train {self.always_train} matches no parameter of "
                f"{type(pl_module).__name__}; name the task head, e.g. 'classifier'"
            )
        self._warn_never_trained(pl_module)
        if self.selected is not None:  # resumed after the search
            self._slices.freeze_outside(self._block_map(), trainer, pl_module, np.array(self.selected))

    def _warn_never_trained(self, pl_module: L.LightningModule) -> None:
        """Name the trainable parameters that neither a block nor ``always_train`` covers."""
        blocks = set(self._block_map().names)
        outside = [
            n
            for n, p in pl_module.named_parameters()
            if p.requires_grad and n not in blocks and n not in self._slices.head
        ]
        if not outside:
            return
        kinds = {
            "biases": [n for n in outside if n.endswith("bias")],
            "norms": [n for n in outside if "norm" in n.lower() and not n.endswith("bias")],
            "embeddings": [n for n in outside if "embed" in n.lower() and not n.endswith("bias")],
        }
        counted = {n for names in kinds.values() for n in names}
        kinds["other"] = [n for n in outside if n not in counted]
        summary = ", ".join(f"{len(names)} {kind}" for kind, names in kinds.items() if names)
        rank_zero_warn(
            f"ModuleSearch: {len(outside)} trainable parameter(s) lie outside every block and outside "
            f"always_train, so they stay frozen from step 0 ({summary}; e.g. {outside[:3]}). Add their "
            "names to always_train to train them, or a BlockRule to make them searchable."
        )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        held = self.probe_steps + self.probe_batches
        if self.selected is None and trainer.global_step >= self.search_at_step - held:
            self._held_back = [*self._held_back, batch][-held:]

    def _evaluation_step(self, trainer: L.Trainer) -> bool:
        """Whether this optimiser step's batch is held out for scoring the probes (not trained on)."""
        return self.selected is None and trainer.global_step >= self.search_at_step - self.probe_batches

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._evaluation_step(trainer):
            for p in pl_module.parameters():
                p.grad = None  # a held-out batch: the optimiser skips every parameter
        self._slices.mask_gradients(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._slices.restore(pl_module)
        if self.selected is None and trainer.global_step >= self.search_at_step:
            self.search(trainer, pl_module)

    # ---- slices ------------------------------------------------------------------------------
    def _block_map(self) -> BlockMap:
        assert self._clustering is not None and self._clustering.block_map is not None
        return self._clustering.block_map

    def trained_parameters(self) -> dict[str, torch.Tensor | None]:
        """Parameter name -> boolean mask of its trained slices, whole-parameter shaped on the CPU
        (None: the whole tensor, the head)."""
        block_map = None if self._clustering is None else self._clustering.block_map
        return self._slices.trained_parameters(block_map, self.selected)

    def export(
        self, pl_module: L.LightningModule, directory: str | Path, module: nn.Module | None = None
    ) -> Path:
        """Write the trained slices and the head alone to ``directory/mftc_slices.safetensors`` (with
        ``module_search.json``); :func:`~spec_lightning.spectral.blocks.load_slices` puts them into a
        freshly loaded base model, which then equals the fine-tuned one. Under FSDP2 the trained
        parameters are all-gathered (a collective: call it on every rank) and global rank 0 writes.

        Args:
            pl_module: the LightningModule that was fitted.
            directory: the folder to write.
            module: the submodule of ``pl_module`` that is the bare model (e.g. ``pl_module.model``):
                names are saved relative to it, so ``load_slices(bare_model, file)`` needs no prefix.
        """
        if self.selected is None:
            raise MisconfigurationException(
                "ModuleSearch.export: nothing to export before the search has run"
            )
        return export_slices(pl_module, self.trained_parameters(), self.report, directory, module)

    # ---- the search --------------------------------------------------------------------------
    def candidates(self) -> list[Candidate]:
        """One candidate per (search node, module) pair that shares blocks."""
        assert self._clustering is not None
        labels = self._clustering.labels
        if labels is None:
            raise MisconfigurationException("ModuleSearch: no clustering yet; search after the first update")
        block_map = self._block_map()
        return candidates_of(block_map.block_nodes(), labels, block_map.block_parameters())

    def search(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Probe, solve, measure the predictor, then restrict training to the selection."""
        if len(self._held_back) < self.probe_steps + self.probe_batches:
            raise MisconfigurationException(
                f"ModuleSearch held back {len(self._held_back)} batches but needs probe_steps + "
                f"probe_batches = {self.probe_steps + self.probe_batches}; search later or probe less"
            )
        # Batches restored from a checkpoint are on the CPU; the ones held back in this run stay put.
        self._held_back = [trainer.strategy.batch_to_device(batch) for batch in self._held_back]
        candidates = self.candidates()
        optimizer = trainer.optimizers[0]
        baseline = self._probe(trainer, pl_module, optimizer, np.array([], dtype=np.int64))
        probes = [self._probe(trainer, pl_module, optimizer, np.array(c.blocks)) for c in candidates]
        gain_a = np.array([p.accuracy.mean() - baseline.accuracy.mean() for p in probes])
        gain_l = np.array([p.loss.mean() - baseline.loss.mean() for p in probes])
        sigma = np.array([(p.accuracy - baseline.accuracy).std(ddof=1) for p in probes]) / np.sqrt(
            self.probe_batches
        )
        node_ids = {node: i for i, node in enumerate(dict.fromkeys(c.node for c in candidates))}
        problem = SearchProblem(
            node=np.array([node_ids[c.node] for c in candidates]),
            gain=gain_a - self.confidence * sigma,
            loss=gain_l,
            cost=np.array([c.parameters for c in candidates], dtype=float),
            loss_budget=self.loss_margin,
            parameter_budget=float("inf") if self.parameter_budget is None else float(self.parameter_budget),
        )
        chosen, objectives = best_selection(problem, exact=len(candidates) <= self.exact_up_to)
        report: dict[str, Any] = dict(objectives)
        selected_blocks = blocks_of(candidates, chosen)
        report |= {
            "step": trainer.global_step,
            "baseline": {"accuracy": float(baseline.accuracy.mean()), "loss": float(baseline.loss.mean())},
            "candidates": [
                {**asdict(c), "blocks": len(c.blocks), "b_accuracy": a, "b_loss": b, "sigma": s}
                for c, a, b, s in zip(
                    candidates, gain_a.tolist(), gain_l.tolist(), sigma.tolist(), strict=True
                )
            ],
            "selected": [int(c) for c in chosen],
            "selected_parameters": int(problem.cost[chosen].sum()),
            "trainable_parameters": int(problem.cost[chosen].sum())
            + sum(p.numel() for n, p in pl_module.named_parameters() if n in self._slices.head),
        }
        if self.predictor_samples:
            report["predictor"] = self._measure_predictor(
                trainer, pl_module, optimizer, candidates, problem, gain_a, baseline, chosen
            )
        self.selected = trainer.strategy.broadcast(selected_blocks.tolist(), src=0)
        self.report = trainer.strategy.broadcast(report, src=0)
        self._slices.freeze_outside(
            self._block_map(), trainer, pl_module, np.array(self.selected, dtype=np.int64)
        )
        pl_module.log("module_search/trainable_parameters", float(report["trainable_parameters"]))
        pl_module.log("module_search/selected_candidates", float(len(chosen)))
        directory = log_directory(trainer)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "module_search.json").write_text(json.dumps(self.report, indent=1))

    def _measure_predictor(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        candidates: list[Candidate],
        problem: SearchProblem,
        gain_a: np.ndarray,
        baseline: Probe,
        chosen: np.ndarray,
    ) -> dict[str, Any]:
        """Probe random one-per-node combinations and the chosen one; compare Σ b^A with the gain."""
        combinations = [chosen, *random_combinations(problem.node, self.predictor_samples, self.seed)]
        predicted, measured = [], []
        for combination in combinations:
            probe = self._probe(trainer, pl_module, optimizer, blocks_of(candidates, combination))
            predicted.append(float(gain_a[combination].sum()))
            measured.append(float(probe.accuracy.mean() - baseline.accuracy.mean()))
        measures = asdict(predictor_quality(np.array(predicted), np.array(measured)))
        quality = {key: value if np.isfinite(value) else None for key, value in measures.items()}
        for key, value in quality.items():  # an undefined R² or ρ is None in the report, not logged
            if value is not None:
                pl_module.log(f"module_search/predictor_{key}", value)
        directory = log_directory(trainer)
        if trainer.is_global_zero:
            fig = predictor_figure(np.array(predicted), np.array(measured), "module-search predictor")
            path = directory / "module_search.png"
            publish_figure(trainer, fig, path, "module_search/predictor", trainer.global_step)
        return {**quality, "predicted": predicted, "measured": measured}

    def _probe_step(self, pl_module: L.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.probe_fn is not None:
            return self.probe_fn(pl_module, batch)
        assert isinstance(pl_module, Probeable), "checked in setup"
        return pl_module.probe_step(batch)

    def _probe(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        blocks: np.ndarray,
    ) -> Probe:
        """Train the head and ``blocks`` on the probe-training batches, score them on the held-out ones,
        and put everything back (:func:`~spec_lightning.callbacks.probe.probe`)."""
        return probe(
            trainer,
            pl_module,
            optimizer,
            SliceTraining.device_masks(self._block_map(), pl_module, blocks),
            self._slices.head,
            (self._held_back[: self.probe_steps], self._held_back[self.probe_steps :]),
            self._probe_step,
        )

    # ---- state -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # The frozen slices are not saved: they hold their values at the search, which the restored
        # weights carry, so on_fit_start takes them from there again. The batches held back for the
        # probes are, as plain tensors on the CPU (a checkpoint loads with weights_only=True): a run
        # stopped inside the window resumes with them, not with too few to search.
        return {
            "selected": self.selected,
            "report": self.report,
            "held_back": [plain_batch(batch) for batch in self._held_back] if self.selected is None else [],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.selected = state_dict["selected"]
        self.report = state_dict["report"]
        self._held_back = list(state_dict.get("held_back", []))
