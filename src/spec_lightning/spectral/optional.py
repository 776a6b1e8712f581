"""The optional packages of DSCA's large path (the ``scale`` extra): faiss for the approximate neighbour
search and pyamg for the multilevel eigensolver start. Neither is imported by ``import spec_lightning``;
below :func:`~spec_lightning.spectral.neighbors.exact_nodes` blocks every method and callback works
without them, and the large path refuses to start without them, naming the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

#: The extra that installs the large path's packages, and the distribution of each module.
EXTRA = "scale"
DISTRIBUTIONS = {"faiss": "faiss-cpu", "pyamg": "pyamg"}


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    top = module.split(".")[0]
    if top in sys.modules:
        return sys.modules[top] is not None
    return importlib.util.find_spec(top) is not None


def missing_message(modules: list[str], purpose: str) -> str:
    """What is missing for ``purpose`` and the command that installs it."""
    names = [DISTRIBUTIONS.get(m.split(".")[0], m) for m in modules]
    verb = "is" if len(names) == 1 else "are"
    return (
        f"{purpose} needs {' and '.join(names)}, which {verb} not installed; install the extra: "
        f"pip install 'spec-lightning[{EXTRA}]' (or pip install {' '.join(names)})"
    )


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or an ImportError that names ``purpose`` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(missing_message([module], purpose)) from error


def check_available(modules: list[str], purpose: str) -> None:
    """Raise the ImportError of :func:`require` at once when any of ``modules`` is missing (before a long
    run reaches the step that needs it)."""
    missing = [m for m in modules if not available(m)]
    if missing:
        raise ImportError(missing_message(missing, purpose))
