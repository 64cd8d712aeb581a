"""Thumbnails opened for serving: URL to file inside the cache, opened once, reused briefly."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from thumbcli.cache import MANIFEST_NAME, is_within, load_manifest, presets_of, resolve_url
from thumbcli.errors import CannotRunError
from thumbcli.serve.http import etag_for, http_date
from thumbcli.serve.pages import PresetView
from thumbcli.spec import Format

log = logging.getLogger(__name__)

#: How long an opened thumbnail (fd, stat, headers) is reused before it is re-checked;
#: a replaced or deleted thumbnail can be served in its old version for this long.
OPEN_FILE_SECONDS = 1.0
OPEN_FILE_LIMIT = 1024
_NOT_FOUND_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO}
)


class OpenFile:
    """An opened thumbnail with its validators and ready-made header lines."""

    __slots__ = (
        "etag",
        "evicted",
        "expires",
        "fd",
        "full_lines",
        "last_modified",
        "mtime_s",
        "size",
        "type_line",
        "users",
        "validator_lines",
    )

    def __init__(self, fd: int, st: os.stat_result, content_type: str, cache_control: bytes, expires: float) -> None:
        self.fd = fd
        self.size = st.st_size
        self.mtime_s = int(st.st_mtime)
        self.etag = etag_for(st.st_size, st.st_mtime_ns)
        self.last_modified = http_date(self.mtime_s)
        self.type_line = b"Content-Type: %s\r\n" % content_type.encode("ascii")
        self.validator_lines = b"ETag: %s\r\nLast-Modified: %s\r\n%s" % (self.etag, self.last_modified, cache_control)
        self.full_lines = b"%sContent-Length: %d\r\n%sAccept-Ranges: bytes\r\n" % (
            self.type_line,
            self.size,
            self.validator_lines,
        )
        self.expires = expires
        self.users = 0  # bodies still being sent from this fd
        self.evicted = False

    def release(self) -> None:
        """One body sent from this file is done; the last user of an evicted file closes it."""
        self.users -= 1
        if self.evicted and self.users == 0:
            os.close(self.fd)

    def evict(self) -> None:
        """Stop handing this file out; its fd closes once no body uses it."""
        self.evicted = True
        if self.users == 0:
            os.close(self.fd)


class CacheFiles:
    """The served cache: its presets (from the manifest, re-read when it changes) and the open thumbnails."""

    def __init__(self, cache_root: Path, cache_control: str, generated: dict[str, Format]) -> None:
        self.cache_root = cache_root
        self._real_root = os.path.realpath(cache_root)
        self._cache_control = b"Cache-Control: %s\r\n" % cache_control.encode("ascii") if cache_control else b""
        #: Presets made on a miss are served in the format they are made in, manifest or not.
        self._generated = generated
        self.open_files: dict[bytes, OpenFile] = {}
        self.presets: dict[str, Format] = {}
        #: What the pages show of each preset; replaced whole (never changed) when the manifest changes.
        self.views: dict[str, PresetView] = {}
        self._manifest_key: tuple[int, int, int] | None = None
        self.reload_manifest(force=True)

    def open(self, path: bytes, now: float) -> OpenFile | int | None:
        """The open thumbnail for a URL path, None if there is none, or an error status."""
        file = self.open_files.get(path)
        if file is not None:
            if file.expires > now:
                return file
            self.evict(path)
        thumb = resolve_url(self.cache_root, path, self.presets)
        if thumb is None or not is_within(self.cache_root, thumb.path):
            return None
        try:
            fd = os.open(thumb.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno in _NOT_FOUND_ERRNOS:
                return None
            log.warning("%s: cannot open: %s", thumb.path, exc.strerror)
            return 503
        try:
            st = os.fstat(fd)
            # Only regular files, and only if what was opened is still inside the cache:
            # this closes the race between the path check above and the open.
            if not stat.S_ISREG(st.st_mode) or not self._opened_within_root(fd):
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return None
        if len(self.open_files) >= OPEN_FILE_LIMIT:
            self.evict(next(iter(self.open_files)))
        file = OpenFile(fd, st, thumb.content_type, self._cache_control, now + OPEN_FILE_SECONDS)
        self.open_files[path] = file
        return file

    def recent(self, path: bytes, now: float) -> OpenFile | None:
        """The thumbnail for `path` if it was opened less than OPEN_FILE_SECONDS ago."""
        file = self.open_files.get(path)
        return file if file is not None and file.expires > now else None

    def _opened_within_root(self, fd: int) -> bool:
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return True  # no /proc: the realpath check before opening stands alone
        return os.path.commonpath([self._real_root, opened]) == self._real_root

    def evict(self, path: bytes) -> None:
        """Forget the open thumbnail of `path`, if any."""
        file = self.open_files.pop(path, None)
        if file is not None:
            file.evict()

    def evict_expired(self, now: float) -> None:
        """Forget the thumbnails opened too long ago."""
        for path in [path for path, file in self.open_files.items() if file.expires <= now]:
            self.evict(path)

    def evict_all(self) -> None:
        """Forget every open thumbnail (the presets changed, or the worker stops)."""
        for path in list(self.open_files):
            self.evict(path)

    def reload_manifest(self, force: bool) -> None:
        """Re-read the manifest if it changed; a broken one keeps the presets (or, when forced, raises)."""
        try:
            st = os.stat(self.cache_root / MANIFEST_NAME)
            key: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if not force and key == self._manifest_key:
            return
        try:
            entries = load_manifest(self.cache_root)
        except CannotRunError:
            if force:
                raise
            log.warning("cache manifest unreadable; keeping the presets %s", sorted(self.presets))
            return
        presets = presets_of(entries)
        presets.update(self._generated)
        self._manifest_key = key
        self.views = {
            name: PresetView(name, str(entries.get(name, {}).get("size", "")), (fmt,), name in self._generated)
            for name, fmt in presets.items()
        }
        if presets != self.presets:
            log.info("serving presets %s", sorted(presets))
            self.presets = presets
            self.evict_all()
