"""Object storage (`s3://bucket/prefix`, `az://container/prefix`) for sources and thumbnails: the only `import obstore`.

A bucket has no folders, inodes or mtimes: its listing gives each object's key, size, ETag and
Last-Modified, and that is all a rerun needs to know an object is unchanged, so a run that has
nothing to make lists and never GETs. Credentials, region and endpoint come from each store's
standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...;
`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ...), read by `object_store` as
`objectstores` tells; nothing here logs or prints them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

from thumbcli.errors import CannotRunError, EndpointUnreachable, FileRejected, SpecError
from thumbcli.objectstores import TIMEOUT_SETTING, kind_of

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ObjectStore

#: What to install when obstore is missing, said in the one-line error.
EXTRA = "pip install 'thumbcli[s3]'"
#: Bytes of an object read first to judge --max-pixels from its header before fetching the rest.
HEADER_BYTES = 64 * 1024
#: Seconds a request may wait for the store's next byte (a response that stalls) unless told otherwise.
STALL_SECONDS = 20.0
#: Seconds a whole request may take (connect, send, read the body), however steadily the bytes come.
REQUEST_SECONDS = 600
#: Retries of a failed request (5xx, throttling, dropped connections, timeouts), with backoff.
RETRIES = 4
#: Retrying a request is given up after this many stall timeouts' worth of seconds, whatever the count.
RETRY_STALLS = 3


@dataclass(frozen=True, slots=True)
class BucketPlace:
    """A bucket (or container) of a store and a key prefix in it (no leading or trailing '/'; empty: all of it)."""

    scheme: str
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        """The place as `s3://bucket/prefix`, without a trailing '/'."""
        return f"{self.scheme}{self.bucket}/{self.prefix}" if self.prefix else f"{self.scheme}{self.bucket}"

    def at(self, prefix: str) -> BucketPlace:
        """Another prefix of the same bucket."""
        return BucketPlace(self.scheme, self.bucket, prefix)

    def key(self, relpath: str) -> str:
        """The key of `relpath` below the prefix."""
        return f"{self.prefix}/{relpath}" if self.prefix else relpath


#: What a bucket or container name may hold (S3 and Azure take a subset of it).
_HOLDER_NAME = re.compile(r"[A-Za-z0-9._-]+")


def parse(url: str) -> BucketPlace:
    """`s3://bucket/some/prefix/` as a BucketPlace; a usage error without a bucket or for a store refused."""
    kind = kind_of(url)
    if kind is None:
        raise ValueError(f"{url}: not a bucket URL")
    if kind.refusal:
        raise SpecError(f"{url}: {kind.refusal}")
    bucket, _, prefix = url.removeprefix(kind.scheme).partition("/")
    if not bucket:
        raise SpecError(f"{url}: name a {kind.holder} ({kind.scheme}{kind.holder}/prefix)")
    if bucket in (".", "..") or not _HOLDER_NAME.fullmatch(bucket):
        # No store takes such a name, and the records' folder is named after it (`state_folder`).
        raise SpecError(f"{url}: not a {kind.holder} name (letters, digits, '.', '-' and '_' only)")
    return BucketPlace(kind.scheme, bucket, prefix.strip("/"))


def version_ns(last_modified: datetime.datetime, etag: str | None) -> int:
    """An object's version as the `mtime_ns` the state store keeps for a file.

    Last-Modified has whole seconds, so its nanoseconds are free to carry a fingerprint of the
    ETag: an object replaced within the same second by one of the same size is still seen as changed.
    The ETag is taken quoted, as S3 gives it everywhere and Azure in a GET but not in a listing.
    """
    seconds = int(last_modified.timestamp())
    quoted = '"' + etag.strip('"') + '"' if etag else ""
    return seconds * 1_000_000_000 + zlib.crc32(quoted.encode()) % 1_000_000_000


class ObjectError(OSError):
    """A request about one object failed; its text is the one-line reason (`no such key`, `access denied`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, reason)


def _obstore() -> ModuleType:
    """The obstore module, or the one-line error that names the extra to install."""
    try:
        import obstore
    except ImportError:
        raise CannotRunError(f"object storage needs the obstore module: {EXTRA}") from None
    return obstore


_stores: dict[tuple[str, str], ObjectStore] = {}
_stores_lock = threading.Lock()


def stall_seconds() -> float:
    """How long a request may wait for the store's next byte: $THUMBCLI_S3_TIMEOUT seconds, else STALL_SECONDS.

    A stalled response (the store took the request and sends nothing) fails that one object with
    `timed out` after about RETRY_STALLS such waits, while a large object read steadily takes as
    long as it needs (up to REQUEST_SECONDS).
    """
    setting = os.environ.get(TIMEOUT_SETTING, "").strip()
    if not setting:
        return STALL_SECONDS
    try:
        seconds = float(setting)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= REQUEST_SECONDS:
        raise SpecError(f"{TIMEOUT_SETTING}={setting}: give seconds, more than 0 and at most {REQUEST_SECONDS}")
    return seconds


def _store(place: BucketPlace) -> ObjectStore:
    """The client of one bucket, made once per process and shared by every thread."""
    with _stores_lock:
        store = _stores.get((place.scheme, place.bucket))
        if store is None:
            kind = kind_of(place.scheme)
            assert kind is not None and kind.client, place.scheme  # parse() refuses the rest
            client: Any = getattr(_obstore().store, kind.client)
            config, endpoint = kind.settings()
            stall = stall_seconds()
            store = client(
                place.bucket,
                config=config,
                client_options={
                    "allow_http": endpoint.startswith("http://"),
                    "timeout": datetime.timedelta(seconds=max(REQUEST_SECONDS, stall)),
                    "read_timeout": datetime.timedelta(seconds=stall),
                    "connect_timeout": datetime.timedelta(seconds=min(5.0, stall)),
                },
                retry_config={
                    "max_retries": RETRIES,
                    "retry_timeout": datetime.timedelta(seconds=RETRY_STALLS * stall),
                    "backoff": {
                        "init_backoff": datetime.timedelta(milliseconds=100),
                        "max_backoff": datetime.timedelta(seconds=5),
                        "base": 2,
                    },
                },
            )
            _stores[(place.scheme, place.bucket)] = store
        return store


#: S3 error codes as the one-line reason of an object's failure.
_CODES = {
    "NoSuchKey": "no such key",
    "NoSuchBucket": "no such bucket",
    "AccessDenied": "access denied",
    "InvalidAccessKeyId": "access denied (unknown access key)",
    "SignatureDoesNotMatch": "access denied (wrong secret key)",
    "SlowDown": "throttled by the object store (after retries)",
    "PreconditionFailed": "changed while being read",
    # Azure Blob Storage's
    "BlobNotFound": "no such key",
    "ContainerNotFound": "no such container",
    "AuthenticationFailed": "access denied",
    "AuthorizationFailure": "access denied",
    "AuthorizationPermissionMismatch": "access denied",
    "InvalidAuthenticationInfo": "access denied",
    "ServerBusy": "throttled by the object store (after retries)",
    "ConditionNotMet": "changed while being read",
}


#: object_store's words for a key it cannot name (an empty, '.' or '..' segment, a control character).
_UNNAMABLE = re.compile(r'(?:Error parsing Path|invalid path: Path) "(.*?)"(?= contained|: Encountered)', re.DOTALL)


def _shown(key: str) -> str:
    """A key for one line: its control characters escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda found: f"\\x{ord(found.group()):02x}", key)


def _reason(exc: Exception) -> str:
    """The one-line reason of a failed request, without the request's URL or signature."""
    text = str(exc)
    invalid = _UNNAMABLE.search(text)
    if invalid is not None:
        return f"key {_shown(invalid.group(1))} cannot be read by this client"
    code = re.search(r"<Code>([A-Za-z]+)</Code>", text)
    if code is not None:
        return _CODES.get(code.group(1), code.group(1))
    if isinstance(exc, FileNotFoundError) or "NotFound" in type(exc).__name__:
        return "no such key"
    if isinstance(exc, PermissionError) or type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
        return "access denied"
    if _unreachable(text):
        return "object store not reachable (connection refused)"
    if "kind: Timeout" in text or "timed out" in text.lower():
        return "timed out"
    status = re.search(r"status code: (\d{3}[^:<]*)", text)
    if status is not None:
        return f"object store answered {status.group(1).strip()}"
    return text.splitlines()[0].strip()[:200] if text.strip() else type(exc).__name__


def _unreachable(text: str) -> bool:
    return "ConnectionRefused" in text or "Connection refused" in text


def _failed(exc: Exception, what: str) -> OSError:
    """The exception to raise for a failed request: the whole run stops if the endpoint itself is gone."""
    if _unreachable(str(exc)):
        raise EndpointUnreachable(f"{what}: {_reason(exc)}") from None
    return ObjectError(_reason(exc))


#: One object of a listing: (name within its folder, size, version_ns).
ListedFile = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class UnreadableKey:
    """A key object_store cannot name (S3 allows `a//b.jpg`, `x/../y.jpg`), met in a listing that goes on past it.

    object_store refuses the whole page of 1,000 keys it is on. The page's keys outside `folder`
    are listed again folder by folder; those in `folder` that sort between `after` and it cannot
    be, and count as present (nothing of theirs is pruned). The keys that begin as it does, up to
    `resume`, cannot be named either, and are passed over with it.
    """

    #: The bucket's URL, `s3://bucket`.
    bucket_url: str
    key: str
    why: str
    folder: str
    after: str
    resume: str

    @property
    def url(self) -> str:
        """The key's URL, its control characters escaped."""
        return f"{self.bucket_url}/{_shown(self.key)}"

    @property
    def reason(self) -> str:
        """The one-line reason of its failure."""
        return f"key cannot be read by this client ({self.why})"

    def hides(self, key: str) -> bool:
        """Whether `key` may exist unseen beside it."""
        return key.startswith(self.folder) and self.after < key < self.resume


def _is_control(char: str) -> bool:
    return char < " " or char == "\x7f"


def _unnamable_part(key: str) -> tuple[str, str, str]:
    """Why object_store cannot name `key`, the folder where it goes wrong, and the first name past every
    key beginning as it does, where the listing goes on: (why, folder, resume). ValueError if it can."""
    segments = key.split("/")
    for index, segment in enumerate(segments):
        folder = "".join(f"{part}/" for part in segments[:index])
        if segment in (".", "..") or (segment == "" and 0 < index < len(segments) - 1):
            why = "empty path segment" if segment == "" else f"a '{segment}' path segment"
            return why, folder, f"{folder}{segment}0"  # '0' sorts right after '/'
        control = next((at for at, char in enumerate(segment) if _is_control(char)), None)
        if control is not None:
            after = ord(segment[control]) + 1
            while _is_control(chr(after)):
                after += 1
            return "a control character", folder, f"{folder}{segment[:control]}{chr(after)}"
    raise ValueError(f"object_store names {key!r}")


#: An object's metadata as obstore lists it, or a key it cannot name.
_Listed = Union["ObjectMeta", UnreadableKey]


def _listed(store: ObjectStore, bucket_url: str, folder: str, after: str) -> Iterator[_Listed]:
    """Every object under `folder` ('' or ending in '/') after the key `after`, in key order, past unreadable keys."""
    import obstore

    while True:
        try:
            for chunk in obstore.list(store, prefix=folder or None, offset=after or None, chunk_size=1000):
                for meta in chunk:
                    after = meta["path"]
                    yield meta
            return
        except Exception as exc:
            invalid = _UNNAMABLE.search(str(exc))
            if invalid is None:
                raise
            key = invalid.group(1)
            try:
                why, bad_folder, resume = _unnamable_part(key)
            except ValueError:
                raise exc from None
            if not key.startswith(folder) or key <= after:
                raise
        around, hidden_in = _around(store, bucket_url, folder, bad_folder, after, key)
        yield from sorted(around, key=lambda item: item.key if isinstance(item, UnreadableKey) else item["path"])
        yield UnreadableKey(bucket_url, key, why, hidden_in, after, resume)
        after = resume  # a listing starts after a key: `resume` itself is looked up
        try:
            yield obstore.head(store, resume)
        except Exception as exc:
            if _failed(exc, f"cannot look up {bucket_url}/{resume}").strerror != "no such key":
                raise


def _around(
    store: ObjectStore, bucket_url: str, folder: str, bad_folder: str, after: str, key: str
) -> tuple[list[_Listed], str]:
    """The objects between `after` and `key` outside `bad_folder`, from listings of each folder from `folder`
    down to it, and the folder whose own objects in that range could not be listed."""
    import obstore

    found: list[_Listed] = []
    current = folder
    while current != bad_folder:
        try:
            listing = obstore.list_with_delimiter(store, prefix=current.rstrip("/") or None)
        except Exception as exc:
            if _UNNAMABLE.search(str(exc)) is None:
                raise
            return found, current  # another key it cannot name sits right here
        found.extend(meta for meta in listing["objects"] if after < meta["path"] < key)
        toward = bad_folder[: bad_folder.index("/", len(current)) + 1]
        for sub in (f"{prefix}/" for prefix in listing["common_prefixes"]):
            if sub == toward or sub > key:
                continue
            if after.startswith(sub):
                found.extend(_listed(store, bucket_url, sub, after))
            elif sub > after:
                found.extend(_listed(store, bucket_url, sub, ""))
        current = toward
    return found, bad_folder


def list_folders(place: BucketPlace) -> Iterator[tuple[str, list[ListedFile]] | UnreadableKey]:
    """Every object below `place` as (folder relative to the prefix, its objects), one whole folder at a time.

    A listing comes in key order, where a folder's own objects may sit on either side of its
    subfolders' ('a/m', 'a/sub/x', 'a/z'): a folder is yielded once the listing has moved past
    everything under it, so each batch holds all of a folder's objects. Keys ending in '/'
    (folder markers) are left out; a key object_store cannot name is yielded as an UnreadableKey
    where it is met. Raises ObjectError when the listing fails.
    """
    _obstore()  # the one-line error when it is missing
    store = _store(place)
    start = f"{place.prefix}/" if place.prefix else ""
    # Folders still open, outermost first: each is an ancestor of (or is) the last key's folder.
    open_folders: list[tuple[str, list[ListedFile]]] = []
    try:
        for meta in _listed(store, place.at("").url, start, ""):
            if isinstance(meta, UnreadableKey):
                yield meta
                continue
            relpath = meta["path"][len(start) :]
            reldir, _, name = relpath.rpartition("/")
            if not name:
                continue
            while open_folders and not _contains(open_folders[-1][0], reldir):
                yield open_folders.pop()
            if not open_folders or open_folders[-1][0] != reldir:
                open_folders.append((reldir, []))
            open_folders[-1][1].append((name, meta["size"], version_ns(meta["last_modified"], meta["e_tag"])))
    except Exception as exc:  # obstore raises its own family and plain OSError subclasses alike
        raise _failed(exc, f"cannot list {place.url}") from None
    while open_folders:
        yield open_folders.pop()


def _contains(folder: str, reldir: str) -> bool:
    return not folder or reldir == folder or reldir.startswith(folder + "/")


def existing_objects(urls: Iterable[str]) -> set[str]:
    """Which of `urls` name an object that exists (or may: unseen beside a key the listing could not read),
    from one listing per bucket (of the keys' common folder)."""
    keys_by_bucket: dict[BucketPlace, list[str]] = {}
    for url in urls:
        place = parse(url)
        keys_by_bucket.setdefault(place.at(""), []).append(place.prefix)
    found: set[str] = set()
    for bucket, keys in keys_by_bucket.items():
        place = bucket.at(os.path.commonpath([key.rpartition("/")[0] for key in keys]))
        unreadable: list[UnreadableKey] = []
        for listed in list_folders(place):
            if isinstance(listed, UnreadableKey):
                unreadable.append(listed)
                continue
            reldir, files = listed
            folder = bucket.at(place.key(reldir) if reldir else place.prefix)
            found.update(f"{folder.url}/{name}" for name, _, _ in files)
        found.update(f"{bucket.url}/{key}" for key in keys if any(bad.hides(key) for bad in unreadable))
    return found


@dataclass(frozen=True, slots=True)
class ReadObject:
    """An object's bytes as read, and its size and version at the time."""

    data: bytes
    size: int
    version_ns: int


def read_object(
    url: str, size: int, max_file_size: int, header_check: Callable[[bytes], None] | None = None
) -> ReadObject:
    """Read a whole object, refusing it by its listed size before any byte, and by `header_check` on its header.

    An object over HEADER_BYTES is read as its header first and then the rest, both pinned to
    the same ETag: a replacement between the two reads fails the object rather than mixing them.
    """
    _obstore()  # the one-line error when it is missing
    import obstore

    if size > max_file_size:
        raise FileRejected(f"file is {size} bytes, over the max-file-size limit of {max_file_size}")
    place = parse(url)
    store = _store(place)
    try:
        if header_check is None or size <= HEADER_BYTES:
            got = obstore.get(store, place.prefix)
            data = bytes(got.bytes())
        else:
            got = obstore.get(store, place.prefix, options={"range": (0, HEADER_BYTES)})
            head = bytes(got.bytes())
            header_check(head)
            pinned = {"range": (HEADER_BYTES, size), "if_match": got.meta["e_tag"]}
            rest = obstore.get(store, place.prefix, options=pinned)  # type: ignore[arg-type]
            data = head + bytes(rest.bytes())
    except (FileRejected, EndpointUnreachable):
        raise
    except Exception as exc:
        raise _failed(exc, f"cannot read {url}") from None
    meta = got.meta
    if len(data) > max_file_size:
        raise FileRejected(f"file grew past the max-file-size limit of {max_file_size} while being read")
    return ReadObject(data, meta["size"], version_ns(meta["last_modified"], meta["e_tag"]))


def fetch_object(url: str) -> bytes | None:
    """A small object's bytes (a manifest), or None when there is no such key."""
    _obstore()  # the one-line error when it is missing
    import obstore

    place = parse(url)
    store = _store(place)
    try:
        return bytes(obstore.get(store, place.prefix).bytes())
    except Exception as exc:
        failure = _failed(exc, f"cannot read {url}")
        if failure.strerror == "no such key":
            return None
        raise failure from None


def put_object(url: str, data: bytes, content_type: str, cache_control: str) -> None:
    """Store `data` at `url` in one PUT (whole or not at all, as object stores write), with its headers."""
    _obstore()  # the one-line error when it is missing
    import obstore

    place = parse(url)
    attributes: dict[str, str] = {"Content-Type": content_type}
    if cache_control:
        attributes["Cache-Control"] = cache_control
    try:
        obstore.put(_store(place), place.prefix, data, attributes=attributes)
    except Exception as exc:
        raise _failed(exc, f"cannot write {url}") from None


def copy_object(from_url: str, to_url: str) -> None:
    """Copy an object to another key of its bucket, on the store's side (its headers go with it)."""
    _obstore()  # the one-line error when it is missing
    import obstore

    source, target = parse(from_url), parse(to_url)
    if source.at("") != target.at(""):
        raise ValueError(f"{from_url} -> {to_url}: a copy stays in its bucket")
    store = _store(source)
    try:
        obstore.copy(store, source.prefix, target.prefix)
    except Exception as exc:
        raise _failed(exc, f"cannot copy {from_url}") from None


def delete_objects(urls: Iterable[str]) -> None:
    """Delete objects (an absent one is no error)."""
    _obstore()  # the one-line error when it is missing
    import obstore

    by_bucket: dict[BucketPlace, list[str]] = {}
    for url in urls:
        place = parse(url)
        by_bucket.setdefault(place.at(""), []).append(place.prefix)
    for bucket, keys in by_bucket.items():
        store = _store(bucket)
        try:
            try:
                obstore.delete(store, keys)
            except FileNotFoundError:  # Azure's batch delete fails an absent key (and deletes the others)
                for key in keys:
                    with contextlib.suppress(FileNotFoundError):
                        obstore.delete(store, key)
        except Exception as exc:
            raise _failed(exc, f"cannot delete from {bucket.url}") from None


def state_folder(url: str) -> str:
    """The local folder that keeps the records (and lock) of a bucket destination, one per bucket and prefix.

    $XDG_STATE_HOME/thumbcli/buckets/<bucket>/<prefix with '/' as '_'>-<hash> (`azure-containers`
    for `az://`: each store its own): the records stay with the client that writes, as a tree's
    stay beside it; the hash keeps two prefixes that spell alike apart.
    """
    place = parse(url)
    kind = kind_of(url)
    assert kind is not None  # parse() took it
    home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", place.prefix)[:80] or "_"
    digest = zlib.crc32(place.url.encode()) & 0xFFFFFFFF
    return os.path.join(home, "thumbcli", kind.state_folder, place.bucket, f"{readable}-{digest:08x}")


def stat_object(url: str) -> tuple[int, int] | None:
    """An object's (size, version_ns) from a HEAD request; None when there is no such key."""
    _obstore()  # the one-line error when it is missing
    import obstore

    place = parse(url)
    try:
        meta = obstore.head(_store(place), place.prefix)
    except Exception as exc:
        failure = _failed(exc, f"cannot look up {url}")
        if failure.strerror == "no such key":
            return None
        raise failure from None
    return meta["size"], version_ns(meta["last_modified"], meta["e_tag"])
