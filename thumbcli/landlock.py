"""Landlock through its three system calls (ctypes): a process gives up the file system but what it names.

No binding is needed for three calls and two structures, and none of those on PyPI is
maintained. Each feature is used only when the kernel's ABI version has it: file rights
(ABI 1), moving files between folders (2), truncating (3), TCP bind and connect (4), device
ioctls (5), abstract UNIX sockets and signals beyond the domain (6). A kernel without
Landlock (ENOSYS, or EOPNOTSUPP when it is built in but off) leaves the process as it was.
"""

from __future__ import annotations

import ctypes
import os

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_TRUNCATE, _IOCTL_DEV = 1 << 14, 1 << 15
#: Every file-system right of each ABI version (EXECUTE, WRITE_FILE, ... MAKE_SYM; REFER; TRUNCATE; IOCTL_DEV).
_FS_RIGHTS_OF_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_RIGHTS = 0b11  # BIND_TCP, CONNECT_TCP (ABI 4)
_SCOPES = 0b11  # ABSTRACT_UNIX_SOCKET, SIGNAL (ABI 6)


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where it has none or has it switched off."""
    try:
        version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(0, int(version))


def restrict(readable: list[str]) -> bool:  # pragma: no cover - runs in the worker
    """Allow this process (and threads it starts) to read beneath `readable` and nothing else; whether it took.

    Needs PR_SET_NO_NEW_PRIVS first. Checked after: a folder not named is refused.
    """
    abi = abi_version()
    if abi < 1:
        return False
    libc = _libc()
    fs_rights = _FS_RIGHTS_OF_ABI[max(version for version in _FS_RIGHTS_OF_ABI if version <= abi)]
    attr = _RulesetAttr(fs_rights, _NET_RIGHTS if abi >= 4 else 0, _SCOPES if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # older kernels refuse the fields they do not know
    rules = [(path, _READ_FILE | (_READ_DIR if os.path.isdir(path) else 0)) for path in readable]
    return _restrict_self(libc, attr, size, rules, missing_ok=True) and _refused("/")


def restrict_writes(beneath: list[str], files: list[str]) -> bool:  # pragma: no cover - runs in the server
    """Allow this process (and what it starts) to create, change or remove only beneath `beneath` and write
    only `files` among the others (such as /dev/null); reading and running stay as they are. Whether it took.

    Sets PR_SET_NO_NEW_PRIVS (the kernel wants it of a process without CAP_SYS_ADMIN). Descriptors
    open already keep their rights.
    """
    abi = abi_version()
    if abi < 1:
        return False
    libc = _libc()
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # Every right of the ABI but reading, running and device ioctls: those are not confined.
    handled = _FS_RIGHTS_OF_ABI[max(version for version in _FS_RIGHTS_OF_ABI if version <= abi)]
    handled &= ~(_READ_FILE | _READ_DIR | _EXECUTE | _IOCTL_DEV)
    attr = _RulesetAttr(handled, 0, 0)
    rules = [(path, handled) for path in beneath] + [(path, handled & (_WRITE_FILE | _TRUNCATE)) for path in files]
    return _restrict_self(libc, attr, 8, rules, missing_ok=False) and _write_refused("/dev/full")


def _restrict_self(  # pragma: no cover - runs confined
    libc: ctypes.CDLL, attr: _RulesetAttr, size: int, rules: list[tuple[str, int]], *, missing_ok: bool
) -> bool:
    """Create a ruleset from `attr` (`size` bytes of it), allow each (path, rights) beneath it, restrict
    this process to it. Whether all of it took; a path that cannot be opened is skipped when `missing_ok`."""
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                if missing_ok:
                    continue
                return False
            try:
                rule = _PathBeneathAttr(rights, fd)
                if libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), _RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                    return False
            finally:
                os.close(fd)
        return bool(libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) >= 0)
    finally:
        os.close(ruleset)


def _write_refused(path: str) -> bool:  # pragma: no cover - runs in the server
    """Whether opening `path` to write is now refused (a device that takes no data: nothing happens if not)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def _refused(path: str) -> bool:  # pragma: no cover - runs in the worker
    """Whether reading `path` is now refused (the check that the restriction is in force)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except PermissionError:
        return True
    except OSError:
        return False
    return False
