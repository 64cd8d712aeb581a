"""The confinement of a resample worker: what a compromised decoder may no longer do, layer by layer.

A decoder (libvips' loaders, libheif, LibRaw, FFmpeg, libjxl) parses hostile bytes in C; one
exploited bug there runs the attacker's code with the worker's rights. Once its libraries are
loaded and before it takes its first file, the worker confines itself, each layer detected
rather than assumed:

- `nonewprivs`: prctl(PR_SET_NO_NEW_PRIVS): no exec can gain privileges (setuid binaries, file
  capabilities); also what lets an unprivileged process load a seccomp filter.
- `seccomp`: a seccomp-bpf filter (libseccomp, through pyseccomp) that allows by default and
  refuses what a decoder never needs: sockets (EPERM), opening a file to write or create,
  removing, renaming, linking or changing files (EPERM); starting a program or a process,
  tracing or reading another process, loading kernel code or keys, mounting (the worker is
  killed: SIGSYS). Threads stay allowed: libvips uses them. Implies `nonewprivs`.
- `landlock`: where the kernel has Landlock, the worker may read only the files that late
  loading needs (the interpreter's and the libraries' folders, fonts, its own /proc entry),
  create or change none, and (ABI 4 on) bind or connect no TCP port, (ABI 6 on) signal no
  process outside itself: a compromised decoder cannot read the user's files to smuggle them
  out in a thumbnail. Implies `nonewprivs`.
- `rlimits`: no file may grow (RLIMIT_FSIZE 0), no core dumps, a few descriptors beyond
  those open; for a worker that is not root, at most a few hundred more threads than its
  user has (RLIMIT_NPROC counts every process and thread of a uid, system-wide: a bound
  tight enough to stop libvips' threads would stop those of the other workers; processes
  are the filter's to refuse). Root is not bound by it.
- `environment`: the worker starts with only the variables libvips, the decoders and Python
  need (no credentials such as AWS_*, AZURE_*, *_TOKEN, *_SECRET, *PASSWORD*).
- `netns`: a network namespace of its own, with no interface but a loopback that is down
  (as root; otherwise inside a user namespace of its own, where the kernel allows one): a
  socket that got past the filter reaches nothing, not even 127.0.0.1.
- `caps`: no capabilities, in any set: none of root's powers over the system (overriding
  file permissions, ptrace, raw sockets, mounts...).
- `user`: a worker of a run started as root becomes an unprivileged user (THUMBCLI_SANDBOX_USER,
  `nobody` when unset) once its imports are done: the files only root may read are out of its
  reach, and it cannot signal, trace or open the /proc files of root's processes. Its interpreter
  may live where that user cannot read (/root/.pyenv): such a worker imports what plain JPEGs need
  first (`python_readable_by`), and is replaced by one that imports another decoder's wheel too
  when a file needs it (`workerloop`); the sources reach it as memory files it already holds. A run
  that is not root is unprivileged already.

THUMBCLI_SANDBOX chooses them (THUMBCLI_SANDBOX_USER the user of `user`): unset or `all` for
every layer, a comma-separated list of layers, or `none` (logged loudly).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pwd
import re
import resource
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from thumbcli import landlock

log = logging.getLogger(__name__)

Layer = Literal["netns", "caps", "user", "nonewprivs", "seccomp", "landlock", "rlimits", "environment"]
LAYERS: tuple[Layer, ...] = get_args(Layer)
#: The environment variable that chooses the layers.
SETTING = "THUMBCLI_SANDBOX"
#: The environment variable that names the user (or uid) of the `user` layer.
USER_SETTING = "THUMBCLI_SANDBOX_USER"
#: The user of the `user` layer when USER_SETTING is unset.
DEFAULT_USER = "nobody"
#: Threads a worker that is not root may start beyond the processes and threads its user has.
SPARE_TASKS = 512
#: Descriptors a confined worker may open beyond those it has when it confines itself.
SPARE_DESCRIPTORS = 64

_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS, _PR_GET_SECCOMP = 38, 39, 21
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
#: capset(2)'s header for 64-bit capability sets (two 32-bit words each).
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: Higher than any capability number a kernel has (40 in 6.x): each is dropped from the bounding set.
_CAP_LAST_POSSIBLE = 63
_SECCOMP_MODE_FILTER = 2
#: libseccomp's API level from which it has SCMP_ACT_NOTIFY.
_API_WITH_NOTIFY = 5
_CLONE_THREAD = 0x00010000

#: Variables a worker keeps, by name or by pattern: the interpreter's own, locale and time zone,
#: libvips', glibc's malloc tuning, the decoders' libraries' and where fonts and temporary files are.
_KEPT_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LANGUAGE",
        "TZ",
        "LD_LIBRARY_PATH",
        "LIBHEIF_PLUGIN_PATH",
        SETTING,
        USER_SETTING,
    }
)
_KEPT_PATTERN = re.compile(
    r"(LC_|VIPS_|MALLOC_|GLIBC_TUNABLES$|PYTHON|OMP_|OPENBLAS_|FONTCONFIG_|G_SLICE$|G_DEBUG$|COV_CORE_|COVERAGE_)"
)
#: Never kept, whatever the pattern above says: what looks like a credential.
_SECRET_PATTERN = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|_KEY$|^AWS_|^AZURE_|^AZURITE_|^GOOGLE_|API_KEY", re.IGNORECASE
)

#: Refused with EPERM: any change to the file system.
_REFUSED = (
    "creat",
    "truncate",
    "unlink",
    "unlinkat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "setrlimit",
    "io_uring_setup",  # its requests bypass seccomp
)
#: The worker is stopped and killed, its file failed with the call's name: no decoder does
#: these, a compromised one would (the network: a socket of any kind; a program or a process;
#: another process's memory; kernel code, keys, mounts).
_KILLED = (
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "setns",
    "unshare",
    "bpf",
    "kexec_load",
    "kexec_file_load",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
)
#: Answered ENOSYS: their arguments are in memory a filter cannot read, and glibc falls back to
#: the older call the filter can judge (clone, openat).
_UNKNOWN_TO_CALLERS = ("clone3", "openat2")
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC)


class SandboxSettingError(ValueError):
    """THUMBCLI_SANDBOX names something that is not a layer."""


def chosen_layers(setting: str | None) -> tuple[Layer, ...]:
    """The layers a THUMBCLI_SANDBOX value names: every one when unset, empty, or `all`; none for `none`."""
    text = (setting or "").strip().lower()
    if text in ("", "all"):
        return LAYERS
    if text == "none":
        return ()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LAYERS]
    if unknown:
        raise SandboxSettingError(
            f"{SETTING}={setting}: unknown layer {', '.join(unknown)} (choose from {', '.join(LAYERS)}, all or none)"
        )
    chosen = set(names)
    if chosen & {"seccomp", "landlock"}:
        chosen.add("nonewprivs")  # the kernel confines an unprivileged process only with it
    return tuple(layer for layer in LAYERS if layer in chosen)


def layers_for_workers() -> tuple[Layer, ...]:
    """The layers THUMBCLI_SANDBOX chooses for workers started now (SandboxSettingError for an unknown one)."""
    layers = chosen_layers(os.environ.get(SETTING))
    if not layers:
        _warn_once(
            f"{SETTING}=none: resample workers decode untrusted files UNSANDBOXED; "
            "a decoder exploit runs with all of this user's rights"
        )
    return layers


def warn_of_missing_layers(wanted: Iterable[Layer], applied: Iterable[Layer]) -> None:
    """Say once which chosen layers a worker could not apply (the system lacks them)."""
    missing = [layer for layer in wanted if layer not in applied]
    if missing:
        _warn_once(f"resample workers run without sandbox layers this system lacks: {', '.join(missing)}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log `message` as a warning once per process (every worker of a run would say it again)."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def worker_environment(environ: Mapping[str, str], layers: Iterable[Layer]) -> dict[str, str]:
    """`environ` as a worker gets it: scrubbed to what decoders need when `environment` is a layer."""
    if "environment" not in layers:
        return dict(environ)
    return {
        name: value
        for name, value in environ.items()
        if (name in _KEPT_NAMES or _KEPT_PATTERN.match(name)) and not _SECRET_PATTERN.search(name)
    }


def account_for_workers(layers: Iterable[Layer]) -> tuple[int, int] | None:
    """The (uid, gid) the `user` layer makes a worker started now; None when it has no switch to make.

    None when `user` is not chosen or this run is not root (its workers are unprivileged already).
    SandboxSettingError for a THUMBCLI_SANDBOX_USER that names no user, or root.
    """
    if "user" not in layers or os.geteuid() != 0:
        return None
    name = os.environ.get(USER_SETTING, "").strip() or DEFAULT_USER
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise SandboxSettingError(f"{USER_SETTING}={name}: no such user") from None
        uid = gid = int(name)  # a uid with no entry in the user database (a container's) is one too
    else:
        uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0 or gid == 0:
        raise SandboxSettingError(f"{USER_SETTING}={name}: that is root's uid or group; name an unprivileged user")
    return uid, gid


def python_readable_by(account: tuple[int, int]) -> bool:
    """Whether `account` (uid, gid) may read every folder on sys.path, judged from the modes of it and its parents.

    A worker switched to an account that cannot must import its decoders' wheels before it
    switches (see `user`); one that can loads them when a file first needs them. ACLs are not
    read: a folder an ACL opens is judged closed, which costs only an earlier import.
    """
    uid, gid = account
    folders = {os.path.abspath(entry) for entry in sys.path if entry and os.path.isdir(entry)}
    for folder in folders:
        ancestors = [folder, *(str(parent) for parent in Path(folder).parents)]
        for path in ancestors:
            try:
                info = os.stat(path)
            except OSError:
                return False
            shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
            needed = 0o5 if path == folder else 0o1  # list the folder itself, search its parents
            if (info.st_mode >> shift) & needed != needed:
                return False
    return True


def confine(  # pragma: no cover - runs in the worker
    layers: Iterable[Layer], account: tuple[int, int] | None = None, parent: int | None = None
) -> tuple[Layer, ...]:
    """Apply `layers` (but `environment`, the parent's) to this process; the ones now in force, each checked.

    `account`: the (uid, gid) the `user` layer switches to (see `account_for_workers`).
    `parent`: a Unix socket to the parent, for the listener of the filter's forbidden calls
    (see `forbiddencalls`); closed here. A layer the system lacks (no libseccomp, a kernel
    without seccomp) is left out of the answer rather than failing the worker: the parent
    says which layers are missing.
    """
    wanted = set(layers)
    applied: list[Layer] = []
    libc = ctypes.CDLL(None, use_errno=True)
    # A socket object now: the filter forbids making one (this makes none, but `socket` may not load later).
    to_parent = socket.socket(fileno=parent) if parent is not None else None
    if "seccomp" in wanted:
        # Loaded while the worker is still itself: pyseccomp finds libseccomp through `ldconfig -p`
        # and modules of the standard library that `user`'s account may not be able to read.
        seccomp_library()
    # First: making a namespace needs the capabilities the next layers drop, and the filter kills `unshare`.
    if "netns" in wanted and _own_network(libc):
        applied.append("netns")
    if "caps" in wanted:
        _drop_bounding_set(libc)  # while root still has CAP_SETPCAP for it
    if "user" in wanted and _become(libc, account):
        applied.append("user")
    if "caps" in wanted and _drop_capabilities(libc):
        applied.append("caps")
    if "rlimits" in wanted and _limit_resources():
        applied.append("rlimits")
    if wanted & {"nonewprivs", "seccomp", "landlock"}:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1:
            applied.append("nonewprivs")
    loaded = "seccomp" in wanted and "nonewprivs" in applied and _load_filter(to_parent is not None)
    if loaded and libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) == _SECCOMP_MODE_FILTER:
        applied.append("seccomp")
    if to_parent is not None:
        with to_parent:
            _send_listener(to_parent)
    # After the filter: loading pyseccomp looks libseccomp up with `ldconfig -p`, out of reach under Landlock.
    if "landlock" in wanted and "nonewprivs" in applied and landlock.restrict(readable_paths()):
        applied.append("landlock")
    if "environment" in wanted:
        applied.append("environment")
    return tuple(layer for layer in LAYERS if layer in applied)


def readable_paths() -> list[str]:
    """What a worker may still read under Landlock: where Python, thumbcli, the decoders and their data live."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, package_root}
    # sys.path, but never "" (the folder the run started in: the user's files).
    python.update(os.path.abspath(entry) for entry in sys.path if entry)
    return sorted(path for path in python | set(_SYSTEM_READABLE) if os.path.exists(path))


#: Shared libraries and their data (fontconfig's fonts and cache, zoneinfo, locales), the loader's
#: cache, and what libraries open by name.
_SYSTEM_READABLE = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib",
    "/lib64",
    "/usr/share",
    "/etc/fonts",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/var/cache/fontconfig",
    "/proc/self",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
)


def _own_network(libc: ctypes.CDLL) -> bool:  # pragma: no cover - runs in the worker
    """Move into a network namespace of its own; whether it did (and all of this process did).

    Only while the worker has one thread: a namespace is changed for the calling thread alone, and
    threads started later inherit it.
    """
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return False
        before = os.readlink("/proc/self/ns/net")
    except OSError:
        return False
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    if libc.unshare(flags) != 0:
        return False  # no privilege for it here (and no user namespaces): the filter still refuses sockets
    try:
        return os.readlink("/proc/self/ns/net") != before
    except OSError:
        return False


def _become(libc: ctypes.CDLL, account: tuple[int, int] | None) -> bool:  # pragma: no cover - runs in the worker
    """Switch every uid and gid to `account`'s, with no supplementary group; whether no uid is root now.

    Groups first, the uid last: once no uid is 0, the groups can no longer change.
    """
    if account is not None:
        uid, gid = account
        death_signal = ctypes.c_int(0)
        libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(death_signal), 0, 0, 0)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError:
            return False
        # A change of uid clears the parent-death signal: the worker must still die with its parent.
        libc.prctl(_PR_SET_PDEATHSIG, death_signal.value, 0, 0, 0)
        if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or os.getgroups():
            return False
    return 0 not in os.getresuid()


def _drop_bounding_set(libc: ctypes.CDLL) -> None:  # pragma: no cover - runs in the worker
    """Empty the bounding and ambient sets (the bounding set needs CAP_SETPCAP: before `user` drops it)."""
    for capability in range(_CAP_LAST_POSSIBLE + 1):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)  # fails past the kernel's last one, and without CAP_SETPCAP
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _drop_capabilities(libc: ctypes.CDLL) -> bool:  # pragma: no cover - runs in the worker
    """Empty every capability set (bounding and ambient first, while it may); whether none is left."""
    _drop_bounding_set(libc)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: two words each, all zero
    if libc.capset(header, data) != 0:
        return False
    try:
        with open("/proc/self/status") as status:
            sets = dict(line.split(":\t", 1) for line in status.read().splitlines() if line.startswith("Cap"))
    except OSError:
        return False
    # The bounding set stays full for a process that never had CAP_SETPCAP: no exec can use it (nonewprivs).
    held = (
        ("CapInh", "CapPrm", "CapEff", "CapAmb")
        if os.geteuid() != 0
        else ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd")
    )
    return all(int(sets.get(name, "1"), 16) == 0 for name in held)


def _limit_resources() -> bool:  # pragma: no cover - runs in the worker
    """No file growth, no core dump, a few descriptors beyond those open: whether all took."""
    try:
        highest = max((int(entry) for entry in os.listdir("/proc/self/fd")), default=2)
    except (OSError, ValueError):
        highest = 255
    descriptors = highest + 1 + SPARE_DESCRIPTORS
    limits = [(resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, descriptors)]
    if os.getuid() != 0:  # the kernel does not count root's
        limits.append((resource.RLIMIT_NPROC, _tasks_of_user(os.getuid()) + SPARE_TASKS))
    try:
        for limit, value in limits:
            _soft, hard = resource.getrlimit(limit)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(limit, (value, value))
    except (OSError, ValueError):
        return False
    return True


def _tasks_of_user(uid: int) -> int:  # pragma: no cover - runs in the worker
    """The processes and threads whose real uid is `uid`, as RLIMIT_NPROC counts them (from /proc)."""
    tasks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                tasks += int(fields["Threads"])
        except (OSError, KeyError, ValueError, IndexError):
            continue  # it ended meanwhile
    return tasks


def seccomp_library() -> Any:
    """pyseccomp, or None where it or the libseccomp it wraps cannot be loaded."""
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError):  # RuntimeError: no libseccomp.so on the system
        return None
    return pyseccomp


def _load_filter(notify: bool) -> bool:  # pragma: no cover - runs in the worker
    """Load the filter into this process (every thread started after it inherits it); whether it loaded.

    `notify`: a forbidden call stops its thread and notifies a listener (for the parent), rather
    than killing the process, where libseccomp and the kernel can.
    """
    seccomp = seccomp_library()
    if seccomp is None:
        return False
    if notify and seccomp.get_api() >= _API_WITH_NOTIFY:
        with contextlib.suppress(OSError):  # a kernel before 5.0: killed, unnamed
            return _load_rules(seccomp, seccomp.NOTIFY)
    try:
        return _load_rules(seccomp, seccomp.KILL_PROCESS)
    except OSError:
        return False


def _load_rules(seccomp: Any, killed: int) -> bool:  # pragma: no cover - runs in the worker
    """Load the rules, `killed` the action for the calls that end the worker; True, or OSError."""
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    refused = seccomp.ERRNO(errno.EPERM)
    for name in _REFUSED:
        _add(rules, refused, name)
    for name in _KILLED:
        _add(rules, killed, name)
    for name in _UNKNOWN_TO_CALLERS:
        _add(rules, seccomp.ERRNO(errno.ENOSYS), name)
    # A process only as a thread of this one (pthread_create passes CLONE_THREAD).
    _add(rules, killed, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    # Files open to read only; each rule matches one flag, and the rules of a call add up.
    for name, flags_arg in (("open", 1), ("openat", 2)):
        for flag in _WRITE_FLAGS:
            mask = os.O_ACCMODE if flag in (os.O_WRONLY, os.O_RDWR) else flag
            _add(rules, refused, name, seccomp.Arg(flags_arg, seccomp.MASKED_EQ, mask, flag))
    # Reading a limit stays allowed (glibc's getrlimit is prlimit64 with no new value).
    _add(rules, refused, "prlimit64", seccomp.Arg(2, seccomp.NE, 0, 0))
    rules.load()
    return True


def _send_listener(parent: socket.socket) -> None:  # pragma: no cover - runs in the worker
    """Hand the filter's listener to the parent and close it here: the worker can never answer its own calls."""
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(f"/proc/self/fd/{entry}") == "anon_inode:seccomp notify":
                socket.send_fds(parent, [b"L"], [int(entry)])
                os.close(int(entry))


def _add(rules: Any, action: int, name: str, *args: Any) -> None:  # pragma: no cover - runs in the worker
    """Add one rule, unless this architecture has no such call (aarch64 has no open, fork or creat)."""
    seccomp = seccomp_library()
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
        return
    rules.add_rule(action, name, *args)
