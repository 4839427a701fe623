"""Enter a named network namespace (ip netns) in the calling thread, and come back.

Python 3.11 has no os.setns; libc's setns moves only the calling thread, so the rest of the
process stays where it was. Sockets and netlink handles opened inside stay in that namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def enter(name: str | None):
    """`with enter("lab-a"):` runs the block in namespace lab-a; None means stay where we are."""
    if name is None:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {name!r} does not exist")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def ifindex(ifname: str, netns: str | None = None) -> int:
    """Index of an interface (in a namespace), with a clear error for an unknown one."""
    import socket
    with enter(netns):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            where = f" in network namespace {netns!r}" if netns else ""
            raise ValueError(f"unknown interface {ifname!r}{where}") from None
