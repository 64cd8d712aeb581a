"""The README, --help and the shell completions stay in step with the commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.shell_completion import ShellComplete

from thumbcli.cli import main

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", main.list_commands(click.Context(main)))
def test_every_command_has_help_and_a_readme_section(name: str) -> None:
    command = main.get_command(click.Context(main), name)
    assert command is not None and command.help and command.help.strip()
    assert f"`thumbcli {name}" in README
    for param in command.params:
        if param.param_type_name == "option":
            assert getattr(param, "help", None), f"{name} {param.opts} has no help"


def test_the_group_help_lists_every_command_those_imported_on_demand_too() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "thumbcli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = [line.split()[0] for line in shown.split("\nCommands:\n", 1)[1].splitlines() if line.strip()]
    assert listed == ["config", "formats", "generate", "prune", "serve", "watch"]
    assert "  serve     Serve the thumbnails in CACHE over HTTP" in shown


def test_readme_quick_start_has_exactly_the_two_commands_and_ci_runs_the_test_one() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick_start.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["sh dev demo", "sh dev test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["sh dev test"]


def test_every_exit_code_is_documented() -> None:
    from thumbcli.errors import ExitCode

    for code in ExitCode:
        assert f"| {code.value} | `{code.name}` |" in README


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shipped_completion_scripts_are_current(shell: str) -> None:
    fresh = subprocess.run(
        [sys.executable, "-c", "from thumbcli.cli import main; main(prog_name='thumbcli')"],
        env={**os.environ, "_THUMBCLI_COMPLETE": f"{shell}_source"},
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert fresh.strip(), "click printed no completion script"
    shipped = (ROOT / "completions" / f"thumbcli.{shell}").read_text()
    assert shipped == fresh, f"completions/thumbcli.{shell} is stale: run `sh dev completions`"


def _complete(args: list[str], incomplete: str) -> list[str]:
    completion = ShellComplete(main, {}, "thumbcli", "_THUMBCLI_COMPLETE")
    return [item.value for item in completion.get_completions(args, incomplete)]


def test_completion_offers_commands_options_and_choices() -> None:
    assert {"generate", "serve", "prune", "config"} <= set(_complete([], ""))
    assert "--follow-symlinks" in _complete(["generate"], "--fol")
    assert _complete(["generate", "--fit"], "") == ["inside", "cover", "smart"]
    assert _complete(["generate", "--format"], "w") == ["webp"]
    assert _complete(["generate", "--freedesktop"], "x") == ["x-large", "xx-large"]


def test_help_does_not_load_libvips() -> None:
    code = "import sys; from thumbcli.cli import main; assert 'pyvips' not in sys.modules, 'pyvips loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_config_example_is_valid(tmp_path: Path) -> None:
    example = README.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "thumbcli.toml"
    config.write_text(example)
    shown = subprocess.run(
        [sys.executable, "-m", "thumbcli", "--config", str(config), "config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "preset small: size=256 fit=cover format(quality)=avif:55,webp:82,jpeg:75 upscale=False" in shown
    assert f"generate.max-time = '25m'  # config {config}" in shown


def test_pyproject_names_its_license_as_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    import tomllib

    # A `license = { text = ... }` table made setuptools print a deprecation warning three times per install.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "MIT"
    [setuptools] = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77"


def test_dev_demo_keeps_installs_quiet_and_ends_with_where_the_thumbnails_are() -> None:
    dev = (ROOT / "dev").read_text(encoding="utf-8")
    demo = dev.split("\ndemo)\n", 1)[1].split(";;", 1)[0]
    installs = [line.strip() for line in dev.splitlines() if "pip" in line and " install " in line]
    assert installs and all(line.startswith("quietly ") for line in installs), installs
    assert "find demo/thumbs" in demo and "| head" not in demo
    assert demo.strip().splitlines()[-1].strip().startswith('echo "next, try:')


def test_readme_map_names_every_module_and_nothing_else() -> None:
    house = README.split("### A map of the house", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split(" | ", 1)[0] for line in house.splitlines() if line.startswith("| `")]
    named = {name for cell in first_cells for name in re.findall(r"`([a-z_/]+)\.py`", cell)}
    package = ROOT / "thumbcli"
    modules = {
        str(path.relative_to(package).with_suffix(""))
        for path in package.rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    }
    assert modules - named == set(), "name these in the README's map of the house"
    assert named - modules == set(), "the README's map names modules that are gone"


def test_readme_starts_cluster_processes_with_the_settings_a_local_cluster_gets() -> None:
    from thumbcli.cluster.client import CLUSTER_SETTINGS

    exported = re.search(r"^export (.+?)\n(?!\s)", README, re.MULTILINE | re.DOTALL)
    assert exported is not None, "the cluster section exports Dask's settings"
    assert dict(item.split("=", 1) for item in exported[1].replace("\\\n", " ").split()) == CLUSTER_SETTINGS


def test_completion_offers_the_configs_presets_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    phone, card = tmp_path / "phone", tmp_path / "card"
    config = tmp_path / "thumbcli.toml"
    config.write_text(
        f'[sources]\nphone = "{phone}"\ncard = "{card}"\n'
        '[presets.small]\nsize = "64"\n[presets.large]\nsize = "512"\n[presets.square]\nsize = "128"\n'
    )
    monkeypatch.setenv("THUMBCLI_CONFIG", str(config))
    assert _complete(["generate", "--preset"], "s") == ["small", "square"]
    assert _complete(["serve", str(tmp_path), "--preset"], "") == ["small", "large", "square"]
    assert _complete(["--config", str(config), "generate", "-p"], "l") == ["large"]
    assert _complete(["generate"], str(tmp_path / "ph"))[0] == str(phone)
