"""What each thumbnail was made from, and per-folder signatures that let a rerun skip a folder whole."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import marshal
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from thumbcli.discover import display_path
from thumbcli.fsutil import OutsideRootError

log = logging.getLogger(__name__)

#: What a state store raises when its database cannot be read or written (it is SQLite; no one else needs to know).
StateError = sqlite3.Error

#: An output folder changed less than this long ago may change again within the same
#: timestamp tick (and so unseen): its signature is not recorded until it is older.
RACY_NS = 2_000_000_000


class FolderSignature(NamedTuple):
    """What a rerun compares to skip a source folder whole."""

    #: The source folder's absolute path.
    folder: bytes
    #: Of its image files, the settings and the state of its thumbnails.
    digest: bytes
    #: Nothing it covers changed within the last RACY_NS, so it may be recorded.
    settled: bool


def folder_signature(folder: str, material: list[Any], newest_mtime_ns: int) -> FolderSignature:
    """The signature of `folder` from what it covers (str, bytes, ints, None, tuples and lists).

    `newest_mtime_ns` is the latest mtime among the thumbnails (or their folders) it covers.
    """
    # marshal version 2: later versions emit back-references that depend on which objects
    # happen to be shared, which would make equal folders encode differently.
    digest = hashlib.blake2b(marshal.dumps(material, 2), digest_size=16).digest()
    return FolderSignature(os.fsencode(folder), digest, newest_mtime_ns <= time.time_ns() - RACY_NS)


@dataclass(frozen=True, slots=True)
class Origin:
    """What one thumbnail was made from."""

    source: bytes
    mtime_ns: int
    size: int
    preset: str
    digest: str


#: What planning compares for one output: (source mtime_ns, source size, preset name, settings digest).
Record = tuple[int, int, str, str]

#: What a remembered decode failure is judged by: (source mtime_ns, source size, thumbcli version).
FailureRecord = tuple[int, int, str]


def _use_wal(db: sqlite3.Connection, seconds: float = 30.0) -> None:
    """Switch to WAL; SQLite answers "locked" at once, without waiting, while another process switches too."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


#: The files SQLite keeps beside a database in WAL mode, after its name.
_COMPANIONS = ("", "-wal", "-shm", "-journal")


def _make_unlinked(folder: int, name: str, path: Path) -> None:
    """Make the database `name` in `folder` unless a symlink leads to it or to a file SQLite keeps beside it.

    SQLite follows symlinks (and resolves them, to put its journal beside the target), so
    a state file planted as a symlink would have its target overwritten. Its folder is
    reached without following one, and the database is made here, O_NOFOLLOW; SQLite
    opens it by name (`path`) just after, which leaves only that instant for a swap.
    """
    for companion in _COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(name + companion, dir_fd=folder).st_mode):
                raise OutsideRootError(f"{display_path(path)}{companion} is a symlink")
    os.close(os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder))


#: Disk space kept beside a database (in a file named after it with this suffix) and given up when
#: the disk is full, so that the records of the thumbnails already written can still be committed.
ROOM_SUFFIX = "-room"
ROOM_BYTES = 256 * 1024


def _keep_room(folder: int, name: str, path: Path) -> None:
    """Make sure the room file `name` in `folder` holds ROOM_BYTES; on a disk already full there is none to keep."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # planted like a symlinked database: refused the same way
            raise OutsideRootError(f"{display_path(path)} is a symlink") from None
        return
    try:
        if os.fstat(fd).st_size < ROOM_BYTES:
            os.posix_fallocate(fd, 0, ROOM_BYTES)
    except OSError:
        pass
    finally:
        os.close(fd)


#: What SQLite says of a file that is not a sound database: it is set aside and a new one started.
_CORRUPT = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})


def _set_aside(folder: int, name: str, path: Path) -> Path:
    """Rename a damaged database (and its journal files) beside it, for a person to look at; its new path."""
    aside = f"{name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for companion in _COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            os.rename(name + companion, aside + companion, src_dir_fd=folder, dst_dir_fd=folder)
    return path.with_name(aside)


class StateStore:
    """What each thumbnail was made from, in SQLite: one row per output folder.

    A row holds, marshal-encoded, {file name: Record} and, apart, {file name:
    source path}, for one folder. Planning loads each folder the walk reaches
    with one query and one C-speed decode of the records alone: that keeps a
    no-change run close to the cost of the walk itself. Changes are merged into
    the stored rows in batches (read, update, write, in one transaction), so a
    concurrent writer (`serve --source`) loses nothing, and a killed run loses
    at most a second of records, whose thumbnails are then simply made again.

    A second table holds, per source folder, the signature of the state in which
    all its thumbnails were last found fresh (`OutputTree.known_fresh`): while it
    matches, a rerun needs neither the records nor a listing of the folder's thumbnails.
    """

    _FLUSH_SECONDS = 1.0
    _SCHEMA = 3
    _CACHED_FOLDERS = 1024

    def __init__(self, folder: int, name: str, path: Path) -> None:
        """Open (or make) the database `name` in the open `folder` (at `path`); a symlink there is refused (OSError)."""
        self._path, self._room = path, name + ROOM_SUFFIX
        _make_unlinked(folder, name, path)
        _keep_room(folder, self._room, path.with_name(self._room))
        #: The folder, held for giving up the room on a full disk.
        self._folder = os.dup(folder)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorname not in _CORRUPT:
                os.close(self._folder)
                raise
            # Freshness records only: without them every thumbnail is checked (and made) again.
            aside = _set_aside(folder, name, path)
            log.warning(
                "%s was damaged (%s): set aside as %s, and a new one started",
                display_path(self._path),
                exc,
                display_path(aside),
            )
            self._db = self._open()
        self._lock = threading.Lock()
        self._folders: dict[str, dict[str, Record]] = {}
        #: Changes not yet in the database, by folder: (record, source path), or None for a removal.
        self._pending: dict[str, dict[str, tuple[Record, bytes] | None]] = {}
        #: Source folder -> digest of the state in which all its thumbnails were last found
        #: fresh; all of them are read now, so that a forked walk helper never needs the database.
        self._signatures: dict[bytes, bytes] = dict(self._db.execute("SELECT folder, signature FROM walked"))
        self._pending_signatures: dict[bytes, bytes | None] = {}
        self._last_flush = time.monotonic()
        self._save_failed = False

    def _open(self) -> sqlite3.Connection:
        """Connect, and set the schema up (in one transaction: serve's processes opening the store take turns)."""
        db = sqlite3.connect(self._path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            self._set_up(db)
        except BaseException:
            db.close()
            raise
        return db

    def _set_up(self, db: sqlite3.Connection) -> None:
        self._db = db
        _use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        # One transaction, so processes opening the same store at once (serve's workers) take turns.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute("PRAGMA user_version").fetchone()[0] != self._SCHEMA:
                # An older layout: forget it; outputs without records are simply made again.
                self._db.execute("DROP TABLE IF EXISTS folders")
                self._db.execute("DROP TABLE IF EXISTS walked")
                self._db.execute(f"PRAGMA user_version={self._SCHEMA}")
            self._db.execute("CREATE TABLE IF NOT EXISTS folders (folder BLOB PRIMARY KEY, records BLOB, sources BLOB)")
            self._db.execute("CREATE TABLE IF NOT EXISTS walked (folder BLOB PRIMARY KEY, signature BLOB)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS failures "
                "(source BLOB PRIMARY KEY, mtime_ns INTEGER, size INTEGER, version TEXT, reason TEXT)"
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _load(self, folder: str) -> dict[str, Record]:
        row = self._db.execute("SELECT records FROM folders WHERE folder = ?", (os.fsencode(folder),)).fetchone()
        return _decode(row[0]) if row else {}

    def folder(self, folder: str) -> dict[str, Record]:
        """The records of one output folder (relative to the root), by file name."""
        records = self._folders.get(folder)
        if records is None:
            with self._lock:
                records = self._load(folder)
                for name, change in self._pending.get(folder, {}).items():
                    _apply(records, name, change[0] if change else None)
                if len(self._folders) >= self._CACHED_FOLDERS:
                    self._folders.clear()
                self._folders[folder] = records
        return records

    def get(self, out: str) -> Record | None:
        """The record of the output at relative path `out`."""
        folder, _, name = out.rpartition("/")
        return self.folder(folder).get(name)

    def fetch(self, out: str) -> Record | None:
        """Like `get`, but read from the database, which other processes may have updated.

        Our own changes not yet written are laid over what is read, as `folder` does,
        so this takes no write lock: it never waits for another process's batch.
        """
        folder, _, name = out.rpartition("/")
        with self._lock:
            records = self._load(folder)
            pending = self._pending.get(folder, {})
            if name in pending:
                change = pending[name]
                return change[0] if change else None
        return records.get(name)

    def origins(self) -> list[tuple[str, Origin]]:
        """Every recorded output with everything known of its origin."""
        with self._lock:
            self._flush_locked()
            rows = self._db.execute("SELECT folder, records, sources FROM folders").fetchall()
        found = []
        for folder, records_blob, sources_blob in rows:
            prefix = os.fsdecode(folder)
            sources = _decode(sources_blob)
            for name, (mtime_ns, size, preset, digest) in _decode(records_blob).items():
                out = f"{prefix}/{name}" if prefix else name
                found.append((out, Origin(sources.get(name, b""), mtime_ns, size, preset, digest)))
        return found

    def record(self, out: str, origin: Origin) -> None:
        """Remember what the output at relative path `out` was made from."""
        self._change(out, ((origin.mtime_ns, origin.size, origin.preset, origin.digest), origin.source))

    def forget(self, outs: Iterable[str]) -> None:
        """Drop the records of removed outputs."""
        for out in outs:
            self._change(out, None)
        with self._lock:
            self._flush_locked()

    def failures(self) -> dict[bytes, tuple[FailureRecord, str]]:
        """Every recorded decode failure: source path -> (what it failed as, the reason)."""
        with self._lock:
            rows = self._db.execute("SELECT source, mtime_ns, size, version, reason FROM failures").fetchall()
        return {row[0]: ((row[1], row[2], row[3]), row[4]) for row in rows}

    def failure(self, source: bytes) -> tuple[FailureRecord, str] | None:
        """The recorded decode failure of one source, read from the database (other processes record them too)."""
        with self._lock:
            row = self._db.execute(
                "SELECT mtime_ns, size, version, reason FROM failures WHERE source = ?", (source,)
            ).fetchone()
        return ((row[0], row[1], row[2]), row[3]) if row else None

    def record_failure(self, source: bytes, record: FailureRecord, reason: str) -> None:
        """Remember that `source`, as `record` describes it, could not be decoded (written at once: they are few)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)", (source, *record, reason))

    def forget_failure(self, source: bytes) -> None:
        """Drop the failure recorded for `source` (it was made, or is gone)."""
        with self._lock:
            self._db.execute("DELETE FROM failures WHERE source = ?", (source,))

    def forget_failures(self, keep: Callable[[bytes], bool]) -> None:
        """Drop the failures recorded for the sources for which `keep` is false (e.g. those that are gone)."""
        with self._lock:
            gone = [(source,) for (source,) in self._db.execute("SELECT source FROM failures") if not keep(source)]
            self._db.executemany("DELETE FROM failures WHERE source = ?", gone)

    def knows(self, signature: FolderSignature | None) -> bool:
        """Whether `signature` is the one recorded for its folder. Reads no database: walk helpers call it."""
        return signature is not None and self._signatures.get(signature.folder) == signature.digest

    def remember(self, signature: FolderSignature | None) -> None:
        """Record that every thumbnail of a folder was fresh in the state `signature` describes, once settled."""
        if signature is None or not signature.settled:
            return
        with self._lock:
            self._signatures[signature.folder] = signature.digest
            self._pending_signatures[signature.folder] = signature.digest

    def forget_signatures(self, keep: Callable[[bytes], bool]) -> None:
        """Drop the signatures of the source folders for which `keep` is false."""
        with self._lock:
            for folder in [folder for folder in self._signatures if not keep(folder)]:
                del self._signatures[folder]
                self._pending_signatures[folder] = None
            self._flush_locked()

    def _change(self, out: str, change: tuple[Record, bytes] | None) -> None:
        folder, _, name = out.rpartition("/")
        with self._lock:
            cached = self._folders.get(folder)
            if cached is not None:
                _apply(cached, name, change[0] if change else None)
            self._pending.setdefault(folder, {})[name] = change
            if time.monotonic() - self._last_flush >= self._FLUSH_SECONDS:
                try:
                    self._flush_locked()
                except sqlite3.OperationalError as exc:
                    # A full disk, or a writer holding the database too long: kept, and tried again
                    # in a second; `save` at the end has the room kept for it.
                    self._last_flush = time.monotonic()
                    log.debug("%s: records not saved yet: %s", display_path(self._path), exc)

    def _pending_count(self) -> int:
        return sum(map(len, self._pending.values()))

    def save(self) -> None:
        """Commit what is pending now; when the disk is full, give up the room kept beside the database for it.

        Records that still cannot be saved are logged, not raised: their thumbnails are made again next run.
        """
        with self._lock:
            try:
                self._flush_locked()
                return
            except sqlite3.OperationalError as exc:
                failure = exc
            try:
                os.unlink(self._room, dir_fd=self._folder)
                released = True
            except OSError:
                released = False
            if released:
                try:
                    self._flush_locked()
                    return
                except sqlite3.OperationalError as exc:
                    failure = exc
            # Once: on a full disk every thumbnail that fails to be written asks again.
            log.log(
                logging.DEBUG if self._save_failed else logging.WARNING,
                "%s: cannot save the records of %d thumbnails (%s): they will be made again",
                display_path(self._path),
                self._pending_count(),
                failure,
            )
            self._save_failed = True

    def _flush_locked(self) -> None:
        if self._pending or self._pending_signatures:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, signature in self._pending_signatures.items():
                    if signature is None:
                        self._db.execute("DELETE FROM walked WHERE folder = ?", (key,))
                    else:
                        self._db.execute("INSERT OR REPLACE INTO walked VALUES (?, ?)", (key, signature))
                for folder, changes in self._pending.items():
                    key = os.fsencode(folder)
                    row = self._db.execute("SELECT records, sources FROM folders WHERE folder = ?", (key,)).fetchone()
                    records, sources = (_decode(row[0]), _decode(row[1])) if row else ({}, {})
                    for name, change in changes.items():
                        _apply(records, name, change[0] if change else None)
                        _apply(sources, name, change[1] if change else None)
                    self._db.execute(
                        "INSERT OR REPLACE INTO folders VALUES (?, ?, ?)",
                        (key, marshal.dumps(records), marshal.dumps(sources)),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite ends the transaction itself on some errors (a full disk): a ROLLBACK would
                # then fail too, hiding why.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            self._pending.clear()
            self._pending_signatures.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Commit what is pending (see `save`) and close the database."""
        self.save()
        with self._lock:
            self._db.close()
            os.close(self._folder)


def _apply(mapping: dict[str, Any], name: str, value: object | None) -> None:
    if value is None:
        mapping.pop(name, None)
    else:
        mapping[name] = value


def _decode(blob: bytes) -> dict[str, Any]:
    try:
        decoded = marshal.loads(blob)
    except (EOFError, ValueError, TypeError):  # written by another Python: make those thumbnails again
        return {}
    return decoded if isinstance(decoded, dict) else {}
