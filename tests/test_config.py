"""thumbcli.toml: presets, option defaults, precedence and error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import pyvips
from imagekit import CORPUS, make_photo, needs_corpus, run_cli

from thumbcli.config import ConfigError, find_config, load_config
from thumbcli.spec import DEFAULT_QUALITY


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


def config_keys() -> list[tuple[str, str, bool]]:
    """Every option a command table may set: (command, key as the file spells it, is a flag)."""
    from thumbcli.cli import main

    keys = []
    for command_name in ("generate", "prune", "serve", "watch"):
        command = main.get_command(click.Context(main), command_name)
        assert command is not None
        for param in command.params:
            long_names = [opt[2:] for opt in param.opts if opt.startswith("--")]
            is_flag = isinstance(param, click.Option) and param.is_flag
            keys.append((command_name, long_names[0] if long_names else str(param.name), is_flag))
    return keys


@pytest.mark.parametrize(("command_name", "key", "is_flag"), config_keys(), ids=lambda v: str(v))
def test_config_refuses_a_wrong_typed_value_for_every_option(
    tmp_path: Path, command_name: str, key: str, is_flag: bool
) -> None:
    from thumbcli.cli import config_default_map, main

    wrong = '"yes"' if is_flag else "true"
    path = write(tmp_path / "thumbcli.toml", f"# wrong types\n[{command_name}]\n{key} = {wrong}\n")
    with pytest.raises(ConfigError) as caught:
        config_default_map(load_config(path), main)
    assert str(caught.value).startswith(f"{path}:3: {command_name}.{key}: expected ")
    assert str(caught.value).endswith(f", got {wrong} ({'a string' if is_flag else 'a boolean'})")


@pytest.mark.parametrize(
    ("key", "wrong", "expected"),
    [
        ("size", "true", 'expected a box such as "256" or "320x240", got true (a boolean)'),
        ("fit", "3", "expected one of inside, cover, smart, got 3 (an integer)"),
        (
            "format",
            "3",
            "expected one of jpeg, webp, avif, png, or an array of them (preferred first, fallback last),"
            " got 3 (an integer)",
        ),
        (
            "quality",
            '"75"',
            'expected an integer from 1 to 100 or a table by format, got "75" (a string)',
        ),
        ("upscale", '"false"', 'expected true or false, got "false" (a string)'),
        ("keep_metadata", "1", "expected true or false, got 1 (an integer)"),
    ],
)
def test_config_refuses_a_wrong_typed_value_for_every_preset_key(
    tmp_path: Path, key: str, wrong: str, expected: str
) -> None:
    size = "" if key == "size" else 'size = "64"\n'
    path = write(tmp_path / "thumbcli.toml", f"[presets.small]\n{size}{key} = {wrong}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    line = 2 if key == "size" else 3
    assert str(caught.value) == f"{path}:{line}: presets.small.{key}: {expected}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[presets.small]\nsize = "64"\nquality = "75"\n',
            ':3: presets.small.quality: expected an integer from 1 to 100 or a table by format, got "75"',
        ),
        (
            '[presets.small]\nsize = "64"\nupscale = "false"\n',
            ':3: presets.small.upscale: expected true or false, got "false"',
        ),
        ('[generate]\nupscale = "false"\n', ':2: generate.upscale: expected true or false, got "false"'),
        ("[generate]\nquality = 500\n", ":2: generate.quality: expected an integer: 500 is not in the range"),
    ],
)
def test_a_wrong_typed_config_value_is_a_usage_error_not_a_traceback(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "thumbcli.toml", text)
    make_photo(tmp_path / "src" / "a.jpg", 80, 60)
    run = run_cli("--config", path, "generate", tmp_path / "src", "-o", tmp_path / "out")
    assert run.rc == 2 and "Traceback" not in run.stderr
    assert f"{path}{expected}" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_misspelled_section_name_gets_its_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "thumbcli.toml", 'cache = "/c"\n\n[genrate]\nworkers = 2\n[preset.small]\nsize = "64"\n')
    with pytest.raises(ConfigError, match=r":3: genrate: unknown key"):
        load_config(path)
    path.write_text('[preset.small]\nsize = "64"\n')
    with pytest.raises(ConfigError, match=r":1: preset: unknown key"):
        load_config(path)


def test_a_size_never_adds_a_preset_to_the_configured_cache_without_an_explicit_destination(tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_photo(source / "a.jpg", 400, 300)
    cache = tmp_path / "cache"
    path = write(tmp_path / "thumbcli.toml", f'cache = "{cache}"\n[presets.small]\nsize = "128"\n')
    forgot_output = run_cli("--config", path, "generate", source, "-s", "64")
    assert forgot_output.rc == 2, forgot_output.stderr
    assert f"size 64 would add a preset to the configured cache {cache}: name an output tree" in forgot_output.stderr
    assert "(--size, -o, --cache, --preset)" in forgot_output.stderr
    assert "the cache itself to add it to the cache on purpose" in forgot_output.stderr
    assert not (cache / "v1" / "64").exists()
    assert run_cli("--config", path, "generate", source, "-s", "64", "-o", tmp_path / "out").rc == 0
    assert (tmp_path / "out" / "64" / "a.jpg.jpg").is_file() and not (cache / "v1" / "64").exists()
    assert run_cli("--config", path, "generate", source, "-s", "64", "--cache", cache).rc == 0
    assert (cache / "v1" / "64" / "a.jpg.jpg").is_file()


def test_config_spells_keys_with_dashes_takes_underscores_too_and_jpg_for_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "thumbcli.toml"
    path.write_text(
        '[presets.a]\nsize = "64"\nformat = "jpg"\nkeep-metadata = true\n'
        '[presets.b]\nsize = "64"\nformat = ["webp", "jpg"]\nkeep_metadata = true\n'
    )
    config = load_config(path)
    assert (config.presets["a"].format, config.presets["a"].keep_metadata) == ("jpeg", True)
    assert [spec.format for spec in config.specs_to_make(("b",))] == ["webp", "jpeg"]
    assert config.presets["b"].keep_metadata
    shown = run_cli("--config", path, "config")
    assert (
        "preset b: size=64 fit=inside format(quality)=webp:82,jpeg:80 upscale=False keep-metadata=True" in shown.stdout
    )


def test_quality_is_per_format_from_a_preset_table_the_quality_table_or_the_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "thumbcli.toml",
        "[quality]\navif = 60\njpg = 85\n"
        '[presets.listed]\nsize = "64"\nformat = ["avif", "webp", "jpeg"]\nquality = { webp = 70 }\n'
        '[presets.plain]\nsize = "64"\nformat = "avif"\n'
        '[presets.fallback]\nsize = "64"\nformat = ["avif", "webp", "jpeg"]\nquality = 75\n'
        '[presets.single]\nsize = "64"\nformat = "webp"\nquality = 75\n',
    )
    config = load_config(path)

    def made(name: str) -> list[tuple[str, int]]:
        return [(spec.format, spec.effective_quality) for spec in config.specs_to_make((name,))]

    defaults = DEFAULT_QUALITY
    assert made("listed") == [("avif", 60), ("webp", 70), ("jpeg", 85)]
    assert made("plain") == [("avif", 60)]
    # A plain integer is the fallback's; the others move by the same step from their own (85 -> 75: -10).
    assert made("fallback") == [("avif", 50), ("webp", defaults["webp"] - 10), ("jpeg", 75)]
    assert made("single") == [("webp", 75)]
    shown = run_cli("--config", path, "config").stdout
    assert "quality by format: avif:60, jpeg:85" in shown
    assert "preset listed: size=64 fit=inside format(quality)=avif:60,webp:70,jpeg:85 " in shown
    assert f"preset fallback: size=64 fit=inside format(quality)=avif:50,webp:{defaults['webp'] - 10},jpeg:75 " in shown


def test_quality_table_applies_to_sizes_given_on_the_command_line(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    make_photo(source / "a.jpg", 400, 300)
    path = write(tmp_path / "thumbcli.toml", "[quality]\nwebp = 40\n")
    out = tmp_path / "out"
    assert run_cli("--config", path, "generate", source, "-o", out, "-s", "128", "--format", "webp").rc == 0
    low = (out / "128" / "a.jpg.webp").stat().st_size
    assert run_cli("generate", source, "-o", tmp_path / "out2", "-s", "128", "--format", "webp").rc == 0
    assert low < (tmp_path / "out2" / "128" / "a.jpg.webp").stat().st_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[quality]\ngif = 50\n", ":2: quality.gif: unknown format 'gif' (known: jpeg, webp, avif, png)"),
        ("[quality]\navif = 0\n", ":2: quality.avif: expected a quality for avif from 1 to 100, got 0 (an integer)"),
        ('[quality]\nwebp = "70"\n', ':2: quality.webp: expected a quality for webp from 1 to 100, got "70"'),
        ("quality = 70\n", ":1: quality: expected a table of qualities by format, e.g. { avif = 56, webp = 78 }"),
        (
            '[presets.a]\nsize = "64"\nquality = { avif = 101 }\n',
            ":3: presets.a.quality: expected a quality for avif from 1 to 100, got 101 (an integer)",
        ),
        (
            '[presets.a]\nsize = "64"\nquality = { tiff = 80 }\n',
            ":3: presets.a.quality: unknown format 'tiff' (known: jpeg, webp, avif, png)",
        ),
    ],
)
def test_a_wrong_quality_table_is_a_usage_error_naming_its_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "thumbcli.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}{expected}")
    result = run_cli("--config", path, "config")
    assert result.rc == 2 and expected in result.stderr


@needs_corpus
def test_a_format_list_with_one_quality_makes_each_format_smaller_than_its_fallback(tmp_path: Path) -> None:
    """The README's `quality = 75` with a format list: AVIF and WebP keep their own defaults, below JPEG's bytes."""
    source = tmp_path / "src"
    source.mkdir()
    photos = sorted((CORPUS / "orientation").glob("Landscape_*.jpg"))[:4]
    assert photos
    for photo in photos:
        (source / photo.name).write_bytes(photo.read_bytes())
    path = write(
        tmp_path / "thumbcli.toml",
        f'cache = "{tmp_path / "cache"}"\n[presets.small]\nsize = "256"\n'
        'format = ["avif", "webp", "jpeg"]\nquality = 75\n',
    )
    assert run_cli("--config", path, "generate", source).rc == 0
    folder = tmp_path / "cache" / "v1" / "small"
    total = {
        suffix: sum(file.stat().st_size for file in folder.glob(f"*.{suffix}")) for suffix in ("avif", "webp", "jpg")
    }
    assert len(list(folder.glob("*.jpg.jpg"))) == len(photos)
    assert total["avif"] < total["jpg"] and total["webp"] < total["jpg"], total
