"""Tiny models built from config and tiny GLUE-style data, written to temp folders: never a download."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import peft
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from spec_lightning.methods import (
    AdaLoRA,
    BitFit,
    DoRA,
    FineTuningMethod,
    FullFineTuning,
    GraphSpectral,
    HoulsbyAdapter,
    LoRA,
    LoRSA,
    PeftTuner,
    PiSSA,
    SpecLoRA,
)

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "plot", "very", "not"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def composed_args(backbone: str, data_dir: str, method: str = "lora") -> list[str]:
    """README's composition (CPU trainer, MiniLM model, GLUE SST-2, a method config) on a tiny backbone
    and data folder made in the test."""
    parts = ["trainer/cpu.yaml", "model/minilm.yaml", "glue/sst2.yaml", f"method/{method}.yaml"]
    return [
        *(arg for part in parts for arg in ("--config", str(REPO / "configs" / part))),
        f"--model.init_args.backbone={backbone}",
        f"--data.init_args.data_dir={data_dir}",
    ]


def run_script(name: str, *args: str, cwd: Path, timeout: int = 600) -> str:
    """Run ``tests/<name> args`` in a fresh interpreter with the repository importable (multi-process
    runs launch their other ranks from there) in ``cwd``; its stdout. A failure shows the end of its
    stderr."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / name), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def _repo_status() -> set[str] | None:
    """``git status --porcelain`` lines of the repository: every untracked file, and the ignored paths
    (a test writing ``checkpoints/`` or ``lightning_logs/`` into the working directory shows there);
    None outside a git checkout."""
    lines: set[str] = set()
    for extra in (["--untracked-files=all"], ["--untracked-files=normal", "--ignored=matching"]):
        result = subprocess.run(
            ["git", "status", "--porcelain", *extra], cwd=REPO, capture_output=True, text=True
        )
        if result.returncode != 0:
            return None
        lines.update(result.stdout.splitlines())
    return lines


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STATUS] = _repo_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests write under tmp_path only: a file the run added to or changed in the repository fails it."""
    before, after = session.config.stash.get(_STATUS, None), _repo_status()
    if before is None or after is None or after <= before:
        return
    print(
        f"\nERROR: the repository changed during the test run: {sorted(after - before)}. Tests write under "
        "tmp_path only (or were these files edited by hand while the tests ran?)"
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_STATUS = pytest.StashKey[set[str] | None]()


@pytest.fixture(autouse=True)
def _command_line_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that runs the CLI in-process passes its arguments; pytest's own must not look like a second
    command line (LightningCLI warns when it sees both)."""
    monkeypatch.setattr(sys, "argv", ["spec-lightning"])


def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str, location: Any) -> None:
    """With SPEC_LIGHTNING_WARNINGS=<file>, append every warning the run records (category, where it was
    raised, the message's first line) to that file: the tally behind pyproject's filters."""
    target = os.environ.get("SPEC_LIGHTNING_WARNINGS")
    if target:
        message = str(warning_message.message).splitlines()[0][:200]
        where = f"{warning_message.filename}:{warning_message.lineno}"
        with open(target, "a") as f:
            f.write(f"{warning_message.category.__name__}\t{where}\t{message}\t{nodeid}\n")


#: Extra words of the causal-LM tokenizer: the answer letters and the prompt words of Alpaca and MMLU.
LM_WORDS = ["a", "b", "c", "d", "answer", ":", ".", "#", "instruction", "response", "input", "question"]


def _tokenizer(folder: Path) -> BertTokenizerFast:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def lm_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like word-level tokenizer: lower-cases, splits on spaces and punctuation, adds no
    special tokens; <eos> ends documents and also pads."""
    vocab = {t: i for i, t in enumerate(["<eos>", "<unk>", *WORDS, *LM_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def write_tiny_bert(folder: Path, dropout: float = 0.1) -> str:
    """A 2-layer BERT (hidden 32, 4 heads, 128 positions) with random weights (seed 0), saved as a
    pretrained folder."""
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer GPT-2 (n_embd 32) with random weights, sharing the tiny word-piece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0
    )
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer GPT-2 language model (n_embd 32, tied embeddings) with :func:`lm_tokenizer`."""
    folder = tmp_path_factory.mktemp("tiny-gpt2-lm")
    tok = lm_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama language model shaped like SmolLM2 (grouped-query attention with 2 key/value
    heads, tied embeddings; hidden 32) with :func:`lm_tokenizer`."""
    folder = tmp_path_factory.mktemp("tiny-llama-lm")
    tok = lm_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_sst2(folder: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """SST-2-layout TSVs whose label is whether a positive word occurs: learnable in a few steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(WORDS[:3] if label else WORDS[3:6])
            filler = rng.sample(WORDS[6:], 3)
            lines.append(f"the movie was {word} {' '.join(filler)}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_sst2(tmp_path_factory.mktemp("sst2")))


#: Every method, built for a backbone's target names: (attention targets, output projections).
BACKBONE_TARGETS = {
    "bert": (["query", "value"], ["attention.output.dense", "output.dense"]),
    "gpt2": (["c_attn"], ["attn.c_proj", "mlp.c_proj"]),
    "llama": (["q_proj", "v_proj"], ["o_proj", "down_proj"]),
}
METHODS: dict[str, Callable[[list[str], list[str]], FineTuningMethod]] = {
    "full": lambda attn, out: FullFineTuning(),
    "graph_spectral": lambda attn, out: GraphSpectral(
        LoRA(target_modules=attn, r=4, dropout=0.0), spectral_weight=0.1
    ),
    "bitfit": lambda attn, out: BitFit(),
    "houlsby": lambda attn, out: HoulsbyAdapter(bottleneck=4, target_modules=out),
    "lora": lambda attn, out: LoRA(target_modules=attn, r=4, dropout=0.0),
    "dora": lambda attn, out: DoRA(target_modules=attn, r=4, dropout=0.0),
    "pissa": lambda attn, out: PiSSA(target_modules=attn, r=4),
    "lorsa": lambda attn, out: LoRSA(target_modules=attn, num_components=4, rank=2),
    "speclora": lambda attn, out: SpecLoRA(target_modules=attn, r=4, dropout=0.0, top_k=8),
    "adalora": lambda attn, out: AdaLoRA(
        target_modules=attn, init_r=6, target_r=4, dropout=0.0, total_step=20
    ),
    # Any peft config through PeftTuner: a LoRA (the generic path of the presets) and FourierFT (a tuner
    # without a preset; a zero spectrum at init, so that the model starts as the pretrained one).
    "peft_lora": lambda attn, out: PeftTuner(peft.LoraConfig(r=4, target_modules=attn)),
    "peft_fourierft": lambda attn, out: PeftTuner(
        peft.FourierFTConfig(n_frequency=16, init_weights=True, target_modules=attn)
    ),
}


def assert_bf16_autocast_gradients(
    layer: torch.nn.Module, x: torch.Tensor, trained: list[torch.Tensor]
) -> None:
    """Under CPU bf16 autocast ``layer``'s output is bf16 and the gradients of ``trained`` stay float32,
    within bf16 rounding (2 % relative norm) of the float32 ones."""
    exact = torch.autograd.grad(layer(x).square().sum(), trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    approximate = torch.autograd.grad(y.float().square().sum(), trained)
    for a, b in zip(approximate, exact, strict=True):
        assert a.dtype == torch.float32
        assert float((a - b).norm() / b.norm()) < 2e-2


def quiet_trainer(root: Path, steps: int, callbacks: list[L.Callback], **kwargs: object) -> L.Trainer:
    """A CPU Trainer for ``steps`` optimiser steps (-1: by epochs) that logs, checkpoints and prints
    nothing unless ``kwargs`` say otherwise, rooted under ``root``."""
    options: dict[str, object] = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        **options,
    )
