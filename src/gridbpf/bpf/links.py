"""Attachments. Each is a context manager; detach() is idempotent; pin() keeps it past us."""
from __future__ import annotations

import ctypes
import os

from . import libbpf as L
from .pins import pin_path


class Link:
    def __init__(self, what: str, owner=None):
        self.what = what
        self._owner = owner        # keeps the program (and its object) alive while attached
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            self._detach()

    def _detach(self) -> None:
        raise NotImplementedError

    def pin(self, name: str) -> str:
        raise NotImplementedError(f"{type(self).__name__} cannot be pinned")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def __del__(self):
        try:
            self.detach()
        except Exception:
            pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.what}{'' if self.attached else ' (detached)'}>"


class LibbpfLink(Link):
    """A struct bpf_link from one of libbpf's attach functions."""

    def __init__(self, ptr: int, what: str, owner=None):
        super().__init__(what, owner)
        self._ptr = ptr

    @property
    def fd(self) -> int:
        return L.bpf_link__fd(self._ptr)

    def _detach(self) -> None:
        L.bpf_link__destroy(self._ptr)

    def pin(self, name: str) -> str:
        path = pin_path(name, create=True)
        L.check(L.bpf_link__pin(self._ptr, path.encode()), f"pinning {self.what} at {path}")
        return path

    def update(self, program) -> None:
        L.check(L.bpf_link__update_program(self._ptr, program._ptr), f"replacing program of {self.what}")


class FdLink(Link):
    """A kernel BPF link known by its fd (from bpf_link_create)."""

    def __init__(self, fd: int, what: str, owner=None):
        super().__init__(what, owner)
        self.fd = fd

    def _detach(self) -> None:
        os.close(self.fd)

    def pin(self, name: str) -> str:
        path = pin_path(name, create=True)
        L.check(L.bpf_obj_pin(self.fd, path.encode()), f"pinning {self.what} at {path}")
        return path

    def update(self, program) -> None:
        """Swap the attached program atomically (no moment without one)."""
        opts = L.LinkUpdateOpts(sz=ctypes.sizeof(L.LinkUpdateOpts))
        L.check(L.bpf_link_update(self.fd, program.fd, ctypes.byref(opts)),
                f"replacing program of {self.what}")


class TcLink(Link):
    """A tc clsact filter (netlink); removed on detach, with the qdisc if we created it."""

    def __init__(self, hook, handle: int, priority: int, created_qdisc: bool, netns, what: str, owner=None):
        super().__init__(what, owner)
        self.hook, self.handle, self.priority = hook, handle, priority
        self.created_qdisc, self.netns = created_qdisc, netns

    def _detach(self) -> None:
        from ..netns import enter
        opts = L.TcOpts(sz=ctypes.sizeof(L.TcOpts), handle=self.handle, priority=self.priority)
        try:
            with enter(self.netns):
                ret = L.bpf_tc_detach(ctypes.byref(self.hook), ctypes.byref(opts))
                if ret < 0 and -ret not in (2, 19):   # ENOENT/ENODEV: already gone with the device
                    L.check(ret, f"detaching {self.what}")
                if self.created_qdisc:
                    hook = L.TcHook(sz=ctypes.sizeof(L.TcHook), ifindex=self.hook.ifindex, attach_point=3)
                    L.bpf_tc_hook_destroy(ctypes.byref(hook))
        except FileNotFoundError:
            pass   # the namespace is gone, and the filter with it
