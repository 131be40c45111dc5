"""Imports run one way: the layering of ``docs/`` and ``DESIGN.md`` checked on the source itself.

Every module under ``ckptkit/`` is parsed with ``ast`` (nothing is imported), and every import
in it counts: at module level, inside functions, and under ``TYPE_CHECKING``, since an import
hidden in a function is still a dependency, and only hides a cycle from the interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ckptkit"

LOWER_LAYERS = ("ops", "formats", "native", "pickle", "storage")
UPPER_MODULES = ("ckptkit.api", "ckptkit.safe", "ckptkit.manager", "ckptkit.cli")
FOUNDATION = ("storage", "pickle", "formats", "manifest")
ABOVE_FOUNDATION = ("ops", "native", "integrations", "cli", "api")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(base: str, names: list[str]) -> Iterator[str]:
    """The ckptkit modules one ``from base import names`` statement (or ``import base``) loads.

    ``from ckptkit import nesting`` loads the module ``ckptkit.nesting``; ``from ckptkit.x import f``
    loads ``ckptkit.x``.
    """
    submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
    yield from submodules
    if len(submodules) < len(names) or not names:
        yield base


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_resolve(alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(_resolve(base, [a.name for a in node.names]))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(module: str, area: str) -> bool:
    """``module`` is ``ckptkit.<area>`` or lies below it."""
    full = f"ckptkit.{area}" if not area.startswith("ckptkit.") else area
    return module == full or module.startswith(full + ".")


def _violations(sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        if any(_in(module, s) for s in sources)
        for dep in deps
        if any(_in(dep, t) for t in targets)
    )


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative, so a deep graph cannot exhaust the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_the_graph_sees_every_kind_of_import() -> None:
    # Guards the parser itself: a module-level, a function-level and a submodule-by-name import.
    assert "ckptkit.errors" in GRAPH["ckptkit.storage"]
    assert "ckptkit.storage.fsspec_store" in GRAPH["ckptkit.storage"]  # inside _open_fsspec
    assert "ckptkit.nesting" in GRAPH["ckptkit.manifest"]  # from ckptkit import nesting
    assert GRAPH["ckptkit.errors"] == set()


@pytest.mark.parametrize("area", LOWER_LAYERS)
def test_lower_layers_import_no_facade(area: str) -> None:
    found = _violations((area,), UPPER_MODULES)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("area", FOUNDATION)
def test_foundation_imports_nothing_above_it(area: str) -> None:
    found = _violations((area,), ABOVE_FOUNDATION)
    assert not found, "\n".join(found)


def _cycles(graph: dict[str, set[str]]) -> str:
    return "\n".join(" <-> ".join(c) for c in _strongly_connected(graph) if len(c) > 1)


def test_no_import_cycles_between_modules() -> None:
    assert _cycles(GRAPH) == "", "import cycles, one strongly connected set of modules a line"


def _top(module: str) -> str:
    """``ckptkit.ops`` for ``ckptkit.ops.inspect.model``: the unit of layering."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_packages() -> None:
    # Two modules may avoid each other while their packages still lean on each other
    # (ops.convert_source -> safe -> ops.scan): packages must form layers too.
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        packages.setdefault(_top(module), set()).update(_top(d) for d in deps if _top(d) != _top(module))
    for deps in list(packages.values()):
        for dep in deps:
            packages.setdefault(dep, set())
    assert _cycles(packages) == "", "import cycles, one strongly connected set of packages a line"


def test_the_helpers_moved_down_stay_torch_free() -> None:
    # native/ makes tensors, but which files a native checkpoint has, and the tree.json
    # vocabulary, are asked by torch-free commands (inspect, verify); so is the pickle policy.
    code = (
        "import sys\n"
        "import ckptkit.native.files, ckptkit.native.nodes, ckptkit.pickle.policy, ckptkit.storage\n"
        "from ckptkit.native import files\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
