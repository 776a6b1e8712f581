"""The reproduction grid's tuning rule: per method and task, the candidate value with the best mean score
over the sweep's seeds on the tuning split, with extensions beyond a winner at the edge of the list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from spec_lightning.analysis.statistics import lower_is_better, primary_metric


@dataclass(frozen=True)
class Sweep:
    """Tuning: for each method in ``values``, every candidate value of ``argument`` (a CLI key such as
    ``model.init_args.learning_rate``) runs with ``seeds`` and ``overrides`` added after the grid's
    (``{task}`` is filled in). These must validate on the tuning split, ``--data.init_args.validate_on=
    tuning`` (the check refuses a sweep without it), which the grid's runs all hold out of their training
    data (``data.init_args.tuning_size``), so the sweep and the reported runs train on the same examples.
    The candidate with the best mean of the task's metric over the seeds (highest; lowest for perplexity
    and losses; the first listed among equals) is chosen. A short budget can favour the edge of the
    list: with ``extend: N`` a winner at the edge gets up to N more candidates beyond it (numeric values,
    spaced by the ratio of the outermost two), run before the choice is made."""

    argument: str
    values: dict[str, list[float | int | str]]
    overrides: list[str]
    seeds: list[int] = field(default_factory=lambda: [42])
    extend: int = 0

    def scores(self, rows: Sequence[dict[str, str]], task: str, method: str) -> dict[str, float] | None:
        """Mean score over the seeds of every candidate of ``method`` on ``task`` that has run with all
        of them: the listed ones in order, then the extensions in the order they were added; None until
        every listed candidate has."""
        mine = [r for r in rows if r["task"] == task and r["method"] == method]
        listed = [str(v) for v in self.values[method]]
        scores = {}
        for value in listed + [v for v in dict.fromkeys(r["tuned"] for r in mine) if v not in listed]:
            runs = [r for r in mine if r["tuned"] == value]
            if not set(self.seeds) <= {int(r["seed"]) for r in runs}:
                if value in listed:
                    return None
                continue
            metric = primary_metric(task, [k for k in runs[0] if runs[0][k] != ""])
            sign = -1.0 if lower_is_better(metric) else 1.0
            scores[value] = sign * float(np.mean([float(r[metric]) for r in runs]))
        return scores

    def next_extension(self, rows: Sequence[dict[str, str]], task: str, method: str) -> str | None:
        """A candidate beyond the edge: while the best so far is the largest (smallest) value tried and
        fewer than ``extend`` extensions have run, the largest times (smallest divided by) the ratio of
        the two outermost values; an extension still missing seeds is returned until it has them all.
        None when nothing more is to run."""
        scores = self.scores(rows, task, method)
        return None if scores is None else self._extension(rows, task, method, scores)

    def _extension(
        self, rows: Sequence[dict[str, str]], task: str, method: str, scores: dict[str, float]
    ) -> str | None:
        """:meth:`next_extension` given the candidates' ``scores``."""
        mine = {r["tuned"] for r in rows if r["task"] == task and r["method"] == method}
        pending = sorted(mine - set(scores) - {str(v) for v in self.values[method]})
        if pending:
            return pending[0]
        extensions = len(scores) - len(self.values[method])
        ordered = sorted(scores, key=float)
        if extensions >= self.extend or len(ordered) < 2:
            return None
        best = max(scores, key=scores.__getitem__)
        if list(scores.values()).count(scores[best]) > 1:  # a tie (e.g. all at the majority class)
            return None
        if best == ordered[-1]:
            value = float(ordered[-1]) ** 2 / float(ordered[-2])
        elif best == ordered[0]:
            value = float(ordered[0]) ** 2 / float(ordered[1])
        else:
            return None
        return str(float(f"{value:.3g}"))

    def chosen(self, rows: Sequence[dict[str, str]], task: str, method: str) -> str | None:
        """The best candidate of ``method`` on ``task`` (the first of equals); None while a listed
        candidate or an extension is still to run."""
        scores = self.scores(rows, task, method)
        if scores is None or self._extension(rows, task, method, scores) is not None:
            return None
        return max(scores, key=scores.__getitem__)
