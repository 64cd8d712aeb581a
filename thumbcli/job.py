"""What one generate run is asked to do: its sources, its one destination, its specs and how to run."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from thumbcli.discover import display_path
from thumbcli.errors import SpecError
from thumbcli.objectstores import is_bucket_url
from thumbcli.spec import RunOptions, ThumbSpec, WalkOptions

#: Said when a run has nothing to read (checked before anything else about it).
NO_SOURCES = "no source given: name the files or folders to thumbnail (or `sources` in the config)"
_LOCAL_DASK = re.compile(r"local(?::(\d+))?")


@dataclass(frozen=True, slots=True)
class TreeDestination:
    """A plain folder tree of thumbnails (`-o`), named by a template."""

    root: Path
    name_template: str | None = None
    #: `s3://bucket/prefix` when the tree is in a bucket: `root` is then the local folder of its records.
    bucket: str = ""
    #: The Cache-Control of each thumbnail PUT to a bucket.
    cache_control: str = ""
    #: List the bucket at the start: a thumbnail deleted there behind thumbcli's back is made again.
    verify: bool = False


@dataclass(frozen=True, slots=True)
class CacheDestination:
    """A served cache folder (`--cache`) in the fixed layout `serve` reads."""

    root: Path
    #: Named by the config file or environment rather than on the command line.
    configured: bool = False
    #: `s3://bucket/prefix` when the cache is in a bucket: `root` is then the local folder of its records.
    bucket: str = ""
    #: The Cache-Control of each thumbnail PUT to a bucket.
    cache_control: str = ""
    #: List the bucket at the start: a thumbnail deleted there behind thumbcli's back is made again.
    verify: bool = False


@dataclass(frozen=True, slots=True)
class FreedesktopDestination:
    """The desktop thumbnail cache ($XDG_CACHE_HOME/thumbnails) at these sizes."""

    flavours: tuple[str, ...]


Destination = TreeDestination | CacheDestination | FreedesktopDestination


def choose_destination(
    output: Path | str | None,
    cache_dir: Path | str | None,
    flavours: tuple[str, ...],
    name_template: str | None,
    *,
    cache_configured: bool = False,
    cache_control: str = "",
    verify_destination: bool = False,
) -> Destination:
    """The one destination named by -o, --cache or --freedesktop; a usage error for none or several.

    A bucket URL (`s3://bucket/prefix`, a str) names a destination in object storage.
    `cache_configured`: the cache was named by the config or environment, not on the command line.
    `verify_destination`: list a bucket destination at the start rather than trust the records alone.
    """
    if sum([output is not None, cache_dir is not None, bool(flavours)]) != 1:
        raise SpecError(
            "give exactly one destination: an output tree, a served cache or the desktop thumbnail cache",
            "output",
            "cache_dir",
            "flavours",
        )
    if name_template and output is None:
        raise SpecError("a name template only applies to an output tree: the cache layouts are fixed", "name_template")
    bucket_named = any(isinstance(place, str) and is_bucket_url(place) for place in (output, cache_dir))
    if verify_destination and not bucket_named:
        raise SpecError("--verify-destination is for a destination in a bucket (a folder is checked anyway)")
    if flavours:
        return FreedesktopDestination(flavours)
    if cache_dir is not None:
        if isinstance(cache_dir, str) and is_bucket_url(cache_dir):
            url, records = _bucket_place(cache_dir)
            return CacheDestination(records, cache_configured, url, cache_control, verify_destination)
        return CacheDestination(Path(cache_dir), configured=cache_configured)
    assert output is not None
    if isinstance(output, str) and is_bucket_url(output):
        url, records = _bucket_place(output)
        return TreeDestination(records, name_template, url, cache_control, verify_destination)
    return TreeDestination(Path(output), name_template)


def _bucket_place(url: str) -> tuple[str, Path]:
    """A destination in a bucket: its URL as parsed, and the local folder that keeps its records."""
    from thumbcli.bucket import parse, state_folder  # here: a run into a local folder never loads them

    url = parse(url).url
    return url, Path(state_folder(url))


@dataclass(frozen=True, slots=True)
class GenerateJob:
    """Everything one generate run needs: what to read, where to write, what to make and how."""

    sources: tuple[str, ...]
    destination: Destination
    specs: tuple[ThumbSpec, ...]
    run: RunOptions = field(default_factory=RunOptions)
    walk: WalkOptions = field(default_factory=WalkOptions)
    dry_run: bool = False
    wait: bool = False
    #: The config's named sources, name -> path: a cache puts each under its name.
    source_names: dict[str, str] = field(default_factory=dict)
    #: A Dask scheduler's address (`tcp://host:8786`) or `local[:N]`: make the thumbnails there.
    dask: str | None = None
    #: Every size of the destination when `specs` are only some (`--preset` in a configured
    #: cache; empty: the target's specs): a thumbnail's bytes depend on them (`resample.resample`).
    decode_for: tuple[ThumbSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.sources:
            raise SpecError(NO_SOURCES)
        for source in self.sources:
            _require_source(source)
        if not isinstance(self.destination, FreedesktopDestination) and not self.specs:
            raise SpecError("no thumbnail sizes to make")
        if isinstance(self.destination, FreedesktopDestination) and any(map(is_bucket_url, self.sources)):
            raise SpecError("the desktop thumbnail cache is of local files: write a bucket's to -o or --cache")
        if isinstance(self.destination, FreedesktopDestination) and (self.dask or self.walk.shard[1] > 1):
            # Each user's desktop cache on each host is its own: there is nothing to share out.
            raise SpecError(
                "a cluster or sharded run writes an output tree or a cache, not the desktop thumbnail cache",
                "dask",
                "shard",
            )
        if self.dask is not None:
            local_workers(self.dask)  # a usage error before any output folder is made


def local_workers(address: str) -> int | None:
    """For `local` or `local:N`, the number of local worker processes (0: one per core); None for an address."""
    match = _LOCAL_DASK.fullmatch(address)
    if match is None:
        if not re.fullmatch(r"[a-z]+://\S+|\S+:\d+", address):
            raise SpecError(f"{address!r}: give a scheduler address (tcp://host:8786) or local[:N]", "dask")
        return None
    count = int(match.group(1) or 0)
    if match.group(1) is not None and count < 1:
        raise SpecError("local:N needs at least one worker", "dask")
    return count


def _require_source(source: str) -> None:
    """A usage error for a source that is not there (caught before any output folder is made).

    A bucket is asked only by the walk's listing, which reports what it cannot list.
    """
    if is_bucket_url(source):
        from thumbcli.bucket import parse

        parse(source)
        return
    try:
        os.lstat(source)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SpecError(f"source {display_path(source)} does not exist ({exc.strerror})") from None
    except OSError:
        pass  # there but not readable: the walk reports it as a failure of that file or folder
