"""Where thumbnails go: an output tree or a served cache; every write atomic, freshness recorded."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import marshal
import os
import sqlite3
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from thumbcli import cache
from thumbcli.discover import DirBatch, SourceFile, display_path
from thumbcli.errors import CannotRunError, LockedError, SpecError
from thumbcli.spec import ThumbSpec

if TYPE_CHECKING:
    from thumbcli.resample import Thumbnail

log = logging.getLogger(__name__)

Freshness = Literal["fresh", "missing", "stale", "rejected"]

#: Folder of thumbcli's own bookkeeping inside an output tree or cache.
PRIVATE_DIR = cache.PRIVATE_DIR
DEFAULT_NAME_TEMPLATE = "{size}/{relpath}.{ext}"
TEMPLATE_FIELDS = frozenset({"size", "relpath", "reldir", "name", "stem", "suffix", "ext", "root"})
_TEMP_PREFIX = ".thumbcli-tmp-"

_in_flight_lock = threading.Lock()
_in_flight: set[str] = set()


def write_atomically(path: str, data: bytes, *, mode: int = 0o666, dir_mode: int = 0o777) -> None:
    """Write `data` to `path` so that readers see the whole file or nothing.

    A temporary file in the same folder is renamed over the final name; the
    permission modes are filtered by the umask like any created file.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=dir_mode, exist_ok=True)
    temp = os.path.join(directory, f"{_TEMP_PREFIX}{os.urandom(16).hex()}")
    with _in_flight_lock:
        _in_flight.add(temp)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(temp)


def remove_temporary_files() -> None:
    """Unlink the temporary files of writes still in progress (for an abrupt exit)."""
    with _in_flight_lock:
        temps = list(_in_flight)
    for temp in temps:
        with contextlib.suppress(OSError):
            os.unlink(temp)


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


#: A temporary file older than this was left by a killed run (a live write takes seconds).
ABANDONED_TEMP_SECONDS = 3600


def is_temporary_name(name: str) -> bool:
    """True for the names `write_atomically` uses before the rename."""
    return name.startswith(_TEMP_PREFIX)


class RunLock:
    """An exclusive `flock` on a file, so two runs never work on one output at once."""

    def __init__(self, path: Path, *, wait: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            raise LockedError(f"{path} is locked by another thumbcli run (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock."""
        os.close(self._fd)


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

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != self._SCHEMA:
            # An older layout: forget it; outputs without records are simply made again.
            self._db.execute("DROP TABLE IF EXISTS folders")
            self._db.execute("DROP TABLE IF EXISTS walked")
            self._db.execute(f"PRAGMA user_version={self._SCHEMA}")
        self._db.execute("CREATE TABLE IF NOT EXISTS folders (folder BLOB PRIMARY KEY, records BLOB, sources BLOB)")
        self._db.execute("CREATE TABLE IF NOT EXISTS walked (folder BLOB PRIMARY KEY, signature BLOB)")
        self._lock = threading.Lock()
        self._folders: dict[str, dict[str, Record]] = {}
        #: Changes not yet in the database, by folder: (record, source path), or None for a removal.
        self._pending: dict[str, dict[str, tuple[Record, bytes] | None]] = {}
        #: Source folder -> digest of the state in which all its thumbnails were last found
        #: fresh; all of them are read now, so that a forked walk helper never needs the database.
        self._signatures: dict[bytes, bytes] = dict(self._db.execute("SELECT folder, signature FROM walked"))
        self._pending_signatures: dict[bytes, bytes | None] = {}
        self._last_flush = time.monotonic()

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
        """Like `get`, but read from the database, which other processes may have updated."""
        folder, _, name = out.rpartition("/")
        with self._lock:
            self._flush_locked()
            return self._load(folder).get(name)

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
                self._flush_locked()

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
                self._db.execute("ROLLBACK")
                raise
            self._pending.clear()
            self._pending_signatures.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Commit what is pending and close the database."""
        with self._lock:
            self._flush_locked()
            self._db.close()


def _remove_if_abandoned(path: Path) -> None:
    """Unlink a temporary file that a killed run left behind (never one being written now)."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > ABANDONED_TEMP_SECONDS:
            path.unlink()
            log.info("%s: removed a temporary file left by an interrupted run", display_path(path))


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


@dataclass(frozen=True, slots=True)
class Plan:
    """Which thumbnails of one source must be made, and why (or why it cannot be)."""

    freshness: Freshness
    specs: tuple[ThumbSpec, ...]
    problem: str = ""


_FRESH = Plan("fresh", ())


def judge(record: Record | None, exists: bool, mtime_ns: int, size: int, spec: ThumbSpec, force: bool) -> Freshness:
    """How one thumbnail stands: made from a source with this mtime and size, with these settings?"""
    if record is None or not exists:
        return "missing"
    if force or record[0] != mtime_ns or record[1] != size or record[3] != spec.digest:
        return "stale"
    return "fresh"


def _worst(a: Freshness, b: Freshness) -> Freshness:
    return "missing" if "missing" in (a, b) else "stale" if "stale" in (a, b) else a


def plan_each(target: Target, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
    """Plan a folder's files one by one: (how many are fresh, the others with their plans)."""
    fresh = 0
    todo = []
    for source in batch.sources():
        plan = target.plan(source, force)
        if plan.freshness == "fresh":
            fresh += 1
        else:
            todo.append((source, plan))
    return fresh, todo


class Target(Protocol):
    """A destination the pipeline plans against and writes to."""

    root: Path
    specs: tuple[ThumbSpec, ...]

    def plan(self, source: SourceFile, force: bool) -> Plan:
        """Which of `specs` this source needs made, from its stat and the records (no reading)."""
        ...

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        """`plan` for a folder's files: how many are fresh, and the others with their plans."""
        ...

    def known_fresh(self, batch: DirBatch) -> bool:
        """Whether all of a folder's files are fresh by what is recorded of the folder as a whole.

        Must not touch the database: forked walk helpers call it.
        """
        ...

    def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
        """Write the thumbnails atomically and record what they were made from (called from writer threads)."""
        ...

    def record_failure(self, source: SourceFile, reason: str) -> None:
        """Note that libvips rejected the source (called from resample workers)."""
        ...

    def close(self) -> None:
        """Commit records and release locks."""
        ...


def check_name_template(template: str) -> None:
    """Raise SpecError unless `template` only uses known fields and yields a relative path."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise SpecError(f"invalid --name template {template!r}: {exc}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise SpecError(f"unknown field(s) in --name template: {', '.join(sorted(unknown))}")
    if "ext" not in fields and "." not in template:
        raise SpecError("--name template needs an extension, e.g. {ext}")
    if template.startswith("/"):
        raise SpecError("--name template must be a relative path")


class OutputTree:
    """Thumbnails in a plain tree: by default OUT/<size>/<source relpath>.<ext>.

    The source's full name (suffix included) is kept, so `a.jpg` and `a.png`
    never collide. Freshness records live in OUT/.thumbcli/state.sqlite.
    """

    def __init__(
        self,
        root: Path,
        specs: tuple[ThumbSpec, ...],
        *,
        name_template: str = DEFAULT_NAME_TEMPLATE,
        wait_for_lock: bool = False,
        check_collisions: bool = False,
        locked: bool = True,
    ) -> None:
        check_name_template(name_template)
        self.root = root
        self.specs = specs
        self._template = name_template
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            self._lock = RunLock(root / PRIVATE_DIR / "lock", wait=wait_for_lock) if locked else None
            self._state = StateStore(root / PRIVATE_DIR / "state.sqlite")
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CannotRunError(f"{display_path(root)}: output folder not writable: {reason}") from exc
        self._listings: dict[str, frozenset[str]] = {}
        self._root_prefix = f"{root}/"
        # The default layouts need no str.format per file: it shows in no-change runs.
        self._fixed_prefix: str | None = None
        prefix, default_tail, rest = name_template.rpartition(DEFAULT_NAME_TEMPLATE)
        if default_tail and not rest and "{" not in prefix:
            self._fixed_prefix = prefix
        self._claims: dict[str, str] | None = {} if check_collisions else None

    def relative_output(self, source: SourceFile, spec: ThumbSpec) -> str:
        """The output's path relative to the root, from the name template."""
        if self._fixed_prefix is not None:
            return f"{self._fixed_prefix}{spec.name}/{source.relpath}.{spec.suffix}"
        reldir, _, name = source.relpath.rpartition("/")
        stem, dot, suffix = name.rpartition(".")
        if not dot:
            stem, suffix = name, ""
        return self._template.format(
            size=spec.name,
            relpath=source.relpath,
            reldir=reldir or ".",
            name=name,
            stem=stem,
            suffix=suffix,
            ext=spec.suffix,
            root=os.path.basename(source.root.rstrip("/")) or "root",
        )

    def _names_in(self, folder: str) -> frozenset[str]:
        """The file names in an output folder: existence checks without a stat per thumbnail."""
        names = self._listings.get(folder)
        if names is None:
            if len(self._listings) > 256:
                self._listings.clear()
            try:
                names = frozenset(os.listdir(self.root / folder))
            except OSError:
                names = frozenset()
            if any(map(str.startswith, names, itertools.repeat(_TEMP_PREFIX))):
                for name in names:
                    if is_temporary_name(name):
                        _remove_if_abandoned(self.root / folder / name)
            self._listings[folder] = names
        return names

    def plan(self, source: SourceFile, force: bool) -> Plan:
        """Decide from the walk's stat and the records alone which specs need making."""
        needed: list[ThumbSpec] = []
        freshness: Freshness = "fresh"
        for spec in self.specs:
            relative = self.relative_output(source, spec)
            if self._claims is not None:
                owner = self._claims.setdefault(relative, source.path)
                if owner != source.path:
                    return Plan(
                        "rejected", (), f"output name {display_path(relative)} is already used by {display_path(owner)}"
                    )
            folder, _, name = relative.rpartition("/")
            exists = name in self._names_in(folder)
            verdict = judge(self._state.get(relative), exists, source.mtime_ns, source.size, spec, force)
            if verdict != "fresh":
                freshness = _worst(freshness, verdict)
                needed.append(spec)
        return Plan(freshness, tuple(needed)) if needed else _FRESH

    def _output_folder(self, spec: ThumbSpec, reldir: str) -> str:
        return f"{self._fixed_prefix}{spec.name}/{reldir}" if reldir else f"{self._fixed_prefix}{spec.name}"

    def _folder_signature(self, batch: DirBatch) -> FolderSignature | None:
        """The signature of a source folder as it stands now, or None when it cannot be judged whole.

        It covers the folder's image files (name, size, mtime_ns), the settings, and each
        output folder's inode and mtime: any thumbnail added, removed or renamed changes
        its folder's mtime.
        """
        if self._fixed_prefix is None or self._claims is not None or batch.target:
            return None
        material: list[Any] = [batch.files]
        newest = 0
        for spec in self.specs:
            folder = self._output_folder(spec, batch.reldir)
            try:
                st = os.stat(f"{self._root_prefix}{folder}")
            except OSError:
                return None
            material.append((folder, spec.digest, st.st_ino, st.st_mtime_ns))
            newest = max(newest, st.st_mtime_ns)
        return folder_signature(os.path.join(os.path.abspath(batch.root), batch.reldir), material, newest)

    def known_fresh(self, batch: DirBatch) -> bool:
        """True when nothing in the folder, its thumbnails or the settings changed since all were fresh."""
        return self._state.knows(self._folder_signature(batch))

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        """Plan a whole folder: the fast path of a no-change run, with no per-file objects for fresh files."""
        if self._fixed_prefix is None or self._claims is not None:
            return plan_each(self, batch, force)
        # Taken before the folders are listed, so a thumbnail removed meanwhile makes it not match.
        signature = None if force else self._folder_signature(batch)
        per_spec = []
        for spec in self.specs:
            folder = self._output_folder(spec, batch.reldir)
            per_spec.append((spec, f".{spec.suffix}", self._state.folder(folder), self._names_in(folder)))
        fresh = 0
        todo = []
        for name, size, mtime_ns in batch.files:
            needed = []
            freshness: Freshness = "fresh"
            for spec, suffix, records, names in per_spec:
                out_name = name + suffix
                record = records.get(out_name)
                # The common case first, as one tuple comparison; `judge` says why otherwise.
                if not force and record == (mtime_ns, size, spec.name, spec.digest) and out_name in names:
                    continue
                freshness = _worst(freshness, judge(record, out_name in names, mtime_ns, size, spec, force))
                needed.append(spec)
            if needed:
                todo.append((batch.source(name, size, mtime_ns), Plan(freshness, tuple(needed))))
            else:
                fresh += 1
        if not todo:
            self._state.remember(signature)
        return fresh, todo

    def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
        """Write each thumbnail atomically, then record what it was made from."""
        for spec, thumbnail in made:
            relative = self.relative_output(source, spec)
            write_atomically(str(self.root / relative), thumbnail.data)
            origin = Origin(
                os.fsencode(os.path.abspath(source.path)), source.mtime_ns, source.size, spec.name, spec.digest
            )
            self._state.record(relative, origin)

    def record_failure(self, source: SourceFile, reason: str) -> None:
        """Failures are not remembered here: the next run tries the file again."""

    def typical_size(self, spec: ThumbSpec) -> int | None:
        """The mean size of up to 100 existing thumbnails made with `spec`'s settings."""
        sizes = []
        for out, origin in self._state.origins():
            if origin.digest == spec.digest:
                try:
                    sizes.append(os.stat(self.root / out).st_size)
                except OSError:
                    continue
                if len(sizes) >= 100:
                    break
        return sum(sizes) // len(sizes) if sizes else None

    def is_fresh(self, source: SourceFile, spec: ThumbSpec) -> bool:
        """Whether `spec`'s thumbnail of `source` is current, asking the database (other runs may have written)."""
        relative = self.relative_output(source, spec)
        exists = os.path.isfile(self.root / relative)
        return judge(self._state.fetch(relative), exists, source.mtime_ns, source.size, spec, False) == "fresh"

    def close(self) -> None:
        """Commit the records and release the lock."""
        self._state.close()
        if self._lock is not None:
            self._lock.release()


class CacheDirectory(OutputTree):
    """The served cache: CACHE/v1/<preset>/<source relpath>.<ext>, plus a manifest of presets.

    The layout is `thumbcli.cache`'s; `thumbcli serve` and nginx map URLs with it.
    """

    def __init__(
        self,
        root: Path,
        specs: tuple[ThumbSpec, ...],
        *,
        wait_for_lock: bool = False,
        check_collisions: bool = True,
        locked: bool = True,
    ) -> None:
        super().__init__(
            root,
            specs,
            name_template=f"{cache.LAYOUT_DIR}/{DEFAULT_NAME_TEMPLATE}",
            wait_for_lock=wait_for_lock,
            check_collisions=check_collisions,
            locked=locked,
        )
        self._write_manifest(*self._read_manifest())

    def _read_manifest(self) -> tuple[dict[str, dict[str, object]], bytes | None]:
        """The presets the manifest records, and its bytes as they are on disk (None when absent)."""
        try:
            encoded = (self.root / cache.MANIFEST_NAME).read_bytes()
        except OSError:
            return {}, None
        try:
            old = json.loads(encoded)
        except ValueError:
            return {}, encoded
        if isinstance(old, dict) and old.get("layout") == cache.LAYOUT_VERSION:
            return dict(old.get("presets", {})), encoded
        return {}, encoded

    def _write_manifest(self, presets: dict[str, dict[str, object]], on_disk: bytes | None) -> None:
        for spec in self.specs:
            presets[spec.name] = {
                "format": spec.format,
                "size": spec.box.label,
                "fit": spec.fit,
                "quality": spec.effective_quality,
                "digest": spec.digest,
            }
        document = {"layout": cache.LAYOUT_VERSION, "presets": presets}
        encoded = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        if encoded != on_disk:  # unchanged: keep its mtime, so servers do not reload it after every cron run
            write_atomically(str(self.root / cache.MANIFEST_NAME), encoded)

    def prune(self, current: dict[str, str] | None, *, dry_run: bool) -> list[Removal]:
        """Remove thumbnails whose source is gone, whose preset is gone or whose settings changed.

        `current` maps preset name -> settings digest (from the config); None
        means the presets recorded in the manifest are all still wanted.
        """
        manifest, on_disk = self._read_manifest()
        if current is None:
            current = {name: str(entry.get("digest")) for name, entry in manifest.items() if isinstance(entry, dict)}
        removals: list[Removal] = []
        for out, origin in self._state.origins():
            if origin.preset not in current:
                reason = f"preset {origin.preset} is no longer configured"
            elif origin.digest != current[origin.preset]:
                reason = f"preset {origin.preset} settings changed"
            elif not os.path.lexists(origin.source):
                reason = "source is gone"
            else:
                continue
            path = self.root / out
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            removals.append(Removal(path, size, reason))
        if dry_run:
            return removals
        for removal in removals:
            with contextlib.suppress(FileNotFoundError):
                removal.path.unlink()
        self._state.forget(str(removal.path.relative_to(self.root)) for removal in removals)
        for directory in sorted({removal.path.parent for removal in removals}, key=lambda p: -len(p.parts)):
            while directory != self.root and directory.is_relative_to(self.root):
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent
        self._state.forget_signatures(os.path.isdir)
        kept = {name: entry for name, entry in manifest.items() if name in current}
        if kept != manifest:
            self._write_manifest(kept, on_disk)
        return removals


@dataclass(frozen=True, slots=True)
class Removal:
    """A thumbnail that prune removes (or, in a dry run, would remove)."""

    path: Path
    bytes: int
    reason: str
