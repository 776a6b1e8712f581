"""Plant bugs in the maths and check that the tests catch them (mutation testing, no extra dependency).

Each mutant changes one operator in a target file: ``+``↔``-``, ``*``↔``/``, ``**``→``*``, a comparison
flipped or made (non-)strict, ``==``↔``!=``, a unary minus dropped. Operators inside f-strings and
``raise`` statements (messages) are left alone. For every mutant the file is rewritten, the tests
that cover it run (``pytest -x``, distributed tests excluded), and the file is restored; a mutant is
caught when they fail or time out. Writes ``mutation.json`` (every mutant, caught or not) to
``--out``; exits 1 when fewer than ``--threshold`` of the mutants run are caught::

    python -m tests.mutation                      # every mutant (about an hour on 2 cores)
    python -m tests.mutation --sample 60 --seed 0  # a seeded random sample
    python -m tests.mutation --files spectral/clustering.py --list
    python -m tests.mutation --from-log mutation.log  # rerun what survived

Mutants listed in :data:`EQUIVALENT` (read and judged unable to change a result, e.g. a float
compared exactly at a tolerance) are run and reported, but not counted.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "spec_lightning"

#: Target file (under src/spec_lightning) -> the pytest arguments that cover it.
TARGETS: dict[str, list[str]] = {
    "spectral/clustering.py": ["tests/test_clustering.py"],
    "spectral/similarity.py": ["tests/test_clustering.py"],
    "spectral/eigensolve.py": ["tests/test_eigensolve.py", "tests/test_clustering.py"],
    "spectral/neighbors.py": ["tests/test_neighbors.py", "tests/test_clustering.py"],
    "spectral/graph.py": ["tests/test_spectral_graph.py", "tests/test_graph_spectral.py"],
    "spectral/laplacian.py": ["tests/test_spectral_graph.py", "tests/test_graph_spectral.py"],
    "spectral/filters.py": ["tests/test_spectral_graph.py"],
    "spectral/coordination.py": ["tests/test_spectral_graph.py", "tests/test_graph_spectral.py"],
    "spectral/svd.py": ["tests/test_spectral_svd.py", "tests/test_lorsa.py", "tests/test_speclora.py"],
    "spectral/importance.py": ["tests/test_spectral_importance.py"],
    "spectral/blocks.py": ["tests/test_mftc_callbacks.py"],
    "methods/lorsa/layer.py": [
        "tests/test_lorsa.py",
        "tests/test_method_contract.py",
        "-k",
        "lorsa or LoRSA",
    ],
    "methods/speclora/layer.py": [
        "tests/test_speclora.py",
        "tests/test_method_contract.py",
        "-k",
        "speclora",
    ],
    "methods/lorsa/function.py": ["tests/test_lorsa.py"],
    "methods/speclora/function.py": ["tests/test_speclora.py"],
    "methods/fused.py": ["tests/test_fused.py", "tests/test_lorsa.py", "tests/test_speclora.py"],
    "methods/houlsby/layer.py": ["tests/test_houlsby.py", "tests/test_method_contract.py", "-k", "houlsby"],
    "methods/mftc/search.py": ["tests/test_search.py"],
    "methods/graph_spectral/method.py": ["tests/test_graph_spectral.py"],
    "callbacks/spectral_gradient_filter.py": ["tests/test_spectral_gradient_filter.py"],
    "callbacks/module_search.py": ["tests/test_mftc_callbacks.py"],
    "callbacks/probe.py": ["tests/test_mftc_callbacks.py"],
    "callbacks/slices.py": ["tests/test_mftc_callbacks.py"],
    "callbacks/dynamic_spectral_clustering.py": ["tests/test_mftc_callbacks.py"],
    "methods/mftc/candidates.py": ["tests/test_mftc_callbacks.py", "tests/test_search.py"],
    "analysis/convergence.py": ["tests/test_convergence.py"],
    "experiments/defaults.py": ["tests/test_defaults.py"],
}
#: Mutants that cannot change a result, judged by reading them: (file, source line, change) -> why.
#: They are run and reported, but not counted.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("analysis/convergence.py", "if (change > 0) != lower:", "Gt -> GtE"): (
        "a change of exactly 0 has returned 'settled' above (the spread is never negative)"
    ),
    (
        "experiments/defaults.py",
        'while end < len(text) and text[end].startswith("#"):  # the header is the last comment block',
        "Lt -> LtE",
    ): "a method config always has its model block after the header, so the loop stops before the end",
    **{
        ("spectral/eigensolve.py", line, change): "a float exactly at the residual tolerance"
        for line, change in [
            ("if result.residual <= RESIDUAL_TOLERANCE:", "LtE -> Lt"),
            ("if residual > RESIDUAL_TOLERANCE:", "Gt -> GtE"),
        ]
    },
    **{
        (file, line, change): "a graph of exactly the boundary size: both solvers are exact"
        for file, line, change in [
            ("spectral/eigensolve.py", "lobpcg_fits = m >= 5 * (num + GUARD_VECTORS)", "GtE -> Gt"),
            ("spectral/eigensolve.py", "if not lobpcg_fits and m > DENSE_NODES:", "Gt -> GtE"),
            (
                "spectral/eigensolve.py",
                "if m <= DENSE_NODES and (start is None or not lobpcg_fits):",
                "LtE -> Lt",
            ),
            ("spectral/eigensolve.py", "if m <= DENSE_NODES:", "LtE -> Lt"),
            ("spectral/clustering.py", "if full and m > DENSE_NODES:", "Gt -> GtE"),
        ]
    },
    ("spectral/eigensolve.py", "wanted = min(num + GUARD_VECTORS, m - 1)", "Sub -> Add"): (
        "only reached for m > 2048 nodes, where num + 4 < m − 1 always"
    ),
    (
        "spectral/similarity.py",
        "rows = np.flatnonzero((lengths == power) & (counts > neighbors))",
        "Gt -> GtE",
    ): ("a row of exactly `neighbors` edges keeps all of them whether or not topk ranks them"),
    **{
        ("spectral/graph.py", "if neighbors is None or neighbors >= m - 1:", change): (
            "with m − 1 or m neighbours the top-k keeps every edge too (the diagonal is 0 either way)"
        )
        for change in ("GtE -> Gt", "Sub -> Add")
    },
    ("methods/graph_spectral/method.py", "if reference.device != nodes.device:", "NotEq -> Eq"): (
        "moving a tensor to the device it is on changes nothing: observable on a GPU only"
    ),
    ("spectral/clustering.py", "if min(halves.sum(), len(halves) - halves.sum()) < min_size:", "Lt -> LtE"): (
        "halves of exactly min_size: k-means' split and the median split both satisfy the bounds"
    ),
}
#: Tests that start extra processes are left to the default run.
EXCLUDE = "not ddp and not distributed"

BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
COMPARE = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
}


@dataclass
class Mutant:
    """One planted bug: ``file`` line ``line``, the ``index``-th mutable operator of the file."""

    file: str
    line: int
    index: int
    change: str
    source: str = ""
    caught: bool | None = None
    equivalent: str = ""
    seconds: float = 0.0


def _protected(tree: ast.AST) -> set[int]:
    """ids of the nodes inside f-strings and raise statements (messages, not maths)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr | ast.Raise):
            ids.update(id(child) for child in ast.walk(node))
    return ids


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """The mutable operators of a module, in a fixed order, with a description of each change."""
    protected = _protected(tree)
    sites = []
    for node in ast.walk(tree):
        if id(node) in protected:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            sites.append((node, f"{type(node.op).__name__} -> {BINARY[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
            sites.append((node, f"{type(node.ops[0]).__name__} -> {COMPARE[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sites.append((node, "drop unary minus"))
    return sites


def mutants(file: str) -> list[Mutant]:
    text = (SOURCE / file).read_text()
    lines = text.splitlines()
    found = []
    for i, (node, change) in enumerate(_sites(ast.parse(text))):
        source = lines[node.lineno - 1].strip()
        why = EQUIVALENT.get((file, source, change), "")
        found.append(Mutant(file, node.lineno, i, change, source, equivalent=why))
    return found


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        if node is self.target:
            node.op = BINARY[type(node.op)]()
        return self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        if node is self.target:
            node.ops = [COMPARE[type(node.ops[0])]()]
        return self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        if node is self.target:
            return self.generic_visit(node).operand  # type: ignore[attr-defined]
        return self.generic_visit(node)


def mutated_source(mutant: Mutant) -> str:
    tree = ast.parse((SOURCE / mutant.file).read_text())
    node, _ = _sites(tree)[mutant.index]
    return ast.unparse(ast.fix_missing_locations(_Apply(node).visit(tree)))


def run(mutant: Mutant, timeout: float) -> Mutant:
    """Plant the mutant, run its tests, restore the file; ``caught`` is whether the tests failed."""
    path = SOURCE / mutant.file
    original = path.read_text()
    start = time.perf_counter()
    try:
        path.write_text(mutated_source(mutant))
        args = TARGETS[mutant.file]
        files = [a for a in args if a.endswith(".py")]
        selection = args[args.index("-k") + 1] if "-k" in args else ""
        keyword = f"({selection}) and ({EXCLUDE})" if selection else EXCLUDE
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", *files, "-k", keyword]
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            mutant.caught = child.wait(timeout=timeout) != 0
        except subprocess.TimeoutExpired:  # a mutant that loops forever
            mutant.caught = True
        finally:  # also on Ctrl-C: never leave a mutated test run behind
            child.kill()
            child.wait()
    finally:
        path.write_text(original)
    mutant.seconds = time.perf_counter() - start
    return mutant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--sample", type=int, default=0, help="run a seeded random sample of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="skip the first N mutants (resume a run)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds; a timed-out mutant is caught")
    parser.add_argument("--from-log", type=Path, help="run only the mutants a previous run's log SURVIVED")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--out", type=Path, default=Path("/tmp/spec_lightning_mutation"))
    args = parser.parse_args()
    planted = [m for f in args.files for m in mutants(f)][args.start :]
    if args.from_log:
        lines = args.from_log.read_text().splitlines()  # "[i/n] SURVIVED file:line change (s)"
        survived = {line.split(maxsplit=2)[2].rsplit(" (", 1)[0] for line in lines if " SURVIVED " in line}
        planted = [m for m in planted if f"{m.file}:{m.line} {m.change}" in survived]
    if args.sample:
        planted = sorted(
            random.Random(args.seed).sample(planted, min(args.sample, len(planted))),
            key=lambda m: (m.file, m.index),
        )
    if args.list:
        for m in planted:
            print(f"{m.file}:{m.line} {m.change}")
        print(f"{len(planted)} mutants")
        return
    for number, mutant in enumerate(planted, 1):
        run(mutant, args.timeout)
        status = "caught" if mutant.caught else "EQUIVALENT" if mutant.equivalent else "SURVIVED"
        where = f"{mutant.file}:{mutant.line} {mutant.change}"
        print(f"[{number}/{len(planted)}] {status:8} {where} ({mutant.seconds:.0f} s)", flush=True)
    counted = [m for m in planted if m.caught or not m.equivalent]
    caught = sum(bool(m.caught) for m in counted)
    rate = caught / max(len(counted), 1)
    print(
        f"caught {caught} of {len(counted)} planted bugs ({rate:.1%}); "
        f"{len(planted) - len(counted)} equivalent mutants not counted"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps([asdict(m) for m in planted], indent=1))
    sys.exit(0 if rate >= args.threshold else 1)


if __name__ == "__main__":
    main()
