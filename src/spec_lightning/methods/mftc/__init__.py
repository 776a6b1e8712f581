"""MFTC (METHODS.md §4): the module search's maths. The method runs as full fine-tuning with two
callbacks, :class:`~spec_lightning.DynamicSpectralClustering` and :class:`~spec_lightning.ModuleSearch`,
which restrict training to the chosen modules' parameter slices."""

from spec_lightning.methods.mftc.search import (
    PredictorQuality,
    SearchProblem,
    greedy,
    predictor_quality,
    search,
    solve_exact,
    two_opt,
)

__all__ = [
    "PredictorQuality",
    "SearchProblem",
    "greedy",
    "predictor_quality",
    "search",
    "solve_exact",
    "two_opt",
]
