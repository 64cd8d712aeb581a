"""Thumbnails opened for serving: URL to file inside the cache, opened once, reused briefly."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from thumbcli.cache import MANIFEST_NAME, cache_path, is_within, load_manifest, presets_of, resolve_url
from thumbcli.errors import CannotRunError
from thumbcli.serve.http import etag_for, http_date
from thumbcli.serve.negotiate import AcceptMemo, candidates
from thumbcli.serve.pages import PresetView
from thumbcli.spec import CONTENT_TYPE_BY_FORMAT, Format

log = logging.getLogger(__name__)

#: How long an opened thumbnail (fd, stat, headers, small body) is reused before it is re-checked;
#: a replaced or deleted thumbnail can be served in its old version for this long.
OPEN_FILE_SECONDS = 1.0
OPEN_FILE_LIMIT = 1024
#: A thumbnail up to this size is read into memory when it is opened, and its body goes out with
#: its head in one send (a thumbnail is 10-30 KB); a larger file goes by sendfile. At most
#: OPEN_FILE_LIMIT files are open, so the bodies kept take 64 MiB per worker at the very worst.
MEMORY_BODY_BYTES = 65536
_NO_FORMATS: frozenset[Format] = frozenset()
_NOT_FOUND_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO}
)


class SentFile:
    """A descriptor bodies are sent from, closed once it is evicted and no body uses it."""

    __slots__ = ("body", "evicted", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0  # bodies still being sent from this fd
        self.evicted = False
        #: The whole file, when it is kept in memory; None: its bodies are sent from the fd.
        self.body: bytes | None = None

    def release(self) -> None:
        """One body sent from this file is done; the last user of an evicted file closes it."""
        self.users -= 1
        if self.evicted and self.users == 0:
            self._close()

    def evict(self) -> None:
        """Stop handing this file out; its fd closes once no body uses it."""
        if self.evicted:
            return
        self.evicted = True
        if self.users == 0:
            self._close()

    def _close(self) -> None:
        os.close(self.fd)
        self.body = None  # a kept answer may still point here (`repeats`), the memory goes now


class OpenFile(SentFile):
    """An opened thumbnail with its validators and ready-made header lines."""

    __slots__ = (
        "etag",
        "expires",
        "full_lines",
        "identity",
        "last_modified",
        "mtime_s",
        "path",
        "size",
        "type_line",
        "validator_lines",
    )

    def __init__(
        self,
        fd: int,
        st: os.stat_result,
        content_type: str,
        cache_control: bytes,
        expires: float,
        variant: Format | None = None,
    ) -> None:
        super().__init__(fd)
        self.size = st.st_size
        self.mtime_s = int(st.st_mtime)
        self.etag = etag_for(st.st_size, st.st_mtime_ns)
        if variant is not None:
            # RFC 9110 §8.8.3: each representation of a negotiated URL has its own entity tag,
            # and §12.5.5: Vary tells shared caches that Accept chose it.
            self.etag = self.etag[:-1] + b"-" + variant.encode("ascii") + b'"'
            cache_control = b"Vary: Accept\r\n" + cache_control
        self.last_modified = http_date(self.mtime_s)
        self.type_line = b"Content-Type: %s\r\n" % content_type.encode("ascii")
        self.validator_lines = b"ETag: %s\r\nLast-Modified: %s\r\n%s" % (self.etag, self.last_modified, cache_control)
        self.full_lines = b"%sContent-Length: %d\r\n%sAccept-Ranges: bytes\r\n" % (
            self.type_line,
            self.size,
            self.validator_lines,
        )
        self.expires = expires
        #: The path to re-check it by once it expires (None: open it again), and what must not change.
        self.path: bytes | None = None
        self.identity = _identity(st)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What stays the same while a file is the one opened, unchanged: same inode, size, mtime and ctime."""
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CacheFiles:
    """The served cache: its presets (from the manifest, re-read when it changes) and the open thumbnails."""

    def __init__(self, cache_root: Path, cache_control: str, generated: dict[str, tuple[Format, ...]]) -> None:
        self.cache_root = cache_root
        self._real_root = os.path.realpath(cache_root)
        self._cache_control = b"Cache-Control: %s\r\n" % cache_control.encode("ascii") if cache_control else b""
        #: Presets made on a miss are served in the format they are made in, manifest or not.
        self._generated = generated
        #: Open thumbnails by URL path; with negotiated presets, by URL path and the accepted formats.
        self.open_files: dict[bytes, OpenFile] = {}
        #: Name -> formats, preferred first, the fallback last.
        self.presets: dict[str, tuple[Format, ...]] = {}
        self._first_format: dict[str, Format] = {}
        #: Whether some preset has several formats: only then is the Accept field read.
        self.negotiating = False
        self._accept = AcceptMemo()
        #: What the pages show of each preset; replaced whole (never changed) when the manifest changes.
        self.views: dict[str, PresetView] = {}
        self._manifest_key: tuple[int, int, int] | None = None
        self.reload_manifest(force=True)

    def open(self, path: bytes, now: float, accept: bytes | None = None) -> OpenFile | int | None:
        """The open thumbnail for a URL path (and Accept field), None if there is none, or an error status."""
        key, accepted = path, _NO_FORMATS
        if self.negotiating:
            accepted, accepted_key = self._accept.formats(accept)
            key = path + accepted_key
        file = self.open_files.get(key)
        if file is not None:
            if file.expires > now or self._still_current(file, now):
                return file
            self.evict(key)
        thumb = resolve_url(self.cache_root, path, self._first_format)
        if thumb is None:
            return None
        formats = self.presets[thumb.preset]
        if len(formats) == 1:
            file_or_status = self._open_file(thumb.path, thumb.content_type, None, now)
        else:
            for fmt in candidates(formats, accepted):
                thumb_path = cache_path(self.cache_root, thumb.preset, thumb.source_relpath, fmt)
                file_or_status = self._open_file(thumb_path, CONTENT_TYPE_BY_FORMAT[fmt], fmt, now)
                if file_or_status is not None:
                    break  # a variant not made (yet) for this source: the next one the client takes
        if isinstance(file_or_status, OpenFile):
            if len(self.open_files) >= OPEN_FILE_LIMIT:
                self.evict(next(iter(self.open_files)))
            self.open_files[key] = file_or_status
        return file_or_status

    def _open_file(self, path: Path, content_type: str, variant: Format | None, now: float) -> OpenFile | int | None:
        if not is_within(self.cache_root, path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno in _NOT_FOUND_ERRNOS:
                return None
            log.warning("%s: cannot open: %s", path, exc.strerror)
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
        file = OpenFile(fd, st, content_type, self._cache_control, now + OPEN_FILE_SECONDS, variant)
        if variant is None:
            # Of a negotiated URL, a variant preferred to this one may have been made since: open again.
            file.path = os.fsencode(path)
        if st.st_size <= MEMORY_BODY_BYTES:
            try:
                body = os.pread(fd, st.st_size + 1, 0)
            except OSError:
                body = b""  # unreadable now: sent from the fd, which fails as it did before
            if len(body) == st.st_size:  # else it is being rewritten: the fd's body stands
                file.body = body
        return file

    def _still_current(self, file: OpenFile, now: float) -> bool:
        """Whether an expired open file is still what its path names, unchanged: then kept another while.

        One stat instead of opening again: the same inode (so the same file that was checked to be
        inside the cache when it was opened), with the same size, mtime and ctime.
        """
        if file.path is None:
            return False
        try:
            st = os.stat(file.path)
        except OSError:
            return False
        if _identity(st) != file.identity:
            return False
        file.expires = now + OPEN_FILE_SECONDS
        return True

    def recent(self, path: bytes, now: float, accept: bytes | None = None) -> OpenFile | None:
        """The thumbnail for `path` (and Accept field) if it was opened less than OPEN_FILE_SECONDS ago."""
        file = self.open_files.get(path + self._accept.formats(accept)[1] if self.negotiating else path)
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
        for name, formats in self._generated.items():
            # The manifest is what `generate` made; a preset it lacks is made on a miss in the config's formats.
            presets.setdefault(name, formats)
        self._manifest_key = key
        self.views = {
            name: PresetView(
                name,
                str(entries.get(name, {}).get("size", "")),
                formats,
                name in self._generated,
                str(entries.get(name, {}).get("fit", "inside")),
            )
            for name, formats in presets.items()
        }
        if presets != self.presets:
            log.info("serving presets %s", sorted(presets))
            self.presets = presets
            self._first_format = {name: formats[0] for name, formats in presets.items()}
            self.negotiating = any(len(formats) > 1 for formats in presets.values())
            self.evict_all()
