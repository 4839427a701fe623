"""systemd's readiness protocol (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET.

A unit with Type=notify is "started" only once the daemon says READY=1, i.e. once its programs
are attached and its /metrics answers; a daemon that fails before that fails the start job.
Outside systemd (no $NOTIFY_SOCKET) every call does nothing.
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send STATE ("READY=1", "STOPPING=1", "STATUS=..."); True if a manager was told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):          # abstract socket namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError:
        return False                  # a vanished manager must not stop the daemon
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    return notify("STOPPING=1")
