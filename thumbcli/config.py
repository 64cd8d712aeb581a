"""The thumbcli.toml file: named presets, sources, cache root and option defaults."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from thumbcli.errors import SpecError
from thumbcli.spec import DEFAULT_QUALITY, FITS, FORMATS, Format, SizeBox, ThumbSpec

CONFIG_NAME = "thumbcli.toml"
#: Each preset key: the TOML types it takes and how the error names them.
_PRESET_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "size": ((str, int), 'a box such as "256" or "320x240"'),
    "fit": ((str,), f"one of {', '.join(FITS)}"),
    "format": ((str, list), f"one of {', '.join(FORMATS)}, or an array of them (preferred first, fallback last)"),
    "quality": ((int, dict), "an integer from 1 to 100 or a table by format"),
    "upscale": ((bool,), "true or false"),
    "keep-metadata": ((bool,), "true or false"),
}
#: Other names people give a format, and the format they mean.
_FORMAT_ALIASES: dict[str, Format] = {"jpg": "jpeg"}
_TOP_KEYS = {"cache", "sources", "presets", "quality", "generate", "prune", "serve", "watch"}


class ConfigError(SpecError):
    """A config file that cannot be used; the message names the file, line and key."""


@dataclass(frozen=True, slots=True)
class Config:
    """A parsed config file (or the empty config when there is none)."""

    path: Path | None = None
    presets: dict[str, ThumbSpec] = field(default_factory=dict)
    #: Named sources from a `[sources]` table, name -> path; empty for `sources = [...]` or none.
    sources: dict[str, str] = field(default_factory=dict)
    #: Per-command option defaults, in click's `default_map` shape.
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Presets made in several formats (`format = ["avif", "webp", "jpeg"]`): name -> formats,
    #: preferred first. Such a preset's spec in `presets` is its fallback format's, the last.
    formats: dict[str, tuple[Format, ...]] = field(default_factory=dict)
    #: Each format's quality from the top-level `[quality]` table, for every preset and size that sets none.
    qualities: dict[Format, int] = field(default_factory=dict)
    #: Each preset's qualities by format (`_preset_qualities`); a format it lacks takes the built-in default.
    preset_qualities: dict[str, dict[Format, int]] = field(default_factory=dict)

    def quality_for(self, fmt: Format) -> int | None:
        """The configured quality of `fmt` outside any preset, None for the built-in default."""
        return self.qualities.get(fmt)

    def select_presets(self, names: tuple[str, ...]) -> tuple[ThumbSpec, ...]:
        """The presets named (all of them for none); a usage error names any that are not configured."""
        unknown = [name for name in names if name not in self.presets]
        if unknown:
            known = ", ".join(sorted(self.presets)) or "none"
            raise SpecError(f"unknown preset(s) {', '.join(unknown)} (configured: {known})")
        return tuple(self.presets[name] for name in (names or tuple(self.presets)))

    def specs_to_make(self, names: tuple[str, ...]) -> tuple[ThumbSpec, ...]:
        """Like `select_presets`, with one spec per (preset, format) for presets made in several formats."""
        specs: list[ThumbSpec] = []
        for spec in self.select_presets(names):
            formats = self.formats.get(spec.name, (spec.format,))
            qualities = self.preset_qualities.get(spec.name, {})
            for fmt in formats:
                quality = qualities.get(fmt)
                specs.append(spec if fmt == spec.format else dataclasses.replace(spec, format=fmt, quality=quality))
        return tuple(specs)


def find_config(explicit: str | None) -> Path | None:
    """The config file to read: --config / $THUMBCLI_CONFIG, ./thumbcli.toml, then the XDG config folder."""
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for candidate in (Path(CONFIG_NAME), Path(xdg) / "thumbcli" / CONFIG_NAME):
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # an unreadable home folder is the same as no config there
            continue
    return None


def describe_value(value: object) -> str:
    """A TOML value as an error message shows it: `"75" (a string)`."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "an array"))
    kind = next((name for cls, name in kinds if isinstance(value, cls)), "a table" if isinstance(value, dict) else "")
    shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
    return f"{shown} ({kind})" if kind else shown


def type_mismatch(expected: str, value: object) -> str:
    """The message for a value of the wrong type: `expected an integer, got "75" (a string)`."""
    return f"expected {expected}, got {describe_value(value)}"


def has_type(value: object, types: tuple[type, ...]) -> bool:
    """Whether a TOML value is one of `types` (a boolean is not an integer here, whatever Python says)."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def line_of(text: str, table: str | None, key: str) -> int | None:
    """The line where `key` is set (inside `[table]` if given) or, at the top, its table starts; for error messages."""
    inside = table is None
    header = re.compile(r"^\s*\[\s*" + re.escape(table or "") + r"\s*\]\s*$") if table else None
    key_line = re.compile(r"^\s*\"?" + re.escape(key) + r"\"?\s*=")
    # A misspelled section, [genrate] or [preset.small], is a top-level key too.
    table_line = re.compile(r"^\s*\[\[?\s*\"?" + re.escape(key) + r"\"?\s*[.\]]") if table is None else None
    for number, line in enumerate(text.splitlines(), start=1):
        if table_line is not None and table_line.match(line):
            return number
        if header is not None and line.lstrip().startswith("["):
            inside = bool(header.match(line))
            continue
        if inside and key_line.match(line):
            return number
    return None


def located_error(path: Path, text: str, table: str | None, key: str, message: str) -> ConfigError:
    """An error naming the file, the line where `key` is set (if found) and the key: `file:line: table.key: …`."""
    line = line_of(text, table, key)
    where = f"{path}:{line}" if line else str(path)
    full_key = f"{table}.{key}" if table else key
    return ConfigError(f"{where}: {full_key}: {message}")


def load_config(path: Path) -> Config:
    """Parse and validate a config file."""
    import tomllib  # here: compiling its regular expressions costs a run without a config 6 ms

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None

    def fail(table: str | None, key: str, message: str) -> ConfigError:
        return located_error(path, text, table, key, message)

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(None, key, f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    raw_presets = data.get("presets", {})
    if not isinstance(raw_presets, dict):
        raise fail(None, "presets", "must be a table of [presets.NAME] tables")
    qualities = _qualities(data.get("quality", {}), None, "quality", fail)
    preset_qualities = {
        name: _preset_qualities(name, raw, qualities, fail)
        for name, raw in raw_presets.items()
        if isinstance(raw, dict)
    }
    presets = {name: _preset(name, raw, fail, preset_qualities.get(name, {})) for name, raw in raw_presets.items()}
    sources = data.get("sources", [])
    named = _named_sources(sources, fail) if isinstance(sources, dict) else {}
    listed = {name: raw for name, raw in raw_presets.items() if isinstance(raw.get("format"), list)}
    formats = {name: _formats(name, raw, fail) for name, raw in listed.items()}
    return Config(
        path=path,
        presets=presets,
        sources=named,
        defaults=_option_defaults(data, fail),
        formats=formats,
        qualities=qualities,
        preset_qualities=preset_qualities,
    )


_Fail = Callable[[str | None, str, str], ConfigError]


def _qualities(raw: object, table: str | None, key: str, fail: _Fail) -> dict[Format, int]:
    """A table of qualities by format (`[quality]`, or a preset's `quality = {avif = 56, webp = 78}`)."""
    if not isinstance(raw, dict):
        raise fail(table, key, type_mismatch("a table of qualities by format, e.g. { avif = 56, webp = 78 }", raw))
    qualities: dict[Format, int] = {}
    for name, value in raw.items():
        fmt = _FORMAT_ALIASES.get(name, name)
        where_table, where_key = (table, key) if table is not None else ("quality", name)
        if fmt not in FORMATS:
            raise fail(where_table, where_key, f"unknown format {name!r} (known: {', '.join(FORMATS)})")
        if not has_type(value, (int,)) or not 1 <= value <= 100:
            raise fail(where_table, where_key, type_mismatch(f"a quality for {fmt} from 1 to 100", value))
        qualities[fmt] = value
    return qualities


def _preset_qualities(name: str, raw: dict[str, Any], qualities: dict[Format, int], fail: _Fail) -> dict[Format, int]:
    """A preset's quality by format: its table's, else `[quality]`'s, else the default; see `_stepped`."""
    value = raw.get("quality", {})
    if isinstance(value, dict):
        return {**qualities, **_qualities(value, f"presets.{name}", "quality", fail)}
    if not has_type(value, (int,)) or not 1 <= value <= 100:
        return qualities  # `_preset` says what is wrong with it
    listed = raw.get("format", "jpeg")
    names = listed if isinstance(listed, list) and listed else [listed]
    formats = [_FORMAT_ALIASES.get(item, item) for item in names if isinstance(item, str)]
    known = [fmt for fmt in formats if fmt in FORMATS]
    return _stepped(value, known, qualities) if known and len(known) == len(names) else qualities


def _stepped(quality: int, formats: list[Format], qualities: dict[Format, int]) -> dict[Format, int]:
    """A plain `quality` for a list of formats: the fallback's (the last), the others moved by the same step.

    Each format's own quality (`[quality]`, else the default) stands for the same perceived
    quality (README "Quality by format"), so `quality = 75` beside a JPEG default of 80 is WebP 77
    and AVIF 55: each as good as the JPEG, in fewer bytes, as one number for all made AVIF bigger.
    """
    fallback = formats[-1]
    step = quality - qualities.get(fallback, DEFAULT_QUALITY[fallback])
    stepped = dict(qualities)
    for fmt in formats[:-1]:
        if fmt != "png":  # lossless: nothing to step
            stepped[fmt] = min(100, max(1, qualities.get(fmt, DEFAULT_QUALITY[fmt]) + step))
    stepped[fallback] = quality
    return stepped


def _preset(name: str, raw: object, fail: _Fail, qualities: dict[Format, int]) -> ThumbSpec:
    table = f"presets.{name}"
    if not isinstance(raw, dict):
        raise fail(None, table, "must be a table")
    for key, value in raw.items():
        # Keys are spelt with dashes everywhere in the file (`keep-metadata`, as `max-time`); underscores work too.
        known = key.replace("_", "-")
        if known not in _PRESET_TYPES:
            raise fail(table, key, f"unknown preset key (known: {', '.join(sorted(_PRESET_TYPES))})")
        types, expected = _PRESET_TYPES[known]
        if not has_type(value, types):
            raise fail(table, key, type_mismatch(expected, value))
    raw = {key.replace("_", "-"): value for key, value in raw.items()}
    if isinstance(raw.get("format"), str):
        raw["format"] = _FORMAT_ALIASES.get(raw["format"], raw["format"])
    if "size" not in raw:
        raise fail(table, "size", 'every preset needs a size, e.g. size = "256"')
    fmt = raw.get("format", "jpeg")
    if isinstance(fmt, list):
        fmt = _formats(name, raw, fail)[-1]
    try:
        return ThumbSpec(
            SizeBox.parse(str(raw["size"])),
            fit=raw.get("fit", "inside"),
            format=fmt,
            quality=qualities.get(fmt),
            upscale=raw.get("upscale", False),
            keep_metadata=raw.get("keep-metadata", False),
            name=name,
        )
    except SpecError as exc:
        bad_key = next((k for k in ("fit", "format", "quality", "size") if k in raw and k in str(exc)), "size")
        raise fail(table, bad_key, str(exc)) from None


def _named_sources(table: dict[str, Any], fail: _Fail) -> dict[str, str]:
    """A `[sources]` table, name -> path: each name becomes a URL segment and a cache folder, so it must be one."""
    seen: dict[str, str] = {}
    for name, value in table.items():
        if not isinstance(value, str):
            raise fail("sources", name, "must be a path: " + type_mismatch("a string", value))
        if not name or "/" in name or "\\" in name or "\x00" in name:
            raise fail("sources", name, "a source name is one folder name: no '/', '\\' or NUL, not empty")
        if name.startswith("."):
            raise fail("sources", name, "a source name cannot start with '.' (hidden names are never served)")
        if not value:
            raise fail("sources", name, "the path cannot be empty")
        absolute = os.path.abspath(value)
        if absolute in seen:
            raise fail("sources", name, f"names the same folder as sources.{seen[absolute]}")
        seen[absolute] = name
    return dict(table)


def _formats(name: str, raw: dict[str, Any], fail: _Fail) -> tuple[Format, ...]:
    """A preset's list of formats: known, distinct, at least one."""
    listed = [_FORMAT_ALIASES.get(item, item) if isinstance(item, str) else item for item in raw["format"]]
    if not listed or not all(item in FORMATS for item in listed) or len(set(listed)) != len(listed):
        expected = f"an array of distinct formats from {', '.join(FORMATS)}"
        raise fail(f"presets.{name}", "format", type_mismatch(expected, listed))
    return tuple(cast(list[Format], listed))


def _option_defaults(data: dict[str, Any], fail: _Fail) -> dict[str, dict[str, Any]]:
    """The [generate], [prune], [serve] and [watch] tables, with `cache` and `sources` as their options' defaults."""
    defaults: dict[str, dict[str, Any]] = {}
    for command in ("generate", "prune", "serve", "watch"):
        section = data.get(command, {})
        if not isinstance(section, dict):
            raise fail(None, command, "must be a table")
        defaults[command] = {key.replace("-", "_"): value for key, value in section.items()}
    for key, option in (("cache", "cache_dir"), ("sources", "sources")):
        if key in data:
            value = data[key]
            if key == "sources" and isinstance(value, dict):
                value = list(value.values())
            elif key == "sources" and (not isinstance(value, list) or not all(isinstance(i, str) for i in value)):
                expected = type_mismatch("an array of strings", value)
                raise fail(None, key, f"must be a list of paths or a [sources] table: {expected}")
            if key == "cache" and not isinstance(value, str):
                raise fail(None, key, "must be a path: " + type_mismatch("a string", value))
            defaults["generate"].setdefault(option, value)
            defaults["watch"].setdefault(option, value)
            if key == "cache":
                defaults["prune"].setdefault("cache_dir", value)
                defaults["serve"].setdefault("cache_root", value)
    return defaults
