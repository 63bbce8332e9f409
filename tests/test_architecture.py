"""The layout's rules (docs/ARCHITECTURE.md), checked on the source: no import cycle anywhere, models/ never
imports pipeline/, and no module or function grows past what a reader takes in at once."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

PACKAGES = ("models", "pipeline")
PRODUCT = "transfigure"  # the import name the installed package puts both folders under (pyproject.toml)
DYNAMIC = {"import_module", "__import__"}
MAX_LINES = 420
MAX_FUNCTION_LINES = 80  # a function, decorators aside, from `def` to its last line


def modules() -> dict[str, Path]:
    """Every module by its name inside the package (`pipeline.train.loop`; installed, `transfigure.` comes first)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports, at any depth in the file (function-level imports count too): absolute,
    relative, and dynamic (`importlib.import_module`) ones; an import this check cannot follow fails it."""
    name = next(module for module, file in known.items() if file == path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x`, `from ..data import y`: relative to this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            base = base.removeprefix(f"{PRODUCT}.")
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in DYNAMIC:
            out |= dynamic_import(node, name, package, known)
    out = {module.removeprefix(f"{PRODUCT}.") if module.startswith(f"{PRODUCT}.") else module for module in out}
    return {module for module in out if module in known}


def dynamic_import(call: ast.Call, name: str, package: str, known: dict[str, Path]) -> set[str]:
    """What `importlib.import_module(...)` or `__import__(...)` imports: a literal name, or `f"{__name__}.{...}"`
    in a package's `__init__` (its own modules); anything else is an arrow this check cannot see."""
    argument = call.args[0] if call.args else None
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return {argument.value}
    own = isinstance(argument, ast.JoinedStr) and ast.unparse(argument).startswith("f'{__name__}.")
    assert own and name == package, f"{name}: a dynamic import this check cannot follow: {ast.unparse(call)}"
    return {
        module for module in known if module.startswith(f"{package}.") and module.count(".") == package.count(".") + 1
    }


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


def test_relative_dynamic_and_product_prefixed_imports_are_all_seen(tmp_path):
    (tmp_path / "pkg").mkdir()
    known = {
        name: tmp_path / file
        for name, file in [
            ("pipeline.a", "a.py"),
            ("pipeline.b", "b.py"),
            ("pipeline.pkg", "pkg/__init__.py"),
            ("pipeline.pkg.c", "pkg/c.py"),
        ]
    }
    known["pipeline.a"].write_text(
        "import importlib\nfrom . import b\n\ndef f():\n    from .pkg import c\n"
        "    return importlib.import_module('transfigure.pipeline.pkg')\n"
    )
    known["pipeline.pkg"].write_text(
        "import importlib\nfor m in ('c',):\n    importlib.import_module(f'{__name__}.{m}')\n"
    )
    known["pipeline.pkg.c"].write_text("from ..b import x\nfrom transfigure.pipeline import a\n")
    assert imports(known["pipeline.a"], known) == {"pipeline.b", "pipeline.pkg.c", "pipeline.pkg"}
    assert imports(known["pipeline.pkg"], known) == {"pipeline.pkg.c"}
    assert imports(known["pipeline.pkg.c"], known) == {"pipeline.b", "pipeline.a"}
    known["pipeline.b"].write_text("import importlib\nname = 'a'\nimportlib.import_module(name)\n")
    with pytest.raises(AssertionError, match="cannot follow"):
        imports(known["pipeline.b"], known)


def test_installed_the_code_imports_as_transfigure_and_never_as_models_or_pipeline(tmp_path):
    # pyproject.toml lists every package folder (setuptools maps them under `transfigure.`; a folder left out
    # would be missing from the wheel).
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        f"{PRODUCT}." + ".".join(init.parent.relative_to(REPO).parts)
        for package in PACKAGES
        for init in (REPO / package).rglob("__init__.py")
    }
    assert listed == folders
    # From any other folder (the repository root itself is on sys.path only when Python starts there).
    python = [sys.executable, "-c"]
    assert (
        subprocess.run([*python, "import transfigure.pipeline.cli, transfigure.models.flows"], cwd=tmp_path).returncode
        == 0
    )
    for name in ("models", "pipeline"):
        found = subprocess.run([*python, f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert found.returncode == 1 and f"No module named '{name}'" in found.stderr


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_models_never_import_the_pipeline():
    edges = graph()
    offenders = {name: sorted(t for t in edges[name] if t.startswith("pipeline")) for name in edges}
    assert {name: targets for name, targets in offenders.items() if name.startswith("models") and targets} == {}


def test_modules_stay_readable_in_one_sitting():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_functions_fit_in_a_readers_mind():
    long = {
        f"{name}.{node.name}": node.end_lineno - node.lineno + 1
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
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
    "pipeline.params": TOP,
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
