"""MFTC's module search (METHODS.md §4, their §3.3) as a multiple-choice knapsack.

Every search node i (a layer) picks exactly one candidate j: a module's blocks inside that layer, or
nothing (o_i0, increments 0). Light probing measures each candidate's increments b^A_ij, b^L_ij of
accuracy and loss over the baseline network N_e, and σ_ij, the standard error of b^A_ij. With the
linear predictor Acc(N) ≈ Acc(N_e) + Σ b^A_ij o_ij the search is

    max Σ (b^A_ij − τ σ_ij) o_ij   s.t.   L(N_e) + Σ b^L_ij o_ij ≤ L̂,   Σ n_ij o_ij ≤ P,   Σ_j o_ij ≤ 1,

(τ σ: the confidence lower bound; n_ij: parameters, P an optional budget). :func:`greedy` adds, node
by node, the best candidate that keeps the constraints (ranked by gain, or by gain per resource
used); :func:`two_opt` then tries every joint change of two nodes' choices; :func:`search` keeps the
better of the two; :func:`solve_exact` is the exact ILP (``scipy.optimize.milp``), the bound;
:func:`best_selection` keeps the better of the heuristic and the ILP.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.optimize
import scipy.stats
from sklearn.metrics import mean_absolute_error, r2_score

#: Objective improvements below this are ties.
TOLERANCE = 1e-12


@dataclass(frozen=True)
class SearchProblem:
    """Candidates c = (node, module) with their objective gain, loss increment and parameter cost.

    Args:
        node: (n,) search-node index of every candidate.
        gain: (n,) b^A − τσ.
        loss: (n,) b^L.
        cost: (n,) parameters the candidate trains.
        loss_budget: L̂ − L(N_e), the loss increase allowed.
        parameter_budget: P (``inf``: no budget).
    """

    node: np.ndarray
    gain: np.ndarray
    loss: np.ndarray
    cost: np.ndarray
    loss_budget: float
    parameter_budget: float = float("inf")

    def objective(self, selected: np.ndarray) -> float:
        return float(self.gain[selected].sum())

    def resource_use(self) -> np.ndarray:
        """Each candidate's use of the constrained resources, as fractions of their scale (> 0)."""
        loss_scale = max(abs(self.loss_budget), float(np.abs(self.loss).mean()), 1e-12)
        use = np.clip(self.loss, 0.0, None) / loss_scale
        if np.isfinite(self.parameter_budget):
            use = use + self.cost / max(self.parameter_budget, 1.0)
        return np.maximum(use, 1e-6)

    def feasible(self, selected: np.ndarray) -> bool:
        nodes = self.node[selected]
        return (
            len(np.unique(nodes)) == len(nodes)
            and self.loss[selected].sum() <= self.loss_budget + 1e-12
            and self.cost[selected].sum() <= self.parameter_budget
        )


def greedy(problem: SearchProblem, by: Literal["gain", "efficiency"] = "gain") -> np.ndarray:
    """Node-wise greedy: repeatedly give an undecided node the candidate that ranks first ``by`` gain (or
    gain per unit of the constrained resources it uses) among those with positive gain that keep the
    constraints, until none does."""
    rank = problem.gain if by == "gain" else problem.gain / problem.resource_use()
    selected: list[int] = []
    while True:
        taken = set(problem.node[selected].tolist())
        best = next(
            (
                int(c)
                for c in np.argsort(-rank)
                if problem.gain[c] > TOLERANCE
                and problem.node[c] not in taken
                and problem.feasible(np.array([*selected, c]))
            ),
            -1,
        )
        if best < 0:
            return np.array(sorted(selected), dtype=np.int64)
        selected.append(best)


def two_opt(problem: SearchProblem, selected: np.ndarray) -> np.ndarray:
    """Improve ``selected`` by the best joint change of any one or two nodes' choices (each node's
    candidates or nothing) until no change that keeps the constraints raises the objective."""
    nodes = np.unique(problem.node)
    options = {n: [-1, *np.flatnonzero(problem.node == n).tolist()] for n in nodes}
    choice = {n: -1 for n in nodes}
    for c in selected:
        choice[problem.node[c]] = int(c)

    def chosen(assignment: dict[int, int]) -> np.ndarray:
        return np.array(sorted(c for c in assignment.values() if c >= 0), dtype=np.int64)

    improved = True
    while improved:
        improved = False
        current = problem.objective(chosen(choice))
        for first, second in itertools.combinations_with_replacement(nodes, 2):
            for a, b in itertools.product(options[first], options[second]):
                if first == second and a != b:
                    continue
                trial = {**choice, first: a, second: b}
                candidate = chosen(trial)
                if problem.objective(candidate) > current + TOLERANCE and problem.feasible(candidate):
                    choice, current, improved = trial, problem.objective(candidate), True
    return chosen(choice)


def search(problem: SearchProblem) -> np.ndarray:
    """The better of two greedy starts (by gain, by efficiency), each improved by :func:`two_opt`."""
    starts = [two_opt(problem, greedy(problem, by)) for by in ("gain", "efficiency")]
    return max(starts, key=problem.objective)


def solve_exact(problem: SearchProblem) -> np.ndarray:
    """The optimal selection by ``scipy.optimize.milp`` (HiGHS branch and bound).

    The gains are divided by max |gain| first: HiGHS stops within an absolute gap of 1e-6, and raw
    accuracy increments of 1e-8..1e-3 would fall inside it (an empty selection then "ties" a gain)."""
    n = len(problem.gain)
    scale = max(float(np.abs(problem.gain).max(initial=0.0)), TOLERANCE)
    nodes = np.unique(problem.node)
    rows = [(problem.node == node).astype(float) for node in nodes]
    upper = [1.0] * len(nodes)
    rows.append(problem.loss.astype(float))
    upper.append(problem.loss_budget + 1e-12)
    if np.isfinite(problem.parameter_budget):
        rows.append(problem.cost.astype(float))
        upper.append(problem.parameter_budget)
    constraint = scipy.optimize.LinearConstraint(np.stack(rows), -np.inf, np.array(upper))
    result = scipy.optimize.milp(
        -problem.gain.astype(float) / scale,
        integrality=np.ones(n),
        bounds=scipy.optimize.Bounds(0, 1),
        constraints=constraint,
    )
    if not result.success:
        raise ValueError(f"the module-search ILP has no solution: {result.message}")
    return np.flatnonzero(result.x > 0.5)


def best_selection(problem: SearchProblem, exact: bool) -> tuple[np.ndarray, dict[str, float]]:
    """The selection to train and a report: :func:`search`'s, or with ``exact`` the better feasible one
    of it and :func:`solve_exact`'s (a solver tolerance must never cost a gain the heuristic found)."""
    heuristic = search(problem)
    report = {"heuristic_objective": problem.objective(heuristic)}
    if not exact:
        return heuristic, report
    optimum = solve_exact(problem)
    report |= {
        "exact_objective": problem.objective(optimum),
        "heuristic_gap": problem.objective(optimum) - problem.objective(heuristic),
    }
    options = [s for s in (optimum, heuristic) if problem.feasible(s)]
    return max(options, key=problem.objective), report


@dataclass(frozen=True)
class PredictorQuality:
    """How well Σ b^A predicts the measured gain of module combinations (NaN: undefined)."""

    mae: float
    r2: float
    spearman: float


def predictor_quality(predicted: np.ndarray, measured: np.ndarray) -> PredictorQuality:
    """MAE, R² = 1 − Σ(m − p)² / Σ(m − m̄)² and Spearman's ρ of predicted against measured gains.

    R² is undefined (NaN) when every measured gain is equal, ρ when either side is constant: NaN
    says so, where 0 would read as "no correlation".
    """
    if len(predicted) < 3:
        raise ValueError(f"predictor quality needs at least 3 probed combinations, got {len(predicted)}")
    flat = np.ptp(measured) == 0
    rho = scipy.stats.spearmanr(predicted, measured).statistic if not flat and np.ptp(predicted) else np.nan
    return PredictorQuality(
        mae=float(mean_absolute_error(measured, predicted)),
        r2=float("nan") if flat else float(r2_score(measured, predicted)),
        spearman=float(rho),
    )
