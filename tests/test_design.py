"""Rules of the design that a reader relies on: no import cycle, no private name borrowed across modules,
no function too long to read in one screen. Each rule is checked on the code and, as a negative control, on
a tiny synthetic package that breaks it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prep", "shared", "train")
MAX_BODY_LINES = 80


@functools.cache
def _parse(source: str) -> ast.Module:
    """Parsed once per source text: the rules below walk the same files (a rewritten file is parsed anew)."""
    return ast.parse(source)


@functools.cache
def _import_nodes(tree: ast.Module) -> tuple[ast.Import | ast.ImportFrom, ...]:
    """Every import statement of ``tree``, lazy ones too, in ``ast.walk`` order (one walk per tree)."""
    return tuple(node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom))


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[ast.Module, str]]:
    """Dotted module name -> (its parsed source, the package it is in), for every module of ``packages``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_init = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_init else parts)
            found[name] = (_parse(path.read_text(encoding="utf-8")), ".".join(parts[:-1]))
    return found


def _imports(tree: ast.Module, package: str, known: set[str]) -> list[tuple[str, str]]:
    """``(module, imported name or "")`` for every import in ``tree`` (lazy ones too) of a module in ``known``.

    ``package``: the package the importing module is in, for relative imports.
    """
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in known:  # `from prep import pipeline` imports a module
                    found.append((child, ""))
                elif base in known:
                    found.append((base, alias.name))
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports."""
    modules = _modules(root, packages)
    known = set(modules)
    return {
        name: {m for m, _ in _imports(tree, package, known) if m != name}
        for name, (tree, package) in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def private_imports(root: Path, packages: tuple[str, ...]) -> list[str]:
    """``"importer imports module._name"`` for every private name imported from another module."""
    modules = _modules(root, packages)
    known = set(modules)
    return [
        f"{name} imports {module}.{imported}"
        for name, (tree, package) in modules.items()
        for module, imported in _imports(tree, package, known)
        if imported.startswith("_") and not imported.startswith("__") and module != name
    ]


def long_functions(root: Path, package: str, limit: int = MAX_BODY_LINES) -> list[str]:
    """``"path:line name (N lines)"`` of every function whose body, without its docstring, exceeds ``limit``."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(_parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            if body and (lines := body[-1].end_lineno - body[0].lineno + 1) > limit:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_no_import_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert {"prep.cli", "shared.contract", "train.loop"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    """Negative control: a cycle closed by an import inside a function, and a relative one, are found."""
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import g\n",
            "pkg/b.py": "def g():\n    from pkg import c\n",
            "pkg/c.py": "from . import a\n",
            "pkg/d.py": "import pkg.a\n",
        },
    )
    cycle = find_cycle(import_graph(root, ("pkg",)))
    assert cycle == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (root / "pkg/c.py").write_text("import pkg\n")
    assert find_cycle(import_graph(root, ("pkg",))) is None


def test_no_private_name_imported_from_another_module():
    assert private_imports(ROOT, PACKAGES) == []


def test_the_private_import_check_finds_one(tmp_path):
    """Negative control: `from pkg.a import _helper` is reported; a public name and a dunder are not."""
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def _helper(): ...\ndef helper(): ...\n",
            "pkg/b.py": "from pkg.a import _helper, helper\nfrom pkg import __name__ as n\n",
        },
    )
    assert private_imports(root, ("pkg",)) == ["pkg.b imports pkg.a._helper"]


@pytest.mark.parametrize(
    "package",
    ["prep", "shared", "train", "benchmarks"],
)
def test_no_function_body_over_80_lines(package):
    assert long_functions(ROOT, package) == []


def test_the_length_check_finds_a_long_function(tmp_path):
    """Negative control: 81 statements are too many, 80 are not; the docstring does not count."""
    doc = '    """A docstring\n    over two lines."""\n'
    root = _write(
        tmp_path,
        {
            "pkg/long.py": "def f():\n" + doc + "    x = 0\n" * 81,
            "pkg/ok.py": "def g():\n" + doc + "    x = 0\n" * 80,
        },
    )
    assert long_functions(root, "pkg") == ["pkg/long.py:1 f (81 lines)"]
