"""STYLE.md's import rules, checked by walking each module's imports with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "thumbcli"
MODULES = sorted(PACKAGE.rglob("*.py"))

#: Third-party modules that only one module may import.
OWNERS = {"click": {"cli"}, "pyvips": {"resample"}, "tqdm": {"progress"}}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-local imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                names.add("thumbcli." + node.module)
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_layers_every_package_module_is_checked() -> None:
    assert {"cli", "resample", "pipeline", "discover"} <= {module_name(p) for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layers_only_the_owner_imports_click_pyvips_and_tqdm(path: Path) -> None:
    for library, owners in OWNERS.items():
        uses = any(name == library or name.startswith(library + ".") for name in imported(path))
        if module_name(path) not in owners and module_name(path) != "__main__":
            assert not uses, f"{module_name(path)} imports {library}; only {', '.join(owners)} may"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layers_nothing_imports_cli(path: Path) -> None:
    if module_name(path) == "__main__":
        return
    assert not {"thumbcli.cli", "thumbcli.cli.main"} & imported(path)


def test_layers_serve_never_imports_pyvips() -> None:
    serve = [p for p in MODULES if module_name(p).split(".")[0] == "serve"]
    for path in serve:
        assert not any(name.split(".")[0] == "pyvips" for name in imported(path))


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p) not in {"cli", "__main__"}], ids=module_name)
def test_layers_nothing_below_cli_prints_or_reads_argv(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{module_name(path)}:{node.lineno} prints"
        if isinstance(node, ast.Attribute) and node.attr == "argv":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), f"{module_name(path)} reads argv"
