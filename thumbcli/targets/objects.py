"""The output tree and the served cache in a bucket: each thumbnail one PUT, the records in a local state folder.

The layout, names and manifest are those of the folder destinations, so a CDN in front of the
bucket serves the URLs `thumbcli serve` would. What a bucket lacks is cheap per-folder listings
and folder mtimes: the records alone say what the bucket holds (this client is its one writer,
under the local lock), and folders are never skipped whole by signature.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from thumbcli import cache
from thumbcli.bucket import (
    ObjectError,
    UnreadableKey,
    copy_object,
    delete_objects,
    fetch_object,
    list_folders,
    parse,
    put_object,
)
from thumbcli.discover import DirBatch, SourceFile
from thumbcli.spec import CONTENT_TYPE_BY_FORMAT, Thumbnail, ThumbSpec
from thumbcli.targets.plan import Removal, judge
from thumbcli.targets.served import CacheDirectory
from thumbcli.targets.state import FolderSignature, Origin
from thumbcli.targets.tree import OutputTree, wanted_record

log = logging.getLogger(__name__)

#: Cache-Control of a thumbnail in a bucket unless told otherwise: as `thumbcli serve` sends it.
DEFAULT_CACHE_CONTROL = "public, max-age=86400"


class BucketTree(OutputTree):
    """An output tree (`-o s3://bucket/prefix`): thumbnails PUT under the URL, records in `state_root`."""

    def __init__(
        self,
        url: str,
        state_root: Path,
        specs: tuple[ThumbSpec, ...],
        *,
        cache_control: str = DEFAULT_CACHE_CONTROL,
        verify: bool = False,
        **options: Any,
    ) -> None:
        """`options` are the folder tree's (or cache's); its records and lock are kept in `state_root`.

        `verify`: list the bucket once, now, and take a thumbnail that is not there for missing,
        whatever the records say (one request per 1,000 objects; else the records alone are trusted).
        """
        self.url = url.rstrip("/")
        self.cache_control = cache_control
        super().__init__(state_root, specs, **options)
        self._held = _names_by_folder(self.url) if verify else None

    def object_url(self, relative: str) -> str:
        """The URL of the thumbnail at `relative`."""
        return f"{self.url}/{relative}"

    def _put(self, relative: str, spec: ThumbSpec, thumbnail: Thumbnail) -> None:
        put_object(self.object_url(relative), thumbnail.data, CONTENT_TYPE_BY_FORMAT[spec.format], self.cache_control)

    def _unlink(self, relative: str) -> None:
        delete_objects([self.object_url(relative)])

    def _removal(self, out: str, reason: str) -> Removal:
        return Removal(self.root / out, 0, reason, self.object_url(out))

    def _names_in(self, folder: str) -> frozenset[str]:
        if self._held is not None:
            return self._held.get(folder, frozenset())
        # The records are what the bucket holds: listing it per folder would cost a request each.
        return frozenset(self._state.folder(folder))

    def folder_signature(self, batch: DirBatch) -> FolderSignature | None:
        """None: with no folder mtimes to notice a thumbnail removed, every folder is planned file by file."""
        return None

    def is_fresh(self, source: SourceFile, spec: ThumbSpec) -> bool:
        """Whether `spec`'s thumbnail of `source` is current by the records (asking the database)."""
        relative = self.relative_output(source, spec)
        if self._held is not None and relative.rpartition("/")[2] not in self._names_in(relative.rpartition("/")[0]):
            return False
        recorded = self._state.fetch(relative)
        return judge(recorded, wanted_record(source.mtime_ns, source.size, spec), False) == "fresh"


def _names_by_folder(url: str) -> dict[str, frozenset[str]]:
    """The names of the objects under `url`, by folder relative to it, from one listing."""
    held: dict[str, frozenset[str]] = {}
    for listed in list_folders(parse(url)):
        if not isinstance(listed, UnreadableKey):
            reldir, files = listed
            held[reldir] = frozenset(name for name, _, _ in files)
    return held


class BucketCache(BucketTree, CacheDirectory):
    """A served cache (`--cache s3://bucket/prefix`): its layout and manifest in the bucket, records kept locally."""

    def _recorded_presets(self) -> dict[str, dict[str, object]]:
        """The presets of the local copy and of the manifest in the bucket, the bucket's winning.

        The bucket's manifest is what a CDN serves from, and other clients (with records of their
        own) may have entered presets there: a client that knew only its local copy would drop them.
        """
        url = self.object_url(cache.MANIFEST_NAME)
        in_bucket = fetch_object(url)
        local = super()._recorded_presets()
        return local if in_bucket is None else local | cache.manifest_presets(in_bucket, url, strict=False)

    def _holds(self, relative: str) -> bool:
        """Whether the records know a thumbnail at `relative` (they alone say what the bucket holds)."""
        return self._state.fetch(relative) is not None

    def _move(self, out: str, placed: str, origin: Origin) -> bool:
        """Copy a thumbnail to its named source's place in the bucket (headers and all), then delete it there."""
        try:
            copy_object(self.object_url(out), self.object_url(placed))
        except ObjectError as exc:
            log.warning("not moved: %s: %s", self.object_url(out), exc.strerror)
            return False
        self._state.record(placed, origin)
        self._unlink(out)
        return True

    def _write_manifest(self, presets: dict[str, dict[str, object]], *, replace: bool = True) -> None:
        """The manifest written as on disk (the local copy in the state folder), and PUT when the bucket's differs."""
        url = self.object_url(cache.MANIFEST_NAME)
        in_bucket = fetch_object(url)
        super()._write_manifest(presets, replace=replace)
        written = (self.root / cache.MANIFEST_NAME).read_bytes()
        if written != in_bucket:
            put_object(url, written, "application/json", "no-cache")
