"""The plain output tree: OUT/<size>/<source relpath>.<ext>, freshness recorded beside it."""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import stat
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thumbcli import cache
from thumbcli.discover import DirBatch, SourceFile, absolute_source, display_path
from thumbcli.errors import CannotRunError, SpecError
from thumbcli.fsutil import (
    TEMP_PREFIX,
    OutsideRootError,
    RunLock,
    folder_beneath,
    is_temporary_name,
    remove_beneath,
    remove_if_abandoned,
    write_atomically,
)
from thumbcli.objectstores import SCHEMES
from thumbcli.spec import Thumbnail, ThumbSpec
from thumbcli.targets.failures import FailureBook
from thumbcli.targets.plan import FRESH, Freshness, Plan, Removal, judge, plan_each, plan_from
from thumbcli.targets.records import Records
from thumbcli.targets.state import FolderSignature, Origin, Record, StateError, StateStore, folder_signature

if TYPE_CHECKING:
    from thumbcli.resample import Thumbnail

#: Folder of thumbcli's own bookkeeping inside an output tree or cache.
PRIVATE_DIR = cache.PRIVATE_DIR
DEFAULT_NAME_TEMPLATE = "{size}/{relpath}.{ext}"
SCHEME_BYTES = tuple(scheme.encode() for scheme in SCHEMES)
TEMPLATE_FIELDS = frozenset({"size", "relpath", "reldir", "name", "stem", "suffix", "ext", "root"})

log = logging.getLogger(__name__)


def wanted_record(mtime_ns: int, size: int, spec: ThumbSpec) -> Record:
    """The record a fresh thumbnail has: made from a source of this mtime and size, with `spec`'s settings."""
    return (mtime_ns, size, spec.name, spec.digest)


def source_root(source: str) -> str:
    """The root a source's files are named relative to, spelled as the walk spells it: a folder, or a file's folder."""
    try:
        is_file = stat.S_ISREG(os.stat(source).st_mode)
    except OSError:
        is_file = False
    if is_file:
        return os.path.dirname(source) or "."
    return source.rstrip("/") or "/"


def source_folders(
    sources: Sequence[str], names: Mapping[str, str] | None = None, *, named_only: bool = False
) -> dict[str, str]:
    """The leading output folder of each source root, keyed by the root as the walk spells it.

    Empty (the layout of one source, no leading folder) for a single root. A root that
    `names` (name -> path) names goes under its name; any other under its folder name,
    leading dots dropped. Roots that would share a name take their parent's name too
    (`x-photos`, `y-photos`), and if that is shared as well, a hash of their absolute
    path: a root's folder depends only on the roots it would share a name with, so adding
    a source never renames the others' folders (except one whose name it now shares).
    With `named_only` (the served cache of a config with named sources) even a single root
    gets its folder, and a root that is not named is a usage error: every URL then starts
    with its source's name, whichever sources a run walks.
    """
    name_of_path = {_absolute(path): name for name, path in (names or {}).items()}
    by_root = {root: _absolute(root) for root in map(source_root, sources)}
    absolute_roots = set(by_root.values())
    if len(absolute_roots) < 2 and not named_only:
        return {}
    unnamed = sorted(path for path in absolute_roots if path not in name_of_path)
    if named_only and unnamed:
        configured = ", ".join(sorted(names or {})) or "none"
        raise SpecError(
            f"source {display_path(unnamed[0])} is not one of the config's [sources] ({configured}): "
            "in a cache of named sources every source needs a name"
        )
    folder_of_path = dict(name_of_path)
    for path in unnamed:
        folder_of_path[path] = _unique_folder(path, [other for other in unnamed if other != path], name_of_path)
    return {root: folder_of_path[path] for root, path in by_root.items()}


def source_presence(
    sources: Iterable[bytes], listed: Mapping[str, AbstractSet[str]] | None = None
) -> Callable[[bytes], bool]:
    """Whether a source (as the state store spells it) still exists: a file, or an object in a listing.

    The objects among `sources` are listed once, up front: a bucket has no cheap per-key test.
    `listed`: objects (URLs) by the bucket place just listed whole (watch's rescan): no second listing of those.
    """
    listed = listed or {}

    def listing_of(url: str) -> AbstractSet[str] | None:
        return next((objects for place, objects in listed.items() if url.startswith(f"{place}/")), None)

    objects = {os.fsdecode(source) for source in sources if source.startswith(SCHEME_BYTES)}
    unlisted = {url for url in objects if listing_of(url) is None}
    from thumbcli.bucket import ObjectError, existing_objects  # here: a local tree's prune never needs them

    try:
        found = existing_objects(unlisted) if unlisted else set()
    except ObjectError as exc:  # not listed is not gone: nothing is removed on a failed listing
        raise CannotRunError(f"cannot tell which objects are gone, nothing pruned: {exc.strerror}") from None

    def exists(source: bytes) -> bool:
        if source.startswith(SCHEME_BYTES):
            url = os.fsdecode(source)
            listing = listing_of(url)
            return url in (found if listing is None else listing)
        return os.path.lexists(source)

    return exists


def _absolute(root: str) -> str:
    """A source root as an absolute path, or as its bucket URL."""
    return absolute_source(root).rstrip("/") or "/"


def _folder_name(path: str, depth: int) -> str:
    """The last `depth` components of an absolute path joined by '-', leading dots dropped: `x/photos` -> `x-photos`."""
    parts = [part.lstrip(".") for part in path.split("/") if part][-depth:]
    return "-".join(part for part in parts if part) or "root"


def _unique_folder(path: str, others: list[str], names: Mapping[str, str]) -> str:
    """The folder of an unnamed root: its own name, else with its parent's, else with a hash of its path.

    Only the roots it would share a name with change it, so it stays as it was when other sources come and go.
    """
    for depth in (1, 2):
        name = _folder_name(path, depth)
        # A parent-qualified name must not be another root's plain name either.
        clashes = {_folder_name(other, level) for other in others for level in range(1, depth + 1)}
        clashes |= set(names.values())
        if name not in clashes and not (depth == 2 and name == _folder_name(path, 1)):
            return name
    return f"{_folder_name(path, 1)}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:8]}"


def check_name_template(template: str) -> None:
    """Raise SpecError unless `template` only uses known fields and yields a relative path."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise SpecError(f"invalid template {template!r}: {exc}", "name_template") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise SpecError(f"unknown field(s) in the template: {', '.join(sorted(unknown))}", "name_template")
    if "ext" not in fields and "." not in template:
        raise SpecError("the template needs an extension, e.g. {ext}", "name_template")
    if template.startswith("/"):
        raise SpecError("the template must be a relative path", "name_template")


def signed_folder(batch: DirBatch) -> str:
    """The folder a batch's signature names: its absolute path, as client and workers both spell it."""
    return os.path.join(absolute_source(batch.root), batch.reldir)


class OutputTree:
    """Thumbnails in a plain tree: by default OUT/<size>/<source relpath>.<ext>.

    The source's full name (suffix included) is kept, so `a.jpg` and `a.png`
    never collide. With `source_folders` (see `source_folders`), each root's
    thumbnails go under its folder: OUT/<size>/<folder>/<relpath>.<ext>, and
    `{root}` in a name template is that folder. Freshness records live in
    OUT/.thumbcli/state.sqlite.
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
        source_folders: Mapping[str, str] | None = None,
        shard: tuple[int, int] = (0, 1),
        records: Records | None = None,
        retry_failed: bool = False,
    ) -> None:
        """`shard` (I, N) of a `--shard` run names its own lock and state files, so N shards run at once.

        `records`: records the caller keeps (a cluster task's, in memory) instead of the state file.
        """
        check_name_template(name_template)
        self.root = root
        self.specs = specs
        self._template = name_template
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CannotRunError(f"cannot create output folder {display_path(root)}: {exc.strerror or exc}") from exc
        try:
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            tag = f"-shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else ""
            with folder_beneath(root, PRIVATE_DIR) as private:
                lock, state = f"lock{tag}", f"state{tag}.sqlite"
                self._lock = RunLock(private, lock, root / PRIVATE_DIR / lock, wait=wait_for_lock) if locked else None
                self._state: Records = records or StateStore(private, state, root / PRIVATE_DIR / state)
        except OutsideRootError as exc:
            raise CannotRunError(f"{display_path(root)}: refusing the output folder: {exc}") from exc
        except StateError as exc:
            store = display_path(root / PRIVATE_DIR / f"state{tag}.sqlite")
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise CannotRunError(f"{store} is locked by another program (not a thumbcli run): {exc}") from exc
            raise CannotRunError(f"{store}: cannot use the state store: {exc}") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CannotRunError(f"{display_path(root)}: output folder not writable: {reason}") from exc
        self._failures = FailureBook(self._state, retry=retry_failed)
        self._listings: dict[str, set[str]] = {}
        self._root_prefix = f"{root}/"
        # The default layouts need no str.format per file: it shows in no-change runs.
        self._fixed_prefix: str | None = None
        prefix, default_tail, rest = name_template.rpartition(DEFAULT_NAME_TEMPLATE)
        if default_tail and not rest and "{" not in prefix:
            self._fixed_prefix = prefix
        self._claims: dict[str, str] | None = {} if check_collisions else None
        #: Source root as the walk spells it -> its leading folder; None: one source, no such folder.
        self._source_folders = dict(source_folders) if source_folders else None

    @property
    def records(self) -> Records:
        """The records of what each thumbnail was made from (a cluster run's client sends them with tasks)."""
        return self._state

    @property
    def name_template(self) -> str:
        """The template that names each thumbnail, relative to the root."""
        return self._template

    @property
    def source_folders(self) -> dict[str, str]:
        """Each source root (as the walk spells it) -> the folder its thumbnails go under; {} for one source."""
        return dict(self._source_folders or {})

    @property
    def checks_collisions(self) -> bool:
        """Whether two sources landing on one output name are refused (several sources, or a --name)."""
        return self._claims is not None

    def relative_output(self, source: SourceFile, spec: ThumbSpec) -> str:
        """The output's path relative to the root, from the name template."""
        if self._fixed_prefix is not None:
            if self._source_folders is not None:
                folder = self._source_folders[source.root]
                return f"{self._fixed_prefix}{spec.name}/{folder}/{source.relpath}.{spec.suffix}"
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
            root=self._root_name(source.root),
        )

    def _root_name(self, root: str) -> str:
        if self._source_folders is not None:
            return self._source_folders[root]
        return os.path.basename(root.rstrip("/")) or "root"

    def _names_in(self, folder: str) -> AbstractSet[str]:
        """The file names in an output folder: existence checks without a stat per thumbnail."""
        names = self._listings.get(folder)
        if names is None:
            if len(self._listings) > 256:
                self._listings.clear()
            try:
                names = set(os.listdir(self.root / folder))
            except OSError:
                names = set()
            if any(map(str.startswith, names, itertools.repeat(TEMP_PREFIX))):
                for name in names:
                    if is_temporary_name(name):
                        remove_if_abandoned(self.root, f"{folder}/{name}")
            self._listings[folder] = names
        return names

    def plan(self, source: SourceFile, force: bool) -> Plan:
        """Decide from the walk's stat and the records alone which specs need making."""
        verdicts: list[tuple[ThumbSpec, Freshness]] = []
        for spec in self.specs:
            relative = self.relative_output(source, spec)
            if self._claims is not None:
                owner = self._claims.setdefault(relative, source.path)
                if owner != source.path:
                    return Plan(
                        "rejected", (), f"output name {display_path(relative)} is already used by {display_path(owner)}"
                    )
            folder, _, name = relative.rpartition("/")
            recorded = self._state.get(relative) if name in self._names_in(folder) else None
            verdicts.append((spec, judge(recorded, wanted_record(source.mtime_ns, source.size, spec), force)))
        plan = plan_from(verdicts)
        return plan if force else self._failures.plan(source, plan)

    def _output_folder(self, spec: ThumbSpec, root: str, reldir: str) -> str:
        top = f"{self._fixed_prefix}{spec.name}"
        if self._source_folders is not None:
            top = f"{top}/{self._source_folders[root]}"
        return f"{top}/{reldir}" if reldir else top

    def folder_signature(self, batch: DirBatch) -> FolderSignature | None:
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
            folder = self._output_folder(spec, batch.root, batch.reldir)
            try:
                st = os.stat(f"{self._root_prefix}{folder}")
            except OSError:
                return None
            material.append((folder, spec.digest, st.st_ino, st.st_mtime_ns))
            newest = max(newest, st.st_mtime_ns)
        return folder_signature(signed_folder(batch), material, newest)

    def known_fresh(self, batch: DirBatch) -> bool:
        """True when nothing in the folder, its thumbnails or the settings changed since all were fresh."""
        return self._state.knows(self.folder_signature(batch))

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        """Plan a whole folder: the fast path of a no-change run, with no per-file objects for fresh files."""
        if self._fixed_prefix is None or self._claims is not None:
            return plan_each(self, batch, force)
        # Taken before the folders are listed, so a thumbnail removed meanwhile makes it not match.
        signature = None if force else self.folder_signature(batch)
        per_spec = []
        for spec in self.specs:
            folder = self._output_folder(spec, batch.root, batch.reldir)
            per_spec.append((spec, f".{spec.suffix}", self._state.folder(folder), self._names_in(folder)))
        fresh = 0
        todo = []
        for name, size, mtime_ns in batch.files:
            verdicts = []
            for spec, suffix, records, names in per_spec:
                out_name = name + suffix
                recorded = records.get(out_name) if out_name in names else None
                verdicts.append((spec, judge(recorded, wanted_record(mtime_ns, size, spec), force)))
            plan = plan_from(verdicts)
            if plan is FRESH:
                fresh += 1
            else:
                source = batch.source(name, size, mtime_ns)
                todo.append((source, plan if force else self._failures.plan(source, plan)))
        if not todo:
            self._state.remember(signature)
        return fresh, todo

    def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
        """Write each thumbnail atomically, then record what it was made from."""
        for spec, thumbnail in made:
            relative = self.relative_output(source, spec)
            try:
                self._put(relative, spec, thumbnail)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    # Save the records of the thumbnails already written while there is room for them:
                    # each later write may take what little a failed one freed.
                    self._state.save()
                raise
            origin = Origin(
                os.fsencode(absolute_source(source.path)), source.mtime_ns, source.size, spec.name, spec.digest
            )
            self._state.record(relative, origin)
            folder, _, name = relative.rpartition("/")
            listed = self._listings.get(folder)
            if listed is not None:
                # A folder planned again in the same run (watch) must see what was written since it was listed.
                # Added in place: a copy per thumbnail made writing a folder of n files cost n squared.
                listed.add(name)
        self._failures.forget(source)

    def _put(self, relative: str, spec: ThumbSpec, thumbnail: Thumbnail) -> None:
        """Store one thumbnail whole at `relative` (a file written atomically; a bucket's output PUTs it)."""
        write_atomically(self.root, relative, thumbnail.data, attributes=cache.captured_attributes(thumbnail.captured))

    def _unlink(self, relative: str) -> None:
        """Remove one thumbnail (refusing a path that leads out of the root)."""
        try:
            remove_beneath(self.root, relative)
        except OutsideRootError as exc:
            log.warning("not removed: %s", exc)

    def record_failure(self, source: SourceFile, reason: str) -> None:
        """Remember that the decoder refused the source: it is not tried again until it changes."""
        self._failures.record(source, reason)

    def known_failure(self, source: SourceFile) -> str | None:
        """Why `source` failed before as it is now (asking the database: other runs record too), or None."""
        return self._failures.known_now(source)

    def prune(self, *, dry_run: bool, listed: Mapping[str, AbstractSet[str]] | None = None) -> list[Removal]:
        """Remove the thumbnails whose source is gone, with their records, and the folders left empty.

        `listed`: what bucket places hold, as just listed (see `source_presence`).
        (A served cache also knows its presets: see CacheDirectory.prune.)
        """
        origins = self._state.origins()
        exists = source_presence((origin.source for _, origin in origins), listed)
        removals = [self._removal(out, "source is gone") for out, origin in origins if not exists(origin.source)]
        if not dry_run:
            self._remove(removals, {}, listed)
        return removals

    def _removal(self, out: str, reason: str) -> Removal:
        path = self.root / out
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        return Removal(path, size, reason)

    def _remove(
        self,
        removals: list[Removal],
        moved: Mapping[Path, bool],
        listed: Mapping[str, AbstractSet[str]] | None = None,
    ) -> None:
        """Unlink what `removals` name (not those `moved`), forget their records, remove the folders left empty."""
        for removal in removals:
            if removal.path not in moved:
                self._unlink(str(removal.path.relative_to(self.root)))
        # A thumbnail that could not be moved keeps its record: it stays known, and a later prune tries again.
        self._state.forget(
            str(removal.path.relative_to(self.root)) for removal in removals if moved.get(removal.path, True)
        )
        for directory in sorted({removal.path.parent for removal in removals}, key=lambda p: -len(p.parts)):
            while directory != self.root and directory.is_relative_to(self.root):
                try:
                    remove_beneath(self.root, str(directory.relative_to(self.root)), empty_folder=True)
                except OSError:
                    break
                directory = directory.parent
        self._state.forget_signatures(os.path.isdir)
        failed = self._state.failures()
        self._state.forget_failures(source_presence(failed, listed))

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
        recorded = self._state.fetch(relative) if os.path.isfile(self.root / relative) else None
        return judge(recorded, wanted_record(source.mtime_ns, source.size, spec), False) == "fresh"

    def close(self) -> None:
        """Commit the records and release the lock."""
        self._state.close()
        if self._lock is not None:
            self._lock.release()
