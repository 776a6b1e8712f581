"""The package's shape, checked: no import circle (type-only imports included), no source file over 450
lines, and a root that holds the CLI and a few shared utilities only (STYLE.md, README's Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spec_lightning"
MAX_LINES = 450
#: The modules the package root keeps; everything else lives in a subpackage.
ROOT_MODULES = {
    "__init__",
    "__main__",
    "_lazy",
    "_lightning",
    "_version",
    "cli",
    "distributed",
    "naming",
    "rng",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def lazy_exports(package: str) -> dict[str, str]:
    """A package's ``_EXPORTS`` (name -> module), the map its PEP 562 ``__getattr__`` imports from."""
    for node in ast.parse(MODULES[package].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    return {}


def defining_module(module: str, name: str) -> str:
    """The module ``from module import name`` depends on: a submodule, the module a package's lazy map
    names (followed through packages), else ``module`` itself."""
    if f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    target = lazy_exports(module).get(name) if module in PACKAGES else None
    if target is None or target == module:
        return module
    return defining_module(target, name) if target in PACKAGES else target


def imports(module: str) -> set[str]:
    """Every spec_lightning module ``module`` imports, at any level, ``TYPE_CHECKING`` blocks included."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("spec_"):
            found |= {defining_module(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "spec_lightning"}
    return {m for m in found if m in MODULES and m != module}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None: depth-first search with
    the three colours."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle_and_passes_a_tree() -> None:
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_type_only_imports_included() -> None:
    graph = {module: imports(module) for module in MODULES}
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph) or [])


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_over_450_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it along its seams"


def test_the_root_holds_the_cli_and_shared_utilities_only() -> None:
    loose = {p.stem for p in SRC.glob("*.py")} - ROOT_MODULES
    assert not loose, f"modules loose at the package root: {sorted(loose)}; give them a subpackage"


def test_the_package_ships_its_type_information() -> None:
    assert (SRC / "py.typed").is_file()
