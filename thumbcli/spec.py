"""What to make and how to run: frozen, validated option objects."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from thumbcli.errors import SpecError

Fit = Literal["inside", "cover", "smart"]
Format = Literal["jpeg", "webp", "avif", "png"]

FITS: tuple[Fit, ...] = get_args(Fit)
FORMATS: tuple[Format, ...] = get_args(Format)

#: Bumped whenever the same settings would produce different pixels or bytes,
#: so that every existing thumbnail is seen as stale.
OUTPUT_VERSION = 2  # 2: an embedded ICC profile other than sRGB is converted to sRGB

SUFFIX_BY_FORMAT: dict[Format, str] = {"jpeg": "jpg", "webp": "webp", "avif": "avif", "png": "png"}
CONTENT_TYPE_BY_FORMAT: dict[Format, str] = {
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "png": "image/png",
}
#: Each format's default quality: at JPEG 80's SSIMULACRA2 score on real photographs (mean of the
#: 256 and 512 thumbnails), in fewer bytes; README "Quality by format", `bench/bench_quality.py`.
#: PNG is lossless: its number only goes into the settings digest.
DEFAULT_QUALITY: dict[Format, int] = {"jpeg": 80, "webp": 82, "avif": 60, "png": 100}

_BOX_RE = re.compile(r"^(?:(\d+)|(\d+)?x(\d+)?)$")
MAX_EDGE = 16384


@dataclass(frozen=True, slots=True)
class SizeBox:
    """A bounding box; an edge of None is unconstrained (`200x`, `x200`)."""

    width: int | None
    height: int | None

    def __post_init__(self) -> None:
        if self.width is None and self.height is None:
            raise SpecError("a size needs a width, a height or both")
        for edge in (self.width, self.height):
            if edge is not None and not 1 <= edge <= MAX_EDGE:
                raise SpecError(f"size edges must be between 1 and {MAX_EDGE}, not {edge}")

    @classmethod
    def parse(cls, text: str) -> SizeBox:
        """Parse `256`, `320x240`, `200x` or `x200`."""
        match = _BOX_RE.match(text.strip().lower())
        if not match:
            raise SpecError(f"invalid size {text!r}: use 256, 320x240, 200x or x200")
        square, width, height = match.groups()
        if square is not None:
            return cls(int(square), int(square))
        return cls(int(width) if width else None, int(height) if height else None)

    @property
    def label(self) -> str:
        """The canonical text form, also used as a folder name."""
        if self.width == self.height:
            return str(self.width)
        return f"{self.width or ''}x{self.height or ''}"


@dataclass(frozen=True, slots=True)
class ThumbSpec:
    """One thumbnail to make from each source: box, fit, format and encoding."""

    box: SizeBox
    fit: Fit = "inside"
    format: Format = "jpeg"
    quality: int | None = None
    upscale: bool = False
    keep_metadata: bool = False
    name: str = ""
    #: Always write an alpha band (the freedesktop.org cache wants RGBA PNGs).
    rgba: bool = False
    #: Computed once: planning compares it for every source on every run.
    digest: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise SpecError(f"invalid fit {self.fit!r}: choose from {', '.join(FITS)}")
        if self.format not in FORMATS:
            raise SpecError(f"invalid format {self.format!r}: choose from {', '.join(FORMATS)}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise SpecError(f"quality must be between 1 and 100, not {self.quality}")
        if self.fit != "inside" and (self.box.width is None or self.box.height is None):
            raise SpecError(f"{self.fit} needs a box with both edges, not {self.box.label}", "fit")
        if not self.name:
            object.__setattr__(self, "name", self.box.label)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise SpecError(f"invalid name {self.name!r}: use letters, digits, '_', '-', '.'")
        object.__setattr__(self, "digest", self._settings_digest())

    @property
    def effective_quality(self) -> int:
        """The quality the encoder is given."""
        return self.quality if self.quality is not None else DEFAULT_QUALITY[self.format]

    @property
    def suffix(self) -> str:
        """File name suffix of outputs, without the dot."""
        return SUFFIX_BY_FORMAT[self.format]

    def _settings_digest(self) -> str:
        """A stable digest of every field that affects the output bytes."""
        fields = (
            OUTPUT_VERSION,
            self.box.width,
            self.box.height,
            self.fit,
            self.format,
            self.effective_quality,
            self.upscale,
            self.keep_metadata,
            self.rgba,
        )
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """One encoded thumbnail (here, not beside the decoder: the pipeline receives them from worker processes
    without loading libvips)."""

    data: bytes
    width: int
    height: int
    #: The upright size and the format of the image it was made from.
    source_width: int
    source_height: int
    source_format: str
    #: When the source was captured (EXIF DateTimeOriginal, a video's creation time), in seconds since
    #: 1970 as its clock read (no time zone), recorded with the thumbnail for sorting by date; 0: unknown.
    captured: int = 0


def by_preset(specs: Iterable[ThumbSpec]) -> dict[str, tuple[ThumbSpec, ...]]:
    """Specs grouped by preset name, in order: a preset made in several formats has one spec per format."""
    grouped: dict[str, tuple[ThumbSpec, ...]] = {}
    for spec in specs:
        grouped[spec.name] = (*grouped.get(spec.name, ()), spec)
    return grouped


def human_bytes(count: int) -> str:
    """A byte count as people read it: 200 MiB, 1.5 GiB, 812 bytes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


def total_memory() -> int:
    """Bytes of physical memory, or 0 where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True, slots=True)
class Limits:
    """Hostile-input limits applied before and during decoding."""

    max_file_size: int = 256 * 1024 * 1024
    max_pixels: int = 100_000_000
    #: Wall seconds one file may take in a resample worker before the worker is killed.
    max_decode_seconds: float = 60.0
    #: Resident bytes a resample worker may reach before it is killed; 0: a fraction of RAM (see worker_memory).
    max_worker_memory: int = 0

    def __post_init__(self) -> None:
        if self.max_file_size < 1 or self.max_pixels < 1:
            raise SpecError("limits must be positive")
        if not self.max_decode_seconds > 0:
            raise SpecError(f"must be positive, not {self.max_decode_seconds}", "max_decode_seconds")
        if self.max_worker_memory < 0:
            raise SpecError("must not be negative", "max_worker_memory")

    def worker_memory(self, workers: int) -> int:
        """The memory ceiling of each of `workers` workers: the option, else half of RAM shared out, at least 1 GiB."""
        if self.max_worker_memory:
            return self.max_worker_memory
        return max(1 << 30, total_memory() // (2 * max(1, workers)))


def default_workers() -> int:
    """One resample worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run the pipeline: thread counts, queue depths, limits and policies."""

    loaders: int = 2
    workers: int = field(default_factory=default_workers)
    writers: int = 1
    queue_depth: int = 0
    limits: Limits = field(default_factory=Limits)
    force: bool = False
    max_files: int | None = None
    max_seconds: float | None = None
    #: Refuse images libvips can only partly decode (truncated, corrupt) instead of making degraded thumbnails.
    strict: bool = False
    #: Try sources again that the decoder refused in an earlier run and that have not changed since.
    retry_failed: bool = False
    #: Bytes read from sources and not yet resampled; one file is always let through.
    queue_bytes: int = 256 * 1024 * 1024
    #: Keep each resample worker on a core of its own, when there is one worker per core.
    pin_workers: bool = True

    def __post_init__(self) -> None:
        if self.queue_bytes < 1:
            raise SpecError("the queue byte budget must be positive")
        for label, count in (("loaders", self.loaders), ("workers", self.workers), ("writers", self.writers)):
            if not 1 <= count <= 256:
                raise SpecError(f"must be between 1 and 256, not {count}", label)
        if self.queue_depth < 0:
            raise SpecError("queue depth must not be negative")
        if self.queue_depth == 0:
            object.__setattr__(self, "queue_depth", 2 * self.workers)


@dataclass(frozen=True, slots=True)
class WalkOptions:
    """Which files under the sources are jobs, and how many processes look for them."""

    hidden: bool = False
    follow_symlinks: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: Processes that walk and stat the sources; 0: one per core, at most four.
    processes: int = 0
    #: (I, N): walk only the folders that `discover.shard_of` gives to invocation I of N (`--shard I/N`).
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise SpecError(f"{index}/{count}: give I/N with 0 <= I < N", "shard")
