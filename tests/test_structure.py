"""The shape of the code, checked: no import cycle inside fgvr, no function over 80 lines.

Both are read from the source with `ast` (imports inside functions count: an import hidden in a function
body is still a dependency), so the checks cost milliseconds and name the offender.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fgvr

SRC = Path(fgvr.__file__).resolve().parent
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, this: str, modules: dict[str, Path]) -> set[str]:
    """fgvr modules `tree` imports anywhere (function bodies included, `if TYPE_CHECKING:` blocks not)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = this.split(".")
                if not modules[this].name == "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif base in modules:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    if _discovers_submodules(tree):  # a package that lists and imports its own modules depends on each
        prefix = this + "."
        out.update(m for m in modules if m.startswith(prefix) and "." not in m[len(prefix):])
    out.discard(this)
    return out


def _discovers_submodules(tree: ast.AST) -> bool:
    """A package that finds its plug-ins by listing itself (`pkgutil.iter_modules(__path__)`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "iter_modules":
            if any(isinstance(a, ast.Name) and a.id == "__path__" for a in node.args):
                return True
    return False


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, modules)
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "fgvr.knowledge_base.storage" in graph["fgvr.knowledge_base.build"]
    assert "fgvr.knowledge_base" in graph["fgvr.pipeline"]  # imported inside open_system
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_package_that_lists_its_modules_imports_each_of_them():
    graph = import_graph()
    assert "fgvr.models.families.qwen_vl" in graph["fgvr.models.families"]
    assert "fgvr.backends.openai_vlm" in graph["fgvr.backends"]


def test_the_models_floor_never_imports_the_backends():
    graph = import_graph()
    floor = [m for m in graph if m == "fgvr.models" or m.startswith("fgvr.models.")]
    assert {m: sorted(d for d in graph[m] if d.startswith("fgvr.backends")) for m in floor
            if any(d.startswith("fgvr.backends") for d in graph[m])} == {}


def test_no_import_cycle_in_fgvr():
    assert _cycles(import_graph()) == []


def _long_functions() -> list[str]:
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_function_over_80_lines():
    assert _long_functions() == []


TESTS = Path(__file__).resolve().parent


def test_tests_import_only_the_package_and_their_own_fixtures():
    """No test imports another test module or a private name of fgvr; shared fakes live in tests/fakes.py
    (stand-ins) and tests/conftest.py (fixtures)."""
    bad = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("test_")]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("test_"):
                    bad.append(f"{path.name}: from {node.module}")
                elif node.module.startswith("fgvr"):
                    bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []


def _family_name_collections(tree: ast.AST, family_names: set[str]) -> list[tuple[int, list[str]]]:
    """(line, items) of every tuple/list/set literal of strings in `tree` naming at least one model family."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            items = [e.value for e in node.elts]
            if family_names.intersection(items):
                found.append((node.lineno, items))
    return found


def test_the_family_name_check_sees_a_hand_written_list():
    tree = ast.parse('ONNX = ("efficientnet",)\nTEXT = ["clip", "siglip"]\nOK = ("cpu", "cuda")\n')
    assert _family_name_collections(tree, {"clip", "siglip", "efficientnet"}) == [
        (1, ["efficientnet"]), (2, ["clip", "siglip"])]


def test_no_hand_written_list_of_family_names_outside_the_families():
    """A family's traits are declared on its `Family` (text_tower, onnx_export, ...); a list of names kept
    elsewhere goes stale when a family is added (siglip2 was missing from bench's text-tower list)."""
    from fgvr.models import families

    names = set(families.names())
    own = SRC / "models" / "families"
    offenders = [f"{path.relative_to(SRC.parent)}:{line} {items}"
                 for path in sorted(SRC.rglob("*.py")) if own not in path.parents
                 for line, items in _family_name_collections(ast.parse(path.read_text(encoding="utf-8")), names)]
    assert not offenders, "family names listed by hand (declare the trait on Family instead): " + "; ".join(offenders)
