"""The freedesktop.org thumbnail cache that file managers read (the Thumbnail Managing Standard).

Layout: ROOT/{normal,large,x-large,xx-large}/<md5 of the file URI>.png, each an
8-bit RGBA PNG carrying `Thumb::URI` and `Thumb::MTime` in tEXt chunks; a
thumbnail is valid while both equal the source's URI and current whole-second
mtime. Files that cannot be thumbnailed get a marker in ROOT/fail/thumbcli-<version>/.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import thumbcli
from thumbcli.discover import DirBatch, SourceFile, display_path
from thumbcli.errors import CannotRunError, SpecError
from thumbcli.formats import mimetype_of
from thumbcli.fsutil import (
    OutsideRootError,
    RunLock,
    folder_beneath,
    is_temporary_name,
    open_folder,
    remove_beneath,
    write_atomically,
)
from thumbcli.spec import SizeBox, ThumbSpec
from thumbcli.targets.failures import FailureBook
from thumbcli.targets.plan import FRESH, Plan, Removal, judge, plan_each, plan_from
from thumbcli.targets.pngtext import add_png_text, blank_png, read_png_text
from thumbcli.targets.state import FolderSignature, StateError, StateStore, folder_signature

if TYPE_CHECKING:
    from thumbcli.resample import Thumbnail

log = logging.getLogger(__name__)

#: Folder name -> the square box its thumbnails must fit.
FLAVOURS: dict[str, int] = {"normal": 128, "large": 256, "x-large": 512, "xx-large": 1024}
FAIL_DIR = "fail"
#: Prefix of thumbcli's folder under fail/; the version follows.
FAIL_PREFIX = "thumbcli-"
DIR_MODE = 0o700
FILE_MODE = 0o600

_NS = 1_000_000_000

# What GLib's g_filename_to_uri leaves unescaped in a path (its UNSAFE_PATH
# table): unreserved characters, '/', and the sub-delims it allows. Note that
# GLib escapes ';', so this does too: the MD5 must match GNOME's and KDE's.
_PATH_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/!$&'()*+,=:@")
_ESCAPES = {b: chr(b) if b in _PATH_SAFE else f"%{b:02X}" for b in range(256)}

# Where desktops mount removable drives: a missing source below an absent
# mount is an unplugged drive, not a deleted file, and its thumbnails stay.
_REMOVABLE_ROOTS = ("/media/", "/run/media/", "/mnt/")


def default_thumbnail_root() -> Path:
    """$XDG_CACHE_HOME/thumbnails, or ~/.cache/thumbnails when it is unset, blank or relative."""
    cache_home = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "thumbnails"


def file_uri(path: str | bytes) -> str:
    """The canonical file:// URI of `path`, made absolute first, escaped byte by byte like GLib."""
    return "file://" + _escaped(os.fsencode(os.path.abspath(path)))


def _escaped(raw: bytes) -> str:
    # Latin-1 maps each byte to the code point of its value, which keys the escapes.
    return raw.decode("latin-1").translate(_ESCAPES)


def uri_to_path(uri: str) -> bytes | None:
    """The local path of a file:// URI (as bytes), or None for any other or a malformed URI."""
    if not uri.startswith("file://") or "#" in uri:
        return None
    host, slash, rest = uri[len("file://") :].partition("/")
    if not slash or host not in ("", "localhost"):
        return None
    path = unquote_to_bytes("/" + rest)
    return None if b"\0" in path else path


def thumbnail_name(uri: str) -> str:
    """The file name of a URI's thumbnail: lowercase hex MD5 of the URI, plus .png."""
    return hashlib.md5(uri.encode("utf-8"), usedforsecurity=False).hexdigest() + ".png"


def mimetype_for(thumbnail: Thumbnail, path: str) -> str:
    """The MIME type of the source a thumbnail was made from: its format's, from the registry."""
    return mimetype_of(thumbnail.source_format, path)


def _parse_mtime(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


#: What a desktop thumbnail says it was made from: (Thumb::URI, Thumb::MTime in whole seconds).
Making = tuple[str | None, int | None]


def _made_from(uri: str, mtime_ns: int) -> tuple[str, int]:
    """What a thumbnail of the source at `uri`, as it is now, must say it was made from."""
    return uri, mtime_ns // _NS


def _recorded(path: str | Path) -> Making | None:
    """What the thumbnail or marker at `path` says it was made from; None when there is none."""
    try:
        text = read_png_text(path)
    except FileNotFoundError:
        return None
    except OSError:
        return (None, None)  # unreadable: never what a source wants, so stale
    return text.get("Thumb::URI"), _parse_mtime(text.get("Thumb::MTime"))


def _private_dir(root: Path, reldir: str) -> None:
    """Make the folder `reldir` below `root` (missing ones too) and owner-only, as the standard asks.

    Reached without following a symlink below `root` (OutsideRootError): the chmod must not land elsewhere.
    """
    folder = open_folder(root, reldir, dir_mode=DIR_MODE)
    try:
        if stat.S_IMODE(os.fstat(folder).st_mode) != DIR_MODE:
            os.fchmod(folder, DIR_MODE)
    except PermissionError:
        log.warning("%s: cannot make the folder private (not its owner)", display_path(root / reldir))
    finally:
        os.close(folder)


#: Where thumbcli keeps its own files for a thumbnail root, relative to the root's parent ($XDG_CACHE_HOME).
PRIVATE_DIR = "thumbcli"
LOCK_NAME = f"{PRIVATE_DIR}/freedesktop.lock"
STATE_NAME = f"{PRIVATE_DIR}/freedesktop-state.sqlite"


def _run_lock(root: Path, *, wait: bool) -> RunLock:
    """The run lock of a thumbnail root, taken (see `lock_path`)."""
    with folder_beneath(root.parent, PRIVATE_DIR) as folder:
        return RunLock(folder, LOCK_NAME.rpartition("/")[2], lock_path(root), wait=wait)


def _state_store(root: Path) -> StateStore:
    """The folder signatures of a thumbnail root (see `state_path`)."""
    with folder_beneath(root.parent, PRIVATE_DIR) as folder:
        return StateStore(folder, STATE_NAME.rpartition("/")[2], state_path(root))


def lock_path(root: Path) -> Path:
    """The run lock of a thumbnail root: beside it, in $XDG_CACHE_HOME/thumbcli/."""
    return root.parent / LOCK_NAME


# -- the cache as a pipeline target ---------------------------------------


class FreedesktopCache:
    """The freedesktop.org thumbnail cache as a pipeline target, one spec per flavour folder."""

    def __init__(
        self,
        root: Path,
        flavours: tuple[str, ...],
        *,
        wait_for_lock: bool = False,
        version: str | None = None,
        retry_failed: bool = False,
    ) -> None:
        unknown = [flavour for flavour in flavours if flavour not in FLAVOURS]
        if unknown or not flavours:
            raise SpecError(
                f"unknown thumbnail size {', '.join(unknown) or '(none)'}: choose from {', '.join(FLAVOURS)}"
            )
        self.root = root
        self.flavours = tuple(dict.fromkeys(flavours))
        self.specs = tuple(
            ThumbSpec(SizeBox(FLAVOURS[f], FLAVOURS[f]), fit="inside", format="png", rgba=True, name=f)
            for f in self.flavours
        )
        self.version = version if version is not None else thumbcli.__version__
        self._fail_reldir = f"{FAIL_DIR}/{FAIL_PREFIX}{self.version}"
        self.fail_dir = root / self._fail_reldir
        self._software = f"thumbcli {self.version}"
        self._root_prefix = os.path.join(os.path.abspath(root), "")
        try:
            root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            _private_dir(root, "")
            for flavour in self.flavours:
                _private_dir(root, flavour)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
            # Private like the thumbnails: the state names the folders that were thumbnailed.
            _private_dir(root.parent, PRIVATE_DIR)
            self._lock = _run_lock(root, wait=wait_for_lock)
            self._state = _state_store(root)
        except OutsideRootError as exc:
            raise CannotRunError(f"{display_path(root)}: refusing the thumbnail folder: {exc}") from exc
        except (OSError, StateError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CannotRunError(f"{display_path(root)}: thumbnail folder not writable: {reason}") from exc
        # Decided as in every target; the fail/ markers are written for file managers, which read them.
        self._failures = FailureBook(self._state, retry=retry_failed, version=self.version)
        self._closed = False

    def _contains(self, path: str) -> bool:
        return path.startswith(self._root_prefix)

    def plan(self, source: SourceFile, force: bool) -> Plan:
        """Judge each flavour's thumbnail by its Thumb::URI and Thumb::MTime; a known failure is not tried again."""
        path = os.path.abspath(source.path)
        if self._contains(path):
            # Never a thumbnail of a thumbnail, even when named on the command line.
            return FRESH
        uri = file_uri(path)
        name = thumbnail_name(uri)
        wanted = _made_from(uri, source.mtime_ns)
        plan = plan_from((spec, judge(_recorded(self.root / spec.name / name), wanted, force)) for spec in self.specs)
        return plan if force else self._failures.plan(source, plan)

    def _folder_signature(self, batch: DirBatch) -> FolderSignature | None:
        """The signature of a source folder as it stands now, or None when a thumbnail is missing.

        As for the served cache, but the thumbnails of all folders share one folder per
        size, whose mtime says nothing of one source folder: the signature takes a stat of
        each thumbnail instead (and of the fail marker of a source that has one). That is
        still far cheaper than reading every thumbnail's text chunks.
        """
        if batch.target:
            return None
        directory_uri = file_uri(batch.directory)
        if not directory_uri.endswith("/"):
            directory_uri += "/"
        material: list[Any] = [batch.files, self.version, self.flavours]
        newest = 0
        directory = os.path.abspath(batch.directory)
        for name, _size, _mtime_ns in batch.files:
            thumb = thumbnail_name(directory_uri + _escaped(os.fsencode(name)))
            failed = self._failures.has(os.path.join(directory, name))
            paths = [f"{self._root_prefix}{flavour}/{thumb}" for flavour in self.flavours]
            if failed:
                paths.append(str(self.fail_dir / thumb))
            for path in paths:
                try:
                    st = os.stat(path)
                except OSError:
                    if failed:
                        material.append(None)
                        continue
                    return None
                material.append((st.st_ino, st.st_mtime_ns, st.st_size))
                newest = max(newest, st.st_mtime_ns)
        return folder_signature(os.path.abspath(batch.directory), material, newest)

    def known_fresh(self, batch: DirBatch) -> bool:
        """True when no source of the folder, none of their thumbnails and not the settings changed."""
        return self._state.knows(self._folder_signature(batch))

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        """Plan a folder's files one by one (reading each PNG's text chunks); remember it if all are fresh."""
        signature = None if force else self._folder_signature(batch)
        fresh, todo = plan_each(self, batch, force)
        if not todo:
            self._state.remember(signature)
        return fresh, todo

    def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
        """Write each thumbnail with its Thumb:: text atomically (0600), then drop any fail marker."""
        path = os.path.abspath(source.path)
        uri, mtime = _made_from(file_uri(path), source.mtime_ns)
        name = thumbnail_name(uri)
        for spec, thumbnail in made:
            text = {
                "Thumb::URI": uri,
                "Thumb::MTime": str(mtime),
                "Thumb::Size": str(source.size),
                "Thumb::Mimetype": mimetype_for(thumbnail, path),
                "Thumb::Image::Width": str(thumbnail.source_width),
                "Thumb::Image::Height": str(thumbnail.source_height),
                "Software": self._software,
            }
            data = add_png_text(thumbnail.data, text)
            write_atomically(self.root, f"{spec.name}/{name}", data, mode=FILE_MODE, dir_mode=DIR_MODE)
        if self._failures.has(source.path):
            self._failures.forget(source)
            remove_beneath(self.root, f"{self._fail_reldir}/{name}")

    def record_failure(self, source: SourceFile, reason: str) -> None:
        """Remember the failure, and leave a fail marker so that file managers do not retry an unchanged file."""
        self._failures.record(source, reason)
        uri, mtime = _made_from(file_uri(source.path), source.mtime_ns)
        name = thumbnail_name(uri)
        marker = blank_png({"Thumb::URI": uri, "Thumb::MTime": str(mtime), "Software": self._software})
        try:
            _private_dir(self.root, FAIL_DIR)
            _private_dir(self.root, self._fail_reldir)
            write_atomically(self.root, f"{self._fail_reldir}/{name}", marker, mode=FILE_MODE, dir_mode=DIR_MODE)
        except OSError as exc:
            # Losing a marker only means the file is tried again next run.
            log.warning("%s: cannot write the fail marker: %s", display_path(source.path), exc.strerror or exc)

    def typical_size(self, spec: ThumbSpec) -> int | None:
        """Not known: the desktop cache keeps no record of its thumbnails' sizes."""
        return None

    def prune_sources(self, paths: Iterable[str]) -> list[Removal]:
        """`prune`'s judgement on the thumbnails and fail markers of these sources only (watch: files just deleted).

        The whole cache is every desktop application's: reading all its thumbnails per delete would cost.
        """
        folders = [self.root / flavour for flavour in FLAVOURS] + [self.fail_dir]
        found = []
        for path in paths:
            name = thumbnail_name(file_uri(path))
            for folder in folders:
                thumbnail = folder / name
                if folder.is_symlink() or not thumbnail.is_file():
                    continue
                reason = _why_orphaned(str(thumbnail))
                with contextlib.suppress(OSError):  # gone meanwhile: nothing to remove
                    if reason is not None:
                        found.append(Removal(thumbnail, thumbnail.stat().st_size, reason))
        for removal in found:
            _remove(removal.path)
        return found

    def prune(self, *, dry_run: bool) -> list[Removal]:
        """`prune_freedesktop` under this cache's own run lock (watch mode holds it for its whole life)."""
        return _prune_unlocked(self.root, dry_run=dry_run, current=f"{FAIL_PREFIX}{self.version}")

    def close(self) -> None:
        """Commit the folder signatures and release the run lock."""
        if not self._closed:
            self._closed = True
            self._state.close()
            self._lock.release()


# -- pruning ---------------------------------------------------------------


def prune_freedesktop(
    root: Path, *, dry_run: bool, wait_for_lock: bool = False, version: str | None = None
) -> list[Removal]:
    """Remove (or, with `dry_run`, only list) what no longer serves, sorted by path, each with why.

    That is: thumbnails and thumbcli fail markers whose Thumb::URI names a local
    file that no longer exists or whose mtime no longer equals Thumb::MTime;
    fail/thumbcli-* folders of other thumbcli versions; leftover temporary files.
    Other tools' entries without a local file:// URI, and their fail folders,
    are left alone.
    """
    current = f"{FAIL_PREFIX}{version if version is not None else thumbcli.__version__}"
    if not root.is_dir():
        return []
    try:
        lock = _run_lock(root, wait=wait_for_lock)
    except OSError as exc:
        raise CannotRunError(f"{display_path(root)}: cannot lock the thumbnail folder: {exc.strerror or exc}") from exc
    try:
        return _prune_unlocked(root, dry_run=dry_run, current=current)
    finally:
        lock.release()


def _prune_unlocked(root: Path, *, dry_run: bool, current: str) -> list[Removal]:
    """`prune_freedesktop`'s work, by a caller holding the run lock; `current`: this version's fail folder."""
    found: list[Removal] = []
    # A symlinked folder is not looked into: what is removed there would be outside the root.
    folders = [root / flavour for flavour in FLAVOURS if not (root / flavour).is_symlink()]
    fail_root = root / FAIL_DIR
    with contextlib.suppress(OSError):
        for entry in os.scandir(fail_root) if not fail_root.is_symlink() else ():
            if not entry.name.startswith(FAIL_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name == current:
                folders.append(Path(entry.path))
            else:
                found.append(Removal(Path(entry.path), _tree_size(entry.path), "made by another thumbcli version"))
    for folder in folders:
        found.extend(_prunable_in(folder))
    found.sort(key=lambda removal: removal.path)
    if not dry_run:
        for removal in found:
            _remove(removal.path)
        _forget_gone_folders(root)
    return found


def state_path(root: Path) -> Path:
    """Where the folder signatures of a thumbnail root live: beside its lock."""
    return root.parent / STATE_NAME


def _forget_gone_folders(root: Path) -> None:
    path = state_path(root)
    if not path.exists():
        return
    try:
        state = _state_store(root)
    except (OSError, StateError) as exc:
        log.warning("%s: cannot tidy the folder signatures: %s", display_path(path), exc)
        return
    try:
        state.forget_signatures(os.path.isdir)
        state.forget_failures(os.path.lexists)
    finally:
        state.close()


def _prunable_in(folder: Path) -> list[Removal]:
    found: list[Removal] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            if is_temporary_name(entry.name):
                found.append(Removal(Path(entry.path), size, "temporary file"))
            elif entry.name.endswith(".png") and (reason := _why_orphaned(entry.path)) is not None:
                found.append(Removal(Path(entry.path), size, reason))
        except OSError:
            continue
    return found


def _why_orphaned(thumbnail: str) -> str | None:
    """Why the thumbnail no longer serves its source (a local file now gone or changed), or None if it does."""
    recorded = _recorded(thumbnail)
    uri, mtime = recorded if recorded is not None else (None, None)
    source = uri_to_path(uri or "")
    if uri is None or source is None or mtime is None:
        return None
    try:
        st = os.stat(source)
    except (FileNotFoundError, NotADirectoryError):
        return None if _on_absent_removable_drive(os.fsdecode(source)) else "source is gone"
    except OSError:
        return None  # unreadable is not gone
    return "source changed" if judge(recorded, _made_from(uri, st.st_mtime_ns), False) != "fresh" else None


def _on_absent_removable_drive(path: str) -> bool:
    for prefix in _REMOVABLE_ROOTS:
        if path.startswith(prefix):
            ancestor = os.path.dirname(path)
            while len(ancestor) >= len(prefix):
                if os.path.ismount(ancestor):
                    return False
                ancestor = os.path.dirname(ancestor)
            return True
    return False


def _tree_size(path: str) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot remove: %s", display_path(path), exc.strerror or exc)
