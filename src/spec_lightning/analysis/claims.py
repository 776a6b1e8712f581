"""Papers' claims tested in a reproduction grid: a claim names a method, the baselines it should beat and
the runs where (the main runs, few-shot variants); the report gives each comparison's paired difference
to the baseline on the same seeds, its 95 % interval and a verdict read off that interval."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spec_lightning.analysis.statistics import display_scale, lower_is_better

#: The seed pairs a verdict waits for (the issue's "≥ 3 seeds"); fewer is "pending".
MIN_PAIRS = 3


@dataclass(frozen=True)
class Claim:
    """``claim`` (the paper's words) says ``method`` scores better than each of ``against`` (higher
    accuracy, lower perplexity) in the runs of ``variants`` ("" = the main runs), on every task the
    grid runs them on."""

    claim: str
    method: str
    against: list[str]
    variants: list[str] = field(default_factory=lambda: [""])


def verdict(
    low: float,
    high: float,
    pairs: int,
    lower_is_better: bool,
    learned: bool = True,
    baseline_learned: bool = True,
    baseline: str = "the baseline",
) -> str:
    """The verdict on one paired difference (method − baseline) with 95 % interval [``low``, ``high``]
    over ``pairs`` seed pairs: "holds" when the interval lies on the method's better side of 0, "does
    not hold" when it lies on the baseline's, "not shown" when it contains 0; a cell that did not learn
    (no seed above the majority class), on either side, is no evidence; under ``MIN_PAIRS`` pairs it is
    pending."""
    if not learned:
        return "no evidence: the method did not learn"
    if not baseline_learned:
        return f"no evidence: {baseline} did not learn"
    if pairs < MIN_PAIRS:
        return f"pending: {pairs} of {MIN_PAIRS} seed pairs"
    if np.isnan(low) or np.isnan(high):
        return "no interval"
    sign = -1.0 if lower_is_better else 1.0
    low, high = sorted((sign * low, sign * high))
    if low > 0:
        return "holds"
    if high < 0:
        return f"does not hold: {baseline} is better"
    return "not shown: the interval contains 0"


def claim_verdicts(
    claims: list[Claim], differences: Mapping[str, pd.DataFrame], stats: pd.DataFrame
) -> list[dict[str, str]]:
    """One record per claim, task, variant and baseline: ``claim``, ``where`` (task[/variant]),
    ``against``, ``value`` (the paired difference [95 % interval] x100 except perplexity, and the seed
    pairs) and ``verdict``. ``differences``: per baseline, the report's paired differences to it;
    ``stats``: the report's summary (whether each cell learned)."""
    learned = {(r.task, r.method, r.variant): bool(r.learned) for r in stats.itertuples(index=False)}
    records = []
    for claim in claims:
        for baseline in claim.against:
            table = differences.get(baseline, pd.DataFrame())
            if table.empty:
                continue
            mine = table[(table["method"] == claim.method) & table["variant"].isin(claim.variants)]
            for r in mine.to_dict("records"):
                lower = lower_is_better(r["metric"])
                scale = display_scale(r["metric"])
                ok = learned.get((r["task"], claim.method, r["variant"]), True)
                theirs = learned.get((r["task"], baseline, r["variant"]), True)
                interval = (
                    "" if np.isnan(r["low"]) else f" [{scale * r['low']:+.1f}, {scale * r['high']:+.1f}]"
                )
                records.append(
                    {
                        "claim": claim.claim,
                        "where": r["task"] if not r["variant"] else f"{r['task']}/{r['variant']}",
                        "against": baseline,
                        "value": f"{scale * r['difference']:+.1f}{interval}, {r['pairs']}",
                        "verdict": verdict(r["low"], r["high"], r["pairs"], lower, ok, theirs, baseline),
                    }
                )
    return records


def claims_table(claims: list[Claim], differences: Mapping[str, pd.DataFrame], stats: pd.DataFrame) -> str:
    """One row per claim, task, variant and baseline (:func:`claim_verdicts`): the paired difference
    [95 % interval], the seed pairs and the verdict; a claim without paired runs yet says so."""
    records = claim_verdicts(claims, differences, stats)
    lines = ["| claim | task | against | difference [95 % CI], pairs | verdict |", "|---|---|---|---|---|"]
    for claim in claims:
        rows = [
            f"| {r['where']} | {r['against']} | {r['value']} | {r['verdict']} |"
            for r in records
            if r["claim"] == claim.claim
        ]
        if not rows:
            rows = [f"| – | {', '.join(claim.against)} | – | pending: no paired runs yet |"]
        lines += [f"| {claim.claim} {row}" for row in rows]
    return "\n".join(lines)
