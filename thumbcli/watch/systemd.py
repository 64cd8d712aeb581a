"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET says the service is ready, reloading or stopping."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (READY=1, RELOADING=1, STOPPING=1, STATUS=...) to the service manager; False if none listens."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True
