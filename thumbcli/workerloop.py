"""A resample worker's side of the pipes: load, confine itself, then resample each file the parent names, to the end.

Kept apart from `workers` (the parent's side) because it runs in another interpreter: what it
imports is what every worker pays for at its start.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import mmap
import os
import resource
import signal
import socket
import traceback
import warnings
from collections.abc import Iterable
from typing import NoReturn

from thumbcli import decoders, formats, sandbox, unexpected, wire

#: A worker's process name (its comm, as ps and top show it), spawned or forked alike.
PROCESS_NAME = b"thumbcli-worker"
READY = b"R"  # then one byte: the sandbox layers in force, a bit each (sandbox.LAYERS order)
#: Why a local file handed to a worker was not decoded: it is shorter than when the parent opened it.
SHRANK = "cannot read: it shrank while it was read"
#: A worker's private memory (RLIMIT_DATA) is limited to this many times its memory ceiling.
_DATA_LIMIT_PER_CEILING = 2


def serve(
    requests: int,
    replies: int,
    parent: int,
    slots: list[int],
    cpu: int | None = None,
    memory_ceiling: int = 0,
    layers: tuple[sandbox.Layer, ...] = (),
    account: tuple[int, int] | None = None,
    watch: int | None = None,
    wheels: Iterable[str] = decoders.COMMON_DECODERS,
) -> NoReturn:  # pragma: no cover - runs in the worker
    """The worker's loop: read a request, resample the file sent with it (or the memory file it names), reply.

    It leaves at the end of the requests. `requests` is a Unix socket (a request is a message, with
    the descriptor of the local file it names), `replies` a pipe.

    `memory_ceiling`: the resident memory past which the parent kills this worker (0: none).
    `layers`: the sandbox layers to confine itself with once its libraries are loaded;
    `account`: the (uid, gid) its `user` layer switches to; `watch`: a socket to hand its filter's listener to.
    `wheels`: the decoders whose wheels to import before switching to an account that could not
    import them later; a file needing another is answered NEEDS_WHEEL, and this worker leaves.
    """
    stay_with(parent)
    preloaded = load(account, wheels)
    run(requests, replies, slots, preloaded, cpu, memory_ceiling, layers, account, watch)


def stay_with(parent: int) -> None:  # pragma: no cover - runs in the worker
    """Leave with `parent` (this process's parent), and only then: never on Ctrl-C or a service manager's SIGTERM."""
    ignore_stop_signals()
    _die_with(parent)


def ignore_stop_signals() -> None:  # pragma: no cover - runs in the worker
    """Ctrl-C and a service manager's SIGTERM reach the whole process group: the parent decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def load(account: tuple[int, int] | None, wheels: Iterable[str]) -> frozenset[str] | None:  # pragma: no cover
    """Load libvips (and, for an `account` that could not import them later, the decoders of `wheels`).

    What a worker loads before its first file, once per worker, or once for all of them in a
    fork server. The wheels imported before switching to an account that cannot import others;
    None when imports stay open.
    """
    # What a decoder has to say about a file reaches the parent in the reply, not on stderr
    # (Pillow warns of each odd EXIF tag it skips: cron mail, not news).
    logging.getLogger("pyvips").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    from thumbcli import resample

    resample.configure_libvips()
    resample.log_only_libvips_errors()
    if account is None or sandbox.python_readable_by(account):
        return None
    # Its account cannot read where the interpreter or the wheels live: nothing could load later.
    preloaded = frozenset(wheels)
    decoders.preload(preloaded)
    return preloaded


def run(
    requests: int,
    replies: int,
    slots: list[int],
    preloaded: frozenset[str] | None,
    cpu: int | None,
    memory_ceiling: int,
    layers: tuple[sandbox.Layer, ...],
    account: tuple[int, int] | None,
    watch: int | None,
) -> NoReturn:  # pragma: no cover - runs in the worker
    """Confine this loaded worker (see `load`), say it is ready, and answer requests to their end (see `serve`)."""
    name_process(PROCESS_NAME)
    if cpu is not None:
        # libvips hands every image between this thread and a thread of its own about 25
        # times: on one core those hand-offs need no cross-core wakeup.
        with contextlib.suppress(OSError):  # the core went offline since
            os.sched_setaffinity(0, {cpu})
    # A decoder crashing on a hostile file is reported; its core dump would only litter the folder.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_ceiling:
        # The parent watches the resident size ten times a second and names the ceiling when it
        # kills; a bomb can allocate gigabytes between two looks. The kernel refuses private memory
        # past twice the ceiling at once beyond what the libraries took (that decode fails as out
        # of memory), leaving the watch to act first on anything slower.
        data = _DATA_LIMIT_PER_CEILING * memory_ceiling + _private_data_bytes()
        with contextlib.suppress(ValueError, OSError):  # a lower hard limit stays
            resource.setrlimit(resource.RLIMIT_DATA, (data, data))
    channel = socket.socket(fileno=requests)
    # Confined before the first file, with every library the decoders need already loaded.
    applied = sandbox.confine(layers, account, watch)
    wire.write_all(replies, READY + bytes([sum(1 << sandbox.LAYERS.index(layer) for layer in applied)]))
    while True:
        received = wire.receive_request(channel)
        if received is None:
            os._exit(0)
        message, source = received
        header_length, data_length, slot = wire.REQUEST.unpack_from(message)
        settings = wire.decode_settings(message[wire.REQUEST.size : wire.REQUEST.size + header_length])
        try:
            view, mapped = _source_view(slots[slot] if source is None else source, data_length)
        except _Unreadable as exc:
            reply = wire.Reply(wire.UNREADABLE, reason=str(exc))
        else:
            reply = _reply_for(view, settings, preloaded)
            if mapped is not None:
                with contextlib.suppress(BufferError):  # a view of it outlived the file: unmapped when collected
                    view.release()
                    mapped.close()
        finally:
            if source is not None:
                os.close(source)  # a mapping keeps its own reference
        try:
            wire.write_all(replies, wire.encode_reply(reply))
        except BrokenPipeError:
            os._exit(0)
        if not gc.isenabled():
            # Started with the collector off: what the imports made (the first file's decoder's too) stays.
            gc.freeze()
            gc.enable()
        if reply.status == wire.BUG:
            os._exit(1)
        if reply.status == wire.NEEDS_WHEEL:
            os._exit(0)  # the parent starts a worker with that wheel, and sends this file and those behind it again


class _Unreadable(Exception):
    """The source handed over cannot be read (a disk's error, or it shrank): the reason, one line."""


def _source_view(fd: int, length: int) -> tuple[memoryview, mmap.mmap | None]:  # pragma: no cover - runs in the worker
    """The first `length` bytes of file `fd`, mapped where the file system allows (and the mapping), else read.

    A mapped local file is read from the page cache with no copy at all (libvips and libjpeg-turbo
    read a JPEG where it is mapped). A file that shrinks while mapped ends this worker with SIGBUS,
    which the parent reports as that file's. Some files cannot be mapped (sysfs, some FUSE mounts).
    """
    if not length:
        return memoryview(b""), None
    try:
        mapped = mmap.mmap(fd, length, prot=mmap.PROT_READ)
    except ValueError:  # Python's own check: the file is shorter than the parent measured it
        raise _Unreadable(SHRANK) from None
    except OSError:
        data = bytearray(length)
        got = 0
        try:
            while got < length and (count := os.preadv(fd, [memoryview(data)[got:]], got)):
                got += count
        except OSError as exc:
            raise _Unreadable(f"cannot read: {(exc.strerror or str(exc)).lower()}") from None
        if got < length:
            raise _Unreadable(SHRANK) from None
        return memoryview(data), None
    return memoryview(mapped), mapped


def _reply_for(
    view: memoryview, settings: wire.Settings, loaded_before_switch: frozenset[str] | None
) -> wire.Reply:  # pragma: no cover - runs in the worker
    """The reply to one file: its thumbnails, or why not (NEEDS_WHEEL: a wheel not in `loaded_before_switch`).

    `loaded_before_switch`: the wheels imported before switching to an account that cannot
    import others; None when imports stay open.
    """
    from thumbcli import resample
    from thumbcli.errors import FileRejected

    if loaded_before_switch is not None:
        # Asked before the decode, not when its import fails: a wheel may import from a folder this
        # account reads (a virtualenv) and still need standard modules from one it cannot (/root).
        needed = formats.sniff(view[:1024])
        if needed is not None and needed.decoder and needed.decoder not in loaded_before_switch:
            return wire.Reply(wire.NEEDS_WHEEL, reason=needed.decoder)
    try:
        made = resample.resample(
            view, settings.specs, settings.limits, strict=settings.strict, decode_for=settings.decode_for
        )
    except resample.DecodeFailed as exc:
        return wire.Reply(wire.FAILED, reason=str(exc), detail=exc.detail)
    except decoders.MissingDecoder as exc:
        if loaded_before_switch is not None and exc.decoder not in loaded_before_switch:
            return wire.Reply(wire.NEEDS_WHEEL, reason=exc.decoder)
        return wire.Reply(wire.FAILED, reason=str(exc))
    except FileRejected as exc:
        return wire.Reply(wire.FAILED, reason=str(exc))
    except MemoryError:
        return wire.Reply(wire.FAILED, reason="ran out of memory", detail="MemoryError")
    except Exception as exc:
        # Inside the per-file boundary: a third-party parser raises anything on hostile bytes
        # (a UnicodeDecodeError from a video's tags, a struct.error from EXIF). That is this
        # file's failure, recorded as such, not a bug to stop the run on.
        reason, detail = unexpected.reason_and_detail(exc, formats.sniff(view[:1024]))
        return wire.Reply(wire.FAILED, reason=reason, detail=detail)
    except BaseException:
        return wire.Reply(wire.BUG, detail=traceback.format_exc())
    return wire.Reply(wire.MADE, tuple(made.thumbnails), detail=made.detail, warning=made.warning)


def _private_data_bytes() -> int:  # pragma: no cover - runs in the worker
    """The private memory this process has mapped (VmData: what RLIMIT_DATA counts); 0 when unknown."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmData:")).split()[1]) * 1024
    return 0


def _die_with(parent: int) -> None:  # pragma: no cover - runs in the worker
    """Be killed when the parent ends, even mid-decode (Linux); leave now if it already has."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def name_process(name: bytes) -> None:  # pragma: no cover - runs in the worker
    """Call this process `name` (at most 15 bytes) where ps and top show it: forks would all look like their server."""
    _prctl(15, ctypes.create_string_buffer(name[:15]))  # PR_SET_NAME


def _prctl(option: int, argument: object) -> None:  # pragma: no cover - runs in the worker
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, argument)
