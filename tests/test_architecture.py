"""The layout's rules (docs/ARCHITECTURE.md), checked on the source: no import cycle anywhere, models/ never
imports pipeline/, and no module of pipeline/ grows past what a reader takes in at once."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("models", "pipeline")
MAX_LINES = 420


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports, at any depth in the file (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            }
    return {name for name in out if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_models_never_import_the_pipeline():
    edges = graph()
    offenders = {name: sorted(t for t in edges[name] if t.startswith("pipeline")) for name in edges}
    assert {name: targets for name, targets in offenders.items() if name.startswith("models") and targets} == {}


def test_pipeline_modules_stay_readable_in_one_sitting():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    long = {name: n for name, n in lengths.items() if name.startswith("pipeline") and n > MAX_LINES}
    assert long == {}


TOP = ("pipeline.errors", "pipeline.files", "pipeline.images", "pipeline.pixels", "pipeline.progress")
TOP += (
    "pipeline.fidelity",
    "pipeline.schema",
    "pipeline.tracking",
    "pipeline.params",
    "pipeline.threads",
    "pipeline.machine",
    "pipeline.charts",
    "models",
)
# Who may import what, by module prefix (the longest prefix rules); docs/ARCHITECTURE.md has the same table.
ALLOWED = {
    "models": ("models",),
    "pipeline.errors": TOP,
    "pipeline.files": TOP,
    "pipeline.fidelity": TOP,
    "pipeline.images": TOP,
    "pipeline.pixels": TOP,
    "pipeline.progress": TOP,
    "pipeline.schema": TOP,
    "pipeline.tracking": TOP,
    "pipeline.doctor": (
        *TOP,
        "pipeline.serve.precision",
        "pipeline.serve.openvino_bf16",
    ),  # what `--precision auto` picks on this machine
    "pipeline.threads": TOP,
    "pipeline.machine": TOP,
    "pipeline.charts": TOP,
    "pipeline.repro": TOP,
    "pipeline.params": (*TOP, "pipeline.train.recipes"),  # the schema is assembled from the recipes' sections
    "pipeline.cli": ("pipeline", "models"),
    "pipeline.cli_support": ("pipeline", "models"),
    "pipeline.cli_inference": ("pipeline", "models"),
    "pipeline.data": (*TOP, "pipeline.data"),
    "pipeline.evaluate.metrics": (*TOP, "pipeline.data"),
    "pipeline.evaluate.measures": (*TOP, "pipeline.data", "pipeline.evaluate.metrics"),
    "pipeline.evaluate": (
        *TOP,
        "pipeline.data",
        "pipeline.evaluate",
        "pipeline.train.checkpoint",
        "pipeline.train.recipes",
    ),
    "pipeline.train": (*TOP, "pipeline.data", "pipeline.train", "pipeline.evaluate.measures"),
    "pipeline.export": (
        *TOP,
        "pipeline.data",
        "pipeline.export",
        "pipeline.train.checkpoint",
        "pipeline.train.recipes",
    ),
    "pipeline.serve": (*TOP, "pipeline.serve", "pipeline.export.model_card"),
    "pipeline.bench": ("pipeline", "models"),
}


def rule(module: str) -> tuple[str, ...]:
    owner = max((prefix for prefix in ALLOWED if module == prefix or module.startswith(prefix + ".")), key=len)
    return ALLOWED[owner]


def test_every_module_imports_only_what_its_folder_may():
    edges = graph()
    assert set(edges) == {name for name in edges if name == "pipeline" or rule(name)}
    broken = {
        name: sorted(t for t in targets if not any(t == a or t.startswith(a + ".") for a in rule(name)))
        for name, targets in edges.items()
        if name != "pipeline"
    }
    assert {name: targets for name, targets in broken.items() if targets} == {}
