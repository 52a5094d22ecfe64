"""No import cycle among dfw's modules (nor dfw_kernels'): each module can be read, and changed, after what
it uses.

Every import statement counts, at module level or inside a function (a lazy import hides a cycle, it does
not remove it), except those under `if TYPE_CHECKING:`. Importing `a.b.c` counts as an edge to `a.b.c`
only, not to the packages around it (their `__init__` runs first, but that is Python's order, not a use).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from tests.conftest import REPO

ROOTS = {"dfw": REPO / "dfw", "dfw_kernels": REPO / "kernels" / "dfw_kernels"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the module `name` (file `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from package import submodule` imports the submodule
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "dfw.attention.base" in graph["dfw.attention.fast_weight"]  # from .base import ...
    assert "dfw.errors" in graph["dfw.attention.fast_weight"]  # from ..errors import ...
    assert "dfw.data.tokenizers" in graph["dfw.loading"]  # imported inside a function
    assert "dfw_kernels" in graph["dfw.attention.fast_weight"]  # the other package


def test_no_import_cycle():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as err:
        cycle = " -> ".join(err.args[1])
        raise AssertionError(f"import cycle: {cycle}; move what both need into a module of its own") from None
