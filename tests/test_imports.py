"""The import graph of both packages, read from the source (ast, nothing imported): no circle, `pallas_kernels`
stands alone (nothing from `llama_surgery_jax`), and `llama_surgery_jax`'s top holds command lines only (a module
there with a `__main__` block: a CLI parses arguments and makes one call; what it calls is library), which no module
imports.

    python tests/test_imports.py        # the graph, a line per module with what it imports
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama_surgery_jax", "pallas_kernels")


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of both packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in the file names (function-level imports included): for
    `from A import b`, A.b (`import_graph` takes A where b is no module)."""
    names = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = base[:len(base) - node.level + 1] if node.level else []
            origin = ".".join(parent + ([node.module] if node.module else []))
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of both packages it imports (the longest known prefix of each imported name)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            parts = name.split(".")
            known = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in files), None)
            if known is not None and known != module:
                targets.add(known)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def top_level_clis() -> set[str]:
    """Modules at `llama_surgery_jax`'s top with a `__main__` block."""
    clis = set()
    for path in (ROOT / "llama_surgery_jax").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                clis.add(f"llama_surgery_jax.{path.stem}")
    return clis


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_pallas_kernels_import_nothing_from_llama_surgery_jax():
    edges = [f"{module} → {target}" for module, targets in sorted(import_graph().items())
             if module.startswith("pallas_kernels") for target in sorted(targets)
             if target.startswith("llama_surgery_jax")]
    assert edges == []


def test_no_module_imports_a_command_line():
    clis = top_level_clis()
    assert {"llama_surgery_jax.speed", "llama_surgery_jax.evaluate", "llama_surgery_jax.generate"} <= clis
    edges = [f"{module} → {target}" for module, targets in sorted(import_graph().items()) for target in sorted(targets)
             if target in clis]
    assert edges == []


def folder_graph() -> dict[str, set[str]]:
    """`llama_surgery_jax`'s folders (model, surgery, training, ...) → the other folders their modules import."""
    folder = {module: path.relative_to(ROOT / "llama_surgery_jax").parts[0] for module, path in module_files().items()
              if path.is_relative_to(ROOT / "llama_surgery_jax") and len(path.relative_to(ROOT).parts) > 2}
    graph = {name: set() for name in folder.values()}
    for module, targets in import_graph().items():
        if module in folder:
            graph[folder[module]].update(folder[t] for t in targets if t in folder and folder[t] != folder[module])
    return graph


def test_no_two_folders_import_each_other():
    """Arrows between the package's folders run one way (evaluation → training, never back): no circle of folders."""
    graph = folder_graph()
    assert {"training", "inference", "evaluation"} <= graph.keys()
    assert circles(graph) == []


def top_level_modules() -> set[str]:
    """Every module at `llama_surgery_jax`'s top but its `__init__`."""
    return {f"llama_surgery_jax.{path.stem}" for path in (ROOT / "llama_surgery_jax").glob("*.py")
            if path.stem != "__init__"}


def test_the_package_top_holds_only_command_lines():
    """A helper that two modules share lives in a subpackage (`io/`, `cli/`, ...), never beside the CLIs."""
    assert top_level_modules() - top_level_clis() == set()
    edges = [f"{module} → {target}" for module, targets in sorted(import_graph().items()) for target in sorted(targets)
             if target in top_level_modules()]
    assert edges == []


def test_the_walker_sees_function_level_and_relative_imports():
    """The walker's own precondition: an import inside a function, and a relative import, are edges."""
    tree = ast.parse("def f():\n    from llama_surgery_jax.model import llama\nfrom .schedule import build\n")
    names = imported_names(tree, "pallas_kernels.block_sparse_attention.api", is_package=False)
    assert {"llama_surgery_jax.model.llama", "pallas_kernels.block_sparse_attention.schedule.build"} <= names
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    for module, targets in sorted(import_graph().items()):
        print(f"{module}: {', '.join(sorted(targets)) or '-'}")
