"""The thumbcli.toml file: named presets, sources, cache root and option defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thumbcli.errors import SpecError
from thumbcli.spec import SizeBox, ThumbSpec

CONFIG_NAME = "thumbcli.toml"
_PRESET_KEYS = {"size", "fit", "format", "quality", "upscale", "keep_metadata"}
_TOP_KEYS = {"cache", "sources", "presets", "generate", "prune", "serve"}


class ConfigError(SpecError):
    """A config file that cannot be used; the message names the file, line and key."""


@dataclass(frozen=True, slots=True)
class Config:
    """A parsed config file (or the empty config when there is none)."""

    path: Path | None = None
    presets: dict[str, ThumbSpec] = field(default_factory=dict)
    #: Per-command option defaults, in click's `default_map` shape.
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def select_presets(self, names: tuple[str, ...]) -> tuple[ThumbSpec, ...]:
        """The presets named (all of them for none); a usage error names any that are not configured."""
        unknown = [name for name in names if name not in self.presets]
        if unknown:
            known = ", ".join(sorted(self.presets)) or "none"
            raise SpecError(f"unknown preset(s) {', '.join(unknown)} (configured: {known})")
        return tuple(self.presets[name] for name in (names or tuple(self.presets)))


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


def line_of(text: str, table: str | None, key: str) -> int | None:
    """The line where `key` is set (inside `[table]` if given), for error messages."""
    inside = table is None
    header = re.compile(r"^\s*\[\s*" + re.escape(table or "") + r"\s*\]\s*$") if table else None
    key_line = re.compile(r"^\s*\"?" + re.escape(key) + r"\"?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if header is not None and line.lstrip().startswith("["):
            inside = bool(header.match(line))
            continue
        if inside and key_line.match(line):
            return number
    return None


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
        line = line_of(text, table, key)
        where = f"{path}:{line}" if line else str(path)
        full_key = f"{table}.{key}" if table else key
        return ConfigError(f"{where}: {full_key}: {message}")

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(None, key, f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")

    presets: dict[str, ThumbSpec] = {}
    raw_presets = data.get("presets", {})
    if not isinstance(raw_presets, dict):
        raise fail(None, "presets", "must be a table of [presets.NAME] tables")
    for name, raw in raw_presets.items():
        table = f"presets.{name}"
        if not isinstance(raw, dict):
            raise fail(None, table, "must be a table")
        for key in raw:
            if key not in _PRESET_KEYS:
                raise fail(table, key, f"unknown preset key (known: {', '.join(sorted(_PRESET_KEYS))})")
        if "size" not in raw:
            raise fail(table, "size", 'every preset needs a size, e.g. size = "256"')
        try:
            presets[name] = ThumbSpec(
                SizeBox.parse(str(raw["size"])),
                fit=raw.get("fit", "inside"),
                format=raw.get("format", "jpeg"),
                quality=raw.get("quality"),
                upscale=bool(raw.get("upscale", False)),
                keep_metadata=bool(raw.get("keep_metadata", False)),
                name=name,
            )
        except SpecError as exc:
            bad_key = next((k for k in ("fit", "format", "quality", "size") if k in raw and k in str(exc)), "size")
            raise fail(table, bad_key, str(exc)) from None

    defaults: dict[str, dict[str, Any]] = {}
    for command in ("generate", "prune", "serve"):
        section = data.get(command, {})
        if not isinstance(section, dict):
            raise fail(None, command, "must be a table")
        defaults[command] = {key.replace("-", "_"): value for key, value in section.items()}
    for key, option in (("cache", "cache_dir"), ("sources", "sources")):
        if key in data:
            value = data[key]
            if key == "sources" and (not isinstance(value, list) or not all(isinstance(item, str) for item in value)):
                raise fail(None, key, "must be a list of paths")
            if key == "cache" and not isinstance(value, str):
                raise fail(None, key, "must be a path")
            defaults["generate"].setdefault(option, value)
            if key == "cache":
                defaults["prune"].setdefault("cache_dir", value)
                defaults["serve"].setdefault("cache_root", value)
    return Config(path=path, presets=presets, defaults=defaults)
