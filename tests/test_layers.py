"""The package's imports point one way, from the command line down to the math.

Every import of a minigpt module counts: at the top of a file, inside a function, and under
TYPE_CHECKING. A module may import modules of its own layer or of layers below it, and the
imports must form no cycle, so the package can be read bottom-up.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt"

LAYERS = [  # bottom first
    {"errors", "typed", "overrides", "config", "tokenizer", "console", "signals"},
    {"model", "device", "distributed", "optim", "lock", "viz", "scoring", "fastpath", "decoding", "sizing"},
    {"data", "checkpoint", "budget", "tracking"},
    {"run"},
    {"evaluation", "training", "generation", "inspection", "explain", "bench", "benchprep", "benchshared", "autosize"},
    {"api", "launch"},
    {"cli", "exits", "terminal", "view", "__main__"},
]


def imports_of(path: Path) -> set[str]:
    """The minigpt modules a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minigpt":
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("minigpt."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {name: imports_of(PACKAGE / f"{name}.py") & modules for name in modules}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    assert cycle(graph()) is None, "import cycle: " + " -> ".join(cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    edges = graph()
    assert set(edges) == set(layer), f"modules without a layer: {set(edges) - set(layer)}; gone: {set(layer) - set(edges)}"
    upward = [f"{a} ({layer[a]}) imports {b} ({layer[b]})" for a, bs in edges.items() for b in bs if layer[b] > layer[a]]
    assert not upward, "; ".join(sorted(upward))


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_no_module_is_longer_than_about_350_lines(name):
    assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 360
