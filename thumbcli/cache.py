"""The served cache layout: pure functions from source or URL to cache path, and the manifest's schema."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from thumbcli.errors import CannotRunError
from thumbcli.fsutil import write_atomically
from thumbcli.spec import CONTENT_TYPE_BY_FORMAT, FORMATS, SUFFIX_BY_FORMAT, Format, ThumbSpec

#: Version of the on-disk layout; thumbnails live under `v<LAYOUT_VERSION>/`.
LAYOUT_VERSION = 1
LAYOUT_DIR = f"v{LAYOUT_VERSION}"
MANIFEST_NAME = "thumbcli-cache.json"
#: Thumbcli's private files (state database, lock) live here, never served.
PRIVATE_DIR = ".thumbcli"
#: The extended attribute a thumbnail carries its source's capture time in (decimal seconds since
#: 1970, as the camera's clock read), for a gallery's sort by date without reading sources.
CAPTURED_ATTRIBUTE = "user.thumbcli.captured"


def captured_attributes(captured: int) -> dict[str, bytes]:
    """The extended attributes of a thumbnail of a source captured at `captured` (0: unknown, none)."""
    return {CAPTURED_ATTRIBUTE: b"%d" % captured} if captured else {}


def captured_of(path: bytes) -> int | None:
    """The capture time a thumbnail carries, None when it carries none (or its file system keeps none)."""
    try:
        return int(os.getxattr(path, CAPTURED_ATTRIBUTE, follow_symlinks=False))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class CachedThumb:
    """Where the thumbnail for one URL lives and what it is."""

    path: Path
    preset: str
    source_relpath: str
    content_type: str


def preset_dir(cache_root: Path, preset: str) -> Path:
    """The folder holding every thumbnail of one preset."""
    return cache_root / LAYOUT_DIR / preset


def cache_path(cache_root: Path, preset: str, source_relpath: str, fmt: Format, *, source_name: str = "") -> Path:
    """The cache file for a source path relative to its root (`a/b.jpg` -> `v1/P/a/b.jpg.webp`).

    A named source's thumbnails live under its name: `v1/P/<source_name>/a/b.jpg.webp`.
    """
    relpath = f"{source_name}/{source_relpath}" if source_name else source_relpath
    return preset_dir(cache_root, preset) / f"{relpath}.{SUFFIX_BY_FORMAT[fmt]}"


def url_path_for(preset: str, source_relpath: str, *, source_name: str = "") -> str:
    """The URL path that serves one thumbnail (`/P/a/b.jpg`, or `/P/<source_name>/a/b.jpg`); see `split_url_path`."""
    relpath = f"{source_name}/{source_relpath}" if source_name else source_relpath
    return "/" + quote(preset, safe="") + "/" + quote(os.fsencode(relpath), safe="/")


def url_segments(raw_path: bytes) -> list[bytes] | None:
    """The segments of a URL path below its leading slash, or None if it is not a safe cache path.

    Percent escapes are decoded to bytes first, so `%2e%2e`, `%2f` and overlong UTF-8 are
    judged as the bytes the file system would see; any `.`/`..`/empty segment, backslash or
    NUL makes the path unsafe. Thumbnail URLs, folder pages and generate-on-miss all use this.
    """
    if not raw_path.startswith(b"/"):
        return None
    decoded = unquote_to_bytes(raw_path[1:])
    if b"\x00" in decoded or b"\\" in decoded:
        return None
    segments = decoded.split(b"/")
    if any(seg in (b"", b".", b"..") for seg in segments):
        return None
    return segments


def split_url_path(raw_path: bytes | str) -> tuple[str, str] | None:
    """Split a request path into (preset, path below it), or None if it is not a safe cache URL (`url_segments`).

    The path below the preset is the source's path relative to its root, after the
    source's name when the cache's sources are named.
    """
    if isinstance(raw_path, str):
        raw_path = raw_path.encode("latin-1", "replace")
    segments = url_segments(raw_path.split(b"?", 1)[0].split(b"#", 1)[0])
    if segments is None or len(segments) < 2:
        return None
    preset = segments[0]
    if preset.startswith(b".") or not preset.isascii():
        return None
    return preset.decode("ascii"), os.fsdecode(b"/".join(segments[1:]))


def is_hidden(relpath: str) -> bool:
    """Whether a source path has a hidden part: `generate` skips it unless --hidden, and a miss never makes it."""
    return any(part.startswith(".") for part in relpath.split("/"))


def is_within(root: Path, path: Path) -> bool:
    """True if `path`, with every symlink resolved, is inside `root` (also resolved)."""
    real_root = os.path.realpath(root)
    real_path = os.path.realpath(path)
    return os.path.commonpath([real_root, real_path]) == real_root


def resolve_url(cache_root: Path, raw_path: bytes | str, presets: Mapping[str, Format]) -> CachedThumb | None:
    """Map a request path to its cache file, or None when no thumbnail can live there.

    This is a pure string function: the caller still checks that the file is a
    regular file whose resolved path stays inside the cache (`is_within`).
    """
    parts = split_url_path(raw_path)
    if parts is None:
        return None
    preset, relpath = parts
    fmt = presets.get(preset)
    if fmt is None:
        return None
    return CachedThumb(
        path=cache_path(cache_root, preset, relpath, fmt),
        preset=preset,
        source_relpath=relpath,
        content_type=CONTENT_TYPE_BY_FORMAT[fmt],
    )


def manifest_entry(spec: ThumbSpec, *variants: ThumbSpec) -> dict[str, object]:
    """What the manifest records of one preset: its output format (all `serve` needs) and its settings.

    A preset made in several formats passes each format's spec, preferred first: `format` and
    `digest` are then the last one's (the fallback every client takes, and what older readers
    see), `formats` and `digests` list them all in order.
    """
    specs = (spec, *variants)
    fallback = specs[-1]
    entry: dict[str, object] = {
        "format": fallback.format,
        "size": fallback.box.label,
        "fit": fallback.fit,
        "quality": fallback.effective_quality,
        "digest": fallback.digest,
    }
    if variants:
        entry["formats"] = [variant.format for variant in specs]
        entry["digests"] = [variant.digest for variant in specs]
    return entry


def load_manifest(cache_root: Path, *, strict: bool = True) -> dict[str, dict[str, object]]:
    """Every preset the manifest records, name -> its entry; {} when there is no manifest.

    A manifest that cannot be read or is not of this layout raises CannotRunError
    when `strict`; otherwise it counts as empty (a generate run then writes it anew).
    """
    manifest = cache_root / MANIFEST_NAME
    try:
        encoded = manifest.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if strict:
            raise CannotRunError(f"{manifest}: cannot read cache manifest: {exc}") from exc
        return {}
    return manifest_presets(encoded, str(manifest), strict=strict)


def manifest_presets(encoded: bytes, where: str, *, strict: bool = True) -> dict[str, dict[str, object]]:
    """The presets of a manifest's bytes (read from `where`), as `load_manifest` returns them."""
    try:
        data = json.loads(encoded)
    except ValueError as exc:
        if strict:
            raise CannotRunError(f"{where}: cannot read cache manifest: {exc}") from exc
        return {}
    presets = data.get("presets", {}) if isinstance(data, dict) and data.get("layout") == LAYOUT_VERSION else None
    if not isinstance(presets, dict):
        if strict:
            raise CannotRunError(f"{where}: not a layout {LAYOUT_VERSION} thumbcli cache")
        return {}
    return {str(name): dict(entry) for name, entry in presets.items() if isinstance(entry, dict)}


def read_manifest(cache_root: Path) -> dict[str, Format]:
    """The presets a cache holds, name -> output format (the fallback), from its manifest file (strictly read)."""
    return {name: formats[-1] for name, formats in presets_of(load_manifest(cache_root)).items()}


def presets_of(entries: Mapping[str, Mapping[str, object]]) -> dict[str, tuple[Format, ...]]:
    """Name -> output formats, preferred first and the fallback last, of the entries that name known formats."""
    presets: dict[str, tuple[Format, ...]] = {}
    for name, entry in entries.items():
        fmt = entry.get("format")
        if fmt not in FORMATS:
            continue
        listed = entry.get("formats")
        formats: tuple[Format, ...] = (fmt,)
        if isinstance(listed, list) and listed and listed[-1] == fmt:
            known = tuple(item for item in listed if item in FORMATS)
            if len(known) == len(listed) and len(set(known)) == len(known):
                formats = known
        presets[name] = formats
    return presets


def write_manifest(cache_root: Path, presets: Mapping[str, Mapping[str, object]]) -> None:
    """Write the manifest of these presets atomically; a file that already says exactly this is left alone."""
    document = {"layout": LAYOUT_VERSION, "presets": {name: dict(entry) for name, entry in presets.items()}}
    encoded = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    path = cache_root / MANIFEST_NAME
    try:
        unchanged = path.read_bytes() == encoded
    except OSError:
        unchanged = False
    if not unchanged:  # keep its mtime, so servers do not reload it after every cron run
        write_atomically(cache_root, MANIFEST_NAME, encoded)
