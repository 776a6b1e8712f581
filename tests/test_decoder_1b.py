"""The 1B-decoder benchmark's dry run (a 2-layer toy Llama): a run goes through `spec-lightning fit` with
the method's config and the callbacks appended, and its row holds the step time, the peak memory, the
trainable count and what the callbacks logged, so the benchmark that waits for a quiet machine cannot rot."""

from __future__ import annotations

import json
from pathlib import Path


def test_the_dry_run_measures_lora_and_mftc(tmp_path: Path) -> None:
    from benchmarks import decoder_1b

    output = tmp_path / "decoder_1b"
    methods = ["peft LoRA r=8", "MFTC (DynamicSpectralClustering + ModuleSearch)"]
    decoder_1b.main(["--dry-run", "--output", str(output), "--methods", *methods])
    lora, mftc = json.loads(output.with_suffix(".json").read_text())["rows"]
    assert "error" not in lora and "error" not in mftc, (lora, mftc)
    assert lora["total"] == mftc["total"] + lora["trainable"] and lora["steps"] == mftc["steps"] == 3
    assert 0 < mftc["trainable"] <= mftc["total"]  # after the search: the slices it chose
    assert lora["step_s"] > 0 and lora["peak_rss_gib"] > 0
    assert (
        mftc["callbacks"]["clustering/modules"] >= 2
        and "module_search/trainable_parameters" in mftc["callbacks"]
    )
    # the callbacks' own work, timed in the run's process: DSCA's sketches every step and its update, the
    # search and each of its probes; the cost table turns them into the amortised share and probe cost
    assert len(mftc["spent"]["dsca_sketch"]) == 3 and len(mftc["spent"]["dsca_update"]) >= 1
    assert len(mftc["spent"]["search"]) == 1 and len(mftc["spent"]["search_probe"]) >= 2
    assert mftc["dsca_blocks"] > 0 and lora["spent"] == {} and lora["precision"] == "32-true"
    assert sum(mftc["spent"]["search_probe"]) <= mftc["spent"]["search"][0]
    text = output.with_suffix(".md").read_text()
    assert "| peft LoRA r=8 | 32-true |" in text
    assert f"| DynamicSpectralClustering | {mftc['dsca_blocks']:,} blocks;" in text and "%** of a" in text
    assert f"| ModuleSearch | {len(mftc['spent']['search_probe'])} probes" in text
