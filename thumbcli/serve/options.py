"""What `thumbcli serve` is told: where, how many, which limits; every default stated here once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from thumbcli.errors import SpecError
from thumbcli.spec import Limits, ThumbSpec

if TYPE_CHECKING:  # the module that switches accounts (ctypes, subprocess) loads only for `serve --user`
    from thumbcli.serve.account import Account

MAX_WORKERS = 256
MAX_GENERATORS = 64


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How `thumbcli serve` listens, limits clients and answers."""

    cache_root: Path
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # processes sharing the port with SO_REUSEPORT
    admin_port: int | None = None  # /healthz and /metrics here instead of on the main port
    access_log: str | None = None  # None = off, "-" = stderr, else a file path; combined log format
    cache_control: str = "public, max-age=86400"
    # Per worker. At it, a new connection takes the place of the one that has waited longest on its
    # client (a head not complete, or idle); when every one is busy, stop accepting (the backlog holds the rest).
    max_connections: int = 1024
    header_timeout: float = 10.0  # seconds to receive a complete request head (slowloris)
    idle_timeout: float = 15.0  # keep-alive idle
    send_timeout: float = 30.0  # a response that makes no progress for this long is dropped
    max_requests_per_connection: int = 1000
    max_header_bytes: int = 16384  # -> 431
    max_uri_bytes: int = 8192  # -> 414
    grace_period: float = 10.0  # on SIGTERM/SIGINT: stop accepting, finish in-flight, exit 0
    use_sendfile: bool = True  # env THUMBCLI_NO_SENDFILE=1 also forces the plain-send fallback
    # Gallery pages for every folder URL (`/<preset>/<folder>/`); off, since a public shop
    # must not list its catalogue. The `/` page (presets only) is always there.
    browse: bool = False
    # Generate on a miss: with a source folder, a missing or stale thumbnail of one of
    # `presets` is made on request; other presets are served from the cache only.
    source_root: Path | str | None = None  # a folder, or a bucket URL (s3://bucket/prefix)
    # Or the config's named sources, (name, folder) each: made under /<preset>/<name>/ as generate makes them.
    named_sources: tuple[tuple[str, Path], ...] = ()
    presets: tuple[ThumbSpec, ...] = ()
    # Every preset of the cache: a source is decoded for the largest, as `generate` decodes it,
    # so that both make the same bytes (see `resample.resample`).
    decode_for: tuple[ThumbSpec, ...] = ()
    max_pending: int = 16  # per worker: generations in flight before further misses get 503
    generators: int = 2  # per worker: threads making thumbnails, each with a resample worker process
    limits: Limits = field(default_factory=Limits)  # per source, as in generate
    strict: bool = False  # refuse damaged sources instead of thumbnailing what decodes, as in generate
    # Started as root: the HTTP workers (and the resample workers they start) run as this
    # account once the ports are bound; None: as whoever started the server.
    user: Account | None = None
    # A request waits for its thumbnail at most `send_timeout` seconds, then gets 503 + Retry-After.

    def __post_init__(self) -> None:
        if not self.host:
            raise SpecError("the host to listen on cannot be empty")
        if not 0 <= self.port <= 65535:
            raise SpecError(f"port must be between 0 and 65535, not {self.port}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise SpecError(f"workers must be between 1 and {MAX_WORKERS}, not {self.workers}")
        if self.admin_port is not None:
            if not 0 <= self.admin_port <= 65535:
                raise SpecError(f"admin port must be between 0 and 65535, not {self.admin_port}")
            if self.admin_port == self.port and self.port != 0:
                raise SpecError("the admin port must differ from the main port")
        if self.access_log == "":
            raise SpecError("access log must be '-' (stderr) or a file path")
        if any(not 0x20 <= ord(ch) < 0x7F for ch in self.cache_control):
            raise SpecError("cache control must be printable ASCII on one line")
        for name in ("max_connections", "max_requests_per_connection"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name.replace('_', ' ')} must be at least 1")
        if self.max_header_bytes < 256:
            raise SpecError("max header bytes must be at least 256")
        if self.max_uri_bytes < 16:
            raise SpecError("max URI bytes must be at least 16")
        for name in ("header_timeout", "idle_timeout", "send_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SpecError(f"{name.replace('_', ' ')} must be a positive number of seconds")
        if not (math.isfinite(self.grace_period) and self.grace_period >= 0):
            raise SpecError("grace period must be zero or a positive number of seconds")
        if self.source_root is not None and self.named_sources:
            raise SpecError("give a source folder or the named sources, not both", "source_root", "named_sources")
        if not self.on_demand_sources:
            if self.presets:
                raise SpecError("presets to make on a miss need a source folder", "presets", "source_root")
        elif not self.presets:
            raise SpecError("a source folder needs at least one preset to make (define presets in thumbcli.toml)")
        made = [(spec.name, spec.format) for spec in self.presets]
        if len(set(made)) != len(made):
            raise SpecError(f"each preset is made once in each format, not {made}")
        if self.max_pending < 1:
            raise SpecError(f"max pending must be at least 1, not {self.max_pending}")
        if not 1 <= self.generators <= MAX_GENERATORS:
            raise SpecError(f"generators must be between 1 and {MAX_GENERATORS}, not {self.generators}")

    @property
    def on_demand_sources(self) -> dict[str, Path | str]:
        """The folders made from on a miss, by their URL segment after the preset ("": none); {} for none."""
        if self.source_root is not None:
            return {"": self.source_root}
        return {name: path for name, path in self.named_sources}
