"""The wheel a clean checkout builds holds every module, and the installed wheel runs (not the editable tree)."""

from __future__ import annotations

import os
import site as site_module
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from imagekit import make_photo

ROOT = Path(__file__).parents[1]


def site_packages() -> list[str]:
    """This interpreter's site-packages folders, where the dependencies are."""
    return site_module.getsitepackages()


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed into), built from a copy of the checkout's project files."""
    work = tmp_path_factory.mktemp("wheel")
    clone = work / "checkout"
    # What a clean clone holds that the build reads: the project files and the package's sources.
    for path in [ROOT / "pyproject.toml", ROOT / "README.md", *(ROOT / "thumbcli").rglob("*.py")]:
        copy = clone / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(clone)],
        check=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("thumbcli-*.whl")
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    return wheel, target


def test_wheel_contains_every_package_module(installed_wheel: tuple[Path, Path]) -> None:
    wheel, _ = installed_wheel
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "thumbcli").rglob("*.py")}
    assert {"thumbcli/serve/worker.py", "thumbcli/targets/state.py"} <= modules
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.endswith(".py")}
    assert modules - packed == set()


def test_installed_wheel_generates_and_imports_the_server(installed_wheel: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed_wheel
    make_photo(tmp_path / "photos" / "a.jpg", 320, 240)
    code = (
        "import sys, thumbcli.serve.supervisor, thumbcli.targets.freedesktop\n"
        "for module in [m for name, m in sys.modules.items() if name.startswith('thumbcli')]:\n"
        "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
        "from thumbcli.cli import main\n"
        "main(['generate', sys.argv[2], '-o', sys.argv[3], '-s', '64', '--quiet'])\n"
    )
    done = subprocess.run(
        # -S: no .pth files, so the editable install's import hook cannot stand in for a missing module.
        [sys.executable, "-S", "-c", code, str(site), str(tmp_path / "photos"), str(tmp_path / "out")],
        env={"PYTHONPATH": os.pathsep.join([str(site), *site_packages()]), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "64" / "a.jpg.jpg").is_file()
