"""The parent's end of a worker's seccomp listener: which forbidden system call a decoder tried, by name.

A filter that kills (SIGSYS) leaves the parent no way to learn the call: the kernel tells the
killed process, which has no handler it could trust, and the audit log is root's. So a
worker's filter answers the calls it forbids with a notification instead (SECCOMP_RET_USER_NOTIF,
Linux 5.0 on): the calling thread stops in the kernel, the call never runs, and the listener
the worker passes to its parent at start-up (over a socket pair, SCM_RIGHTS) tells the parent
the call's number. The parent kills the worker and names the call with libseccomp's table.
A worker cannot take the listener back: it closed its own copy before its first file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct

from thumbcli.sandbox import seccomp_library

#: _IOWR('!', 0, struct seccomp_notif): the notification, 80 bytes.
_NOTIF_RECV = 0xC0502100
#: struct seccomp_notif: id, pid, flags, then seccomp_data: nr, arch, instruction pointer, six arguments.
_NOTIF = struct.Struct("<QIIiIQ6Q")


class ForbiddenCallWatch:
    """The listener of one worker's seccomp filter (when it sent one), and the call it reported."""

    def __init__(self) -> None:
        self.fd = -1
        self._parent_end: socket.socket | None = None

    def open(self) -> int:
        """A socket pair for a new worker: the worker's end, which the caller closes once the worker holds it."""
        self.close()
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._parent_end = parent_end
        return worker_end.detach()

    def take_listener(self) -> bool:
        """After the worker said it is ready: take the listener it sent (it sends it first); whether there was one."""
        parent_end, self._parent_end = self._parent_end, None
        if parent_end is None:
            return False
        with parent_end:
            parent_end.setblocking(False)
            try:
                _, fds, _, _ = socket.recv_fds(parent_end, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, OSError):
                return False
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return False
        self.fd = fds[0]
        return True

    def call_tried(self) -> str:
        """The forbidden call the worker tried (the listener is readable), by name: `socket`, `execve`..."""
        notification = bytearray(_NOTIF.size)  # the kernel wants it zeroed
        try:
            fcntl.ioctl(self.fd, _NOTIF_RECV, notification, True)
        except OSError:
            return "unknown"  # the caller ended meanwhile (ENOENT): the worker is ending anyway
        number = _NOTIF.unpack(notification)[3]
        return syscall_name(number)

    def close(self) -> None:
        """Forget the listener (the worker is gone) and a socket pair not used."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._parent_end is not None:
            with contextlib.suppress(OSError):
                self._parent_end.close()
            self._parent_end = None


def syscall_name(number: int) -> str:
    """The name of system call `number` on this machine, or `system call N` where libseccomp does not know it."""
    seccomp = seccomp_library()
    try:
        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, number) if seccomp is not None else b""
    except (OSError, ValueError):  # not a call libseccomp knows
        return f"system call {number}"
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    return text if text.isidentifier() else f"system call {number}"
