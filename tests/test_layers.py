"""STYLE.md's import rules ("The shape of the house"), checked by walking every module's imports with `ast`.

Function-local imports count like module-level ones, and the rules about pyvips follow imports
transitively, so a library cannot reach a room through a module that imports it lazily.
That a running plain server never maps libvips is checked at run time in test_serve.py.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "thumbcli"
MODULES = sorted(PACKAGE.rglob("*.py"))

#: Third-party modules that only these rooms may import (a room is a module or a package prefix).
OWNERS = {
    "click": {"cli"},
    "pyvips": {"resample"},
    "tqdm": {"progress"},
    "httptools": {"serve.protocol"},
    "sqlite3": {"targets.state"},
    "distributed": {"cluster"},
    "dask": {"cluster"},
    "pillow_heif": {"decoders.heif"},
    "rawpy": {"decoders.raw"},
    "av": {"decoders.video"},
    "pillow_jxl": {"decoders.jxl"},
    "PIL": {"decoders.jxl", "icc"},  # icc: littlecms, for the transform of a profile other than sRGB
    "pyseccomp": {"sandbox"},
    "simplejpeg": {"decoders.jpeg"},
}

#: Each room's floor: a room may import rooms on its own floor or below, never above.
FLOORS = {
    "__init__": 0,
    "errors": 0,
    "spec": 1,
    "icc": 1,
    "config": 2,
    "bucket": 2,
    "objectstores": 1,
    "discover": 2,
    "formats": 2,
    "progress": 2,
    "resample": 2,
    "decodefailure": 2,
    "decoders": 2,
    "wire": 2,
    "unexpected": 2,
    "landlock": 2,
    "sandbox": 2,
    "fsutil": 3,
    "splitwalk": 3,
    "workers": 3,
    "workerspawn": 3,
    "workerloop": 2,
    "workerlog": 2,
    "forbiddencalls": 2,
    "cache": 4,
    "job": 4,
    "targets": 5,
    "make": 6,
    "metrics": 6,
    "run": 7,
    "cluster": 7,
    "serve": 8,
    "watch": 8,
    "cli": 9,
    "__main__": 10,
}

#: The one door through which `serve` may reach libvips: imported inside a function, for `--source` only.
SERVE_GENERATES_THROUGH = "thumbcli.make.ondemand"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return name.removesuffix(".__init__")


def room(module: str) -> str:
    """The room a module lives in: its first component (a module, or a package such as `serve`)."""
    return module.split(".")[0]


def floor(module: str) -> int:
    return FLOORS[room(module)]


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.cache
def imports_of(path: Path) -> dict[str, bool]:
    """Every module `path` imports, mapped to whether the import is at module level."""
    tree = parsed(path)
    top_level = {id(node) for node in tree.body}
    found: dict[str, bool] = {}

    def add(name: str, node: ast.stmt) -> None:
        found[name] = found.get(name, False) or id(node) in top_level

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = module_name(path).split(".")
                package = package[: len(package) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(["thumbcli", *package, node.module])
            add(base, node)
            for alias in node.names:
                add(f"{base}.{alias.name}", node)
    return found


@functools.cache
def is_type_only(path: Path, name: str) -> bool:
    """Whether every import of `name` in `path` sits under `if TYPE_CHECKING:`."""
    tree = parsed(path)
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            guarded.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    uses = [
        node
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and node.module and name.startswith(node.module))
        or (isinstance(node, ast.Import) and any(alias.name == name for alias in node.names))
    ]
    return bool(uses) and all(id(node) in guarded for node in uses)


def package_modules_imported(path: Path) -> set[str]:
    """The package's own modules that `path` imports at run time (type-only imports left out)."""
    known = {module_name(p) for p in MODULES}
    modules = set()
    for name in imports_of(path):
        if not name.startswith("thumbcli."):
            continue
        inner = name.removeprefix("thumbcli.")
        while inner and inner not in known:
            inner = inner.rpartition(".")[0]
        if inner and not is_type_only(path, name):
            modules.add(inner)
    return modules


@functools.cache
def reaches(module: str, library: str, skipping: str = "") -> bool:
    """Whether importing `module` can, through any chain of imports, import `library`."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen or f"thumbcli.{current}" == skipping:
            continue
        seen.add(current)
        path = PACKAGE / (current.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE / current.replace(".", "/") / "__init__.py"
        if any(room(name) == library for name in imports_of(path) if not is_type_only(path, name)):
            return True
        todo.extend(package_modules_imported(path))
    return False


def test_layers_every_module_has_a_floor() -> None:
    rooms = {room(module_name(p)) for p in MODULES}
    assert {"cli", "resample", "make", "discover", "serve", "targets", "run"} <= rooms
    assert rooms <= set(FLOORS), f"give these rooms a floor in FLOORS: {sorted(rooms - set(FLOORS))}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layers_only_the_owner_imports_click_pyvips_tqdm_httptools_sqlite(path: Path) -> None:
    name = module_name(path)
    for library, owners in OWNERS.items():
        uses = any(room(imported) == library for imported in imports_of(path) if not is_type_only(path, imported))
        owned = any(name == owner or name.startswith(owner + ".") for owner in owners)
        if not owned and name != "__main__":
            assert not uses, f"{name} imports {library}; only {', '.join(sorted(owners))} may"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layers_imports_point_down(path: Path) -> None:
    name = module_name(path)
    for imported in package_modules_imported(path):
        assert floor(imported) <= floor(name), f"{name} (floor {floor(name)}) imports {imported} ({floor(imported)})"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layers_nothing_imports_cli(path: Path) -> None:
    if module_name(path) == "__main__":
        return
    assert "cli" not in package_modules_imported(path)


@pytest.mark.parametrize("path", [p for p in MODULES if room(module_name(p)) == "serve"], ids=module_name)
def test_layers_serve_reaches_pyvips_only_through_on_demand_generation(path: Path) -> None:
    name = module_name(path)
    assert not reaches(name, "pyvips", skipping=SERVE_GENERATES_THROUGH), f"{name} can import pyvips"
    doors = imports_of(path)
    for imported, top_level in doors.items():
        if imported.startswith(SERVE_GENERATES_THROUGH) and not is_type_only(path, imported):
            assert not top_level, f"{name} imports {imported} at module level: plain serve would load libvips"


def test_layers_the_rule_above_can_see_a_lazy_pyvips_import() -> None:
    assert reaches("make.ondemand", "pyvips")
    assert not reaches("cache", "pyvips")


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p) not in {"cli", "__main__"}], ids=module_name)
def test_layers_nothing_below_cli_prints_or_reads_argv(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{module_name(path)}:{node.lineno} prints"
        if isinstance(node, ast.Attribute) and node.attr == "argv":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), f"{module_name(path)} reads argv"


def import_graph(*, with_types: bool) -> dict[str, set[str]]:
    """Each of the package's modules -> the package's modules it imports (lazily or, `with_types`, for types too)."""
    known = {module_name(p) for p in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        imported = set()
        for name in imports_of(path):
            if not name.startswith("thumbcli.") or (not with_types and is_type_only(path, name)):
                continue
            inner = name.removeprefix("thumbcli.")
            while inner and inner not in known:
                inner = inner.rpartition(".")[0]
            if inner and inner != module_name(path):
                imported.add(inner)
        graph[module_name(path)] = imported
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: each strongly connected group of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_layers_no_two_modules_import_each_other_even_for_types() -> None:
    assert circles(import_graph(with_types=True)) == []


def test_layers_the_circle_rule_can_see_a_circle() -> None:
    graph = import_graph(with_types=True)
    # A module of the run importing the cluster client, which imports the run back for a type: a circle.
    graph["cluster.client"] = graph["cluster.client"] | {"run"}
    assert ["cluster.client", "run"] in circles(graph)
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layers_no_module_over_600_lines_class_over_400_or_function_over_100(path: Path) -> None:
    # Past these a room asks to be split (STYLE.md): one job a module, one screen a function.
    assert path.read_text().count("\n") <= 600, f"{module_name(path)} is over 600 lines"
    for node in ast.walk(parsed(path)):
        length = (node.end_lineno or node.lineno) - node.lineno + 1 if isinstance(node, ast.stmt) else 0
        if isinstance(node, ast.ClassDef):
            assert length <= 400, f"class {node.name} of {module_name(path)} is {length} lines"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert length <= 100, f"{node.name} of {module_name(path)} is {length} lines"
