"""thumbcli.toml: presets, option defaults, precedence and error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pyvips
from conftest import make_photo, run_cli

from thumbcli.config import ConfigError, find_config, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_defines_presets_sources_and_cache(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path / "thumbcli.toml",
            'cache = "/c"\nsources = ["/a", "/b"]\n[presets.small]\nsize = "256"\nfit = "cover"\n'
            'format = "webp"\nquality = 70\n[generate]\nmax-time = "15m"\n',
        )
    )
    small = config.presets["small"]
    assert (small.box.label, small.fit, small.format, small.quality, small.name) == (
        "256",
        "cover",
        "webp",
        70,
        "small",
    )
    assert config.defaults["generate"] == {"max_time": "15m", "cache_dir": "/c", "sources": ["/a", "/b"]}
    assert config.defaults["serve"]["cache_root"] == "/c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[presets.small]\nsize = "256"\nfit = "sideways"\n', ":3: presets.small.fit: invalid fit"),
        ('[presets.small]\nsize = "256"\ncolour = "red"\n', ":3: presets.small.colour: unknown preset key"),
        ('[presets.small]\nfit = "cover"\n', "presets.small.size: every preset needs a size"),
        ('[presets.small]\nsize = "huge"\n', ":2: presets.small.size: invalid size"),
        ("\n\nbogus = 1\n", ":3: bogus: unknown key"),
        ("cache = 3\n", ":1: cache: must be a path"),
        ("[presets.small\nsize = 1\n", "line 1"),
    ],
)
def test_config_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


def test_unknown_option_in_a_command_table_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path / "thumbcli.toml", "[generate]\nworkers = 2\nwrokers = 3\n")
    run = run_cli("--config", path, "config")
    assert run.rc == 2
    assert f"{path}:3: generate.wrokers: not an option" in run.stderr


def test_config_file_is_found_in_the_current_folder_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert find_config(None) is None
    xdg = write((tmp_path / "xdg" / "thumbcli").mkdir(parents=True) or tmp_path / "xdg/thumbcli/thumbcli.toml", "")
    assert find_config(None) == xdg
    local = write(tmp_path / "thumbcli.toml", "")
    assert find_config(None) == Path("thumbcli.toml") and local.exists()
    assert find_config("/explicit.toml") == Path("/explicit.toml")


def test_command_line_beats_environment_beats_config(tmp_path: Path) -> None:
    path = write(tmp_path / "thumbcli.toml", "[generate]\nquality = 60\nloaders = 3\n")
    env = {**os.environ, "THUMBCLI_CONFIG": str(path), "THUMBCLI_GENERATE_QUALITY": "70"}
    shown = subprocess.run(
        [sys.executable, "-m", "thumbcli", "config"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert f"# config file: {path}" in shown
    assert "generate.quality = '70'  # environment THUMBCLI_GENERATE_QUALITY" in shown
    assert f"generate.loaders = 3  # config {path}" in shown
    assert "generate.writers = 1  # default" in shown

    source = tmp_path / "src"
    make_photo(source / "a.jpg", 400, 300)
    out = tmp_path / "out"
    for extra, expected_q in (([], 70), (["-q", "20"], 20)):
        subprocess.run(
            [sys.executable, "-m", "thumbcli", "generate", str(source), "-o", str(out), "--force", *extra],
            env=env,
            check=True,
        )
        small = (out / "256" / "a.jpg.jpg").stat().st_size
        reference = pyvips.Image.thumbnail(str(source / "a.jpg"), 256).jpegsave_buffer(
            Q=expected_q, keep="none", optimize_coding=True
        )
        assert abs(small - len(reference)) < len(reference) * 0.05


def test_presets_from_the_config_are_made_into_the_cache(tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_photo(source / "a.jpg", 400, 300)
    cache = tmp_path / "cache"
    path = write(
        tmp_path / "thumbcli.toml",
        f'cache = "{cache}"\nsources = ["{source}"]\n'
        '[presets.small]\nsize = "64"\nfit = "cover"\nformat = "png"\n[presets.wide]\nsize = "200x"\n',
    )
    run = run_cli("--config", path, "generate", "--json")
    assert run.rc == 0, run.stderr
    assert (cache / "v1" / "small" / "a.jpg.png").is_file()
    assert (cache / "v1" / "wide" / "a.jpg.jpg").is_file()
    only = run_cli("--config", path, "generate", "--preset", "small", "--force", "--json")
    assert only.summary["thumbnails"] == 1
    unknown = run_cli("--config", path, "generate", "--preset", "nope")
    assert unknown.rc == 2 and "unknown preset(s) nope" in unknown.stderr


def test_config_names_options_by_their_long_names(tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_photo(source / "a.jpg", 400, 300)
    path = write(
        tmp_path / "thumbcli.toml",
        f'cache = "{tmp_path / "cache"}"\n'
        '[generate]\nformat = "png"\nsize = ["32", "48"]\nmax-time = "15m"\njson = true\n',
    )
    shown = run_cli("--config", path, "config").stdout
    assert f"generate.format = 'png'  # config {path}" in shown
    assert f"generate.max-time = '15m'  # config {path}" in shown
    # A destination on the command line wins over the config's cache.
    run = run_cli("--config", path, "generate", source, "-o", tmp_path / "out")
    assert run.rc == 0, run.stderr
    assert run.summary["thumbnails"] == 2
    assert (tmp_path / "out" / "32" / "a.jpg.png").is_file() and (tmp_path / "out" / "48" / "a.jpg.png").is_file()
    assert not (tmp_path / "cache").exists()
