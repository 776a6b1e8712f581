"""MFTC module search: greedy + 2-opt against the exact ILP, and the predictor-quality measures."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest

from spec_lightning.methods.mftc.search import (
    SearchProblem,
    best_selection,
    greedy,
    predictor_quality,
    search,
    solve_exact,
    two_opt,
)


def random_problem(seed: int, nodes: int = 6, per_node: int = 5, budget: bool = False) -> SearchProblem:
    rng = np.random.default_rng(seed)
    n = nodes * per_node
    return SearchProblem(
        node=np.repeat(np.arange(nodes), per_node),
        gain=rng.normal(0.005, 0.01, n),
        loss=rng.normal(0.0, 0.02, n),
        cost=rng.integers(10_000, 100_000, n).astype(float),
        loss_budget=0.01,
        parameter_budget=250_000.0 if budget else float("inf"),
    )


@pytest.mark.parametrize("budget", [False, True], ids=["loss bound", "loss and parameter bounds"])
def test_greedy_two_opt_reaches_the_milp_optimum(budget: bool) -> None:
    gaps = []
    for seed in range(100):
        problem = random_problem(seed, budget=budget)
        exact, heuristic = solve_exact(problem), search(problem)
        assert problem.feasible(exact) and problem.feasible(heuristic)
        best = problem.objective(exact)
        assert problem.objective(heuristic) <= best + 1e-12
        gaps.append((best - problem.objective(heuristic)) / max(abs(best), 1e-9))
    gaps = np.array(gaps)
    print(
        f"greedy + 2-opt vs the ILP optimum ({'with' if budget else 'without'} parameter budget): optimal "
        f"on {np.mean(gaps < 1e-9):.0%} of 100 instances, mean gap {gaps.mean():.2%}, max {gaps.max():.1%}"
    )
    assert np.mean(gaps < 1e-9) >= 0.85 and gaps.mean() <= 0.02


def test_greedy_respects_one_candidate_per_node_and_the_loss_bound() -> None:
    problem = SearchProblem(
        node=np.array([0, 0, 1, 1]),
        gain=np.array([0.05, 0.04, 0.03, -0.01]),
        loss=np.array([0.02, -0.01, 0.0, 0.0]),
        cost=np.ones(4),
        loss_budget=0.0,
    )
    # Candidate 0 is best but breaks L(N) <= L̂; the greedy takes 1 (same node) and 2.
    assert greedy(problem).tolist() == [1, 2]
    assert solve_exact(problem).tolist() == [1, 2]
    assert not problem.feasible(np.array([0, 1]))  # two candidates of one node


def test_two_opt_fixes_a_greedy_trap() -> None:
    # The greedy takes node 0's big-loss candidate and cannot add node 1's; swapping both is better.
    problem = SearchProblem(
        node=np.array([0, 0, 1]),
        gain=np.array([0.10, 0.07, 0.06]),
        loss=np.array([0.02, 0.0, 0.0]),
        cost=np.ones(3),
        loss_budget=0.01,
    )
    problem = SearchProblem(problem.node, problem.gain, np.array([0.01, 0.0, 0.005]), problem.cost, 0.01)
    assert greedy(problem).tolist() == [0]
    assert two_opt(problem, greedy(problem)).tolist() == [1, 2]
    assert problem.objective(solve_exact(problem)) == pytest.approx(0.13)


def test_predictor_quality_against_hand_computed_values() -> None:
    predicted = np.array([0.1, 0.4, 0.2, 0.8])
    measured = np.array([0.2, 0.3, 0.1, 0.6])
    quality = predictor_quality(predicted, measured)
    assert quality.mae == pytest.approx((0.1 + 0.1 + 0.1 + 0.2) / 4)
    # R² = 1 − Σ(m − p)² / Σ(m − m̄)², m̄ = 0.3: 1 − 0.07 / 0.14 = 0.5
    assert quality.r2 == pytest.approx(0.5)
    # ranks (1, 3, 2, 4) and (2, 3, 1, 4): ρ = 1 − 6 Σd² / (n(n² − 1)) = 1 − 6·2 / 60 = 0.8
    assert quality.spearman == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least 3 probed combinations"):
        predictor_quality(predicted[:2], measured[:2])


def test_undefined_predictor_quality_is_nan_not_zero() -> None:
    flat = predictor_quality(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.5, 0.5]))
    assert np.isnan(flat.r2) and np.isnan(flat.spearman)
    constant_prediction = predictor_quality(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert np.isnan(constant_prediction.spearman) and np.isfinite(constant_prediction.r2)


def brute_force(problem: SearchProblem) -> float:
    """The best objective over every one-or-none-per-node selection, by enumeration."""
    nodes = np.unique(problem.node)
    options = [[-1, *np.flatnonzero(problem.node == n).tolist()] for n in nodes]
    best = -np.inf
    for choice in itertools.product(*options):
        selected = np.array([c for c in choice if c >= 0], dtype=np.int64)
        if problem.feasible(selected):
            best = max(best, problem.objective(selected))
    return best


@pytest.mark.parametrize("budget", [False, True], ids=["loss bound", "loss and parameter bounds"])
def test_milp_equals_brute_force_enumeration(budget: bool) -> None:
    for seed in range(60):
        problem = random_problem(seed, nodes=4, per_node=3, budget=budget)
        exact = solve_exact(problem)
        assert problem.feasible(exact)
        assert problem.objective(exact) == pytest.approx(brute_force(problem), abs=1e-12), seed


def test_infeasible_ilp_names_the_problem() -> None:
    problem = SearchProblem(np.array([0]), np.array([1.0]), np.array([0.0]), np.ones(1), loss_budget=-1.0)
    with pytest.raises(ValueError, match="module-search ILP has no solution"):
        solve_exact(problem)


@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e-8])
def test_ilp_is_scale_invariant_in_the_gains(scale: float) -> None:
    # Accuracy increments of 1e-8 (RTE) sat inside HiGHS's absolute gap: it returned nothing.
    for seed in range(20):
        problem = random_problem(seed)
        scaled = SearchProblem(
            problem.node, problem.gain * scale, problem.loss, problem.cost, problem.loss_budget
        )
        assert solve_exact(scaled).tolist() == solve_exact(problem).tolist()


def test_best_selection_keeps_the_heuristic_when_the_solver_returns_less(monkeypatch) -> None:
    problem = SearchProblem(
        np.array([0, 1]), np.array([3e-8, -1.0]), np.zeros(2), np.ones(2), loss_budget=0.0
    )
    chosen, report = best_selection(problem, exact=True)
    assert chosen.tolist() == [0] and report["heuristic_gap"] == 0.0
    search_module = importlib.import_module("spec_lightning.methods.mftc.search")
    monkeypatch.setattr(search_module, "solve_exact", lambda problem: np.array([], dtype=np.int64))
    chosen, report = best_selection(problem, exact=True)
    assert chosen.tolist() == [0]
    assert report["exact_objective"] == 0.0 and report["heuristic_gap"] == pytest.approx(-3e-8)
    chosen, report = best_selection(problem, exact=False)
    assert chosen.tolist() == [0] and set(report) == {"heuristic_objective"}


def test_resource_use_and_the_efficiency_ranking_by_hand() -> None:
    """use = max(b^L, 0) / max(|L̂ − L(N_e)|, mean |b^L|) + n / P, floored at 1e-6."""
    problem = SearchProblem(
        node=np.array([0, 1, 2]),
        gain=np.array([0.05, 0.02, 0.01]),
        loss=np.array([0.02, -0.01, 0.0]),
        cost=np.array([10.0, 50.0, 0.0]),
        loss_budget=0.01,
        parameter_budget=100.0,
    )
    np.testing.assert_allclose(problem.resource_use(), [2.0 + 0.1, 0.0 + 0.5, 1e-6])
    # Ranked by gain per use (0.024, 0.04, 1e4) the greedy takes 2, 1, then 0: together they use the
    # whole loss budget (0.02 − 0.01) and 60 of the 100 parameters.
    assert greedy(problem, by="efficiency").tolist() == [0, 1, 2]
    unbounded = SearchProblem(problem.node, problem.gain, problem.loss, problem.cost, loss_budget=0.01)
    np.testing.assert_allclose(unbounded.resource_use(), [2.0, 1e-6, 1e-6])
