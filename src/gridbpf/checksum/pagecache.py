"""Sum written ranges from the page cache (sum mode "ranges").

In this mode the kernel does not sum: it only keeps the written ranges (the same segments, the
same checks and reasons as when it sums) and reports the running segment every few MiB while the
file is written (progress records) and the rest at close. This worker then reads those bytes
back while they are still in the page cache, through a read-only descriptor of its own opened on
/proc/TGID/fd/FD (so a rename does not lose the file), and sums them with zlib-ng's SIMD
adler32. The writer pays only the bookkeeping; the sum runs here, on another core.

Why the bytes read equal the bytes written: each range is read after the write that produced it
returned, and any later change to the file that the kernel sees (a write over summed bytes, mmap,
truncate, ...) marks the file, which is then read whole instead; overlapping ranges fail the
tiling check in userspace. The guarantees are those of the kernel mode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .adler import fast_adler32

READ_SIZE = 4 << 20
MAX_OPEN = 512            # descriptors kept open; files beyond are read by path at close


class RangeReadError(OSError):
    """A range could not be read back (the file is read whole instead)."""


@dataclass
class _Session:
    dev: int
    ino: int
    fd: int = -1
    segments: dict = field(default_factory=dict)   # start -> [summed up to, adler so far]
    done: list = field(default_factory=list)       # (start, length, adler), finished ranges
    todo: list = field(default_factory=list)       # (start, length) still to read
    error: str | None = None


class PageCacheSummer:
    def __init__(self):
        self._sessions: dict[int, _Session] = {}
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._open = 0
        self.bytes_read = 0

    def _session(self, rec) -> _Session:
        s = self._sessions.get(rec.session)
        if s is None:
            s = self._sessions[rec.session] = _Session(rec.dev, rec.ino)
        if s.fd < 0 and s.error is None and self._open < MAX_OPEN and rec.tgid:
            s.fd = self._open_proc_fd(rec.tgid, rec.fd, rec.dev, rec.ino)
            self._open += s.fd >= 0
        return s

    @staticmethod
    def _open_proc_fd(tgid: int, fd: int, dev: int, ino: int) -> int:
        """A descriptor of our own on the writer's file, or -1 (gone, or another file by now)."""
        try:
            mine = os.open(f"/proc/{tgid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1
        if not _is(os.fstat(mine), dev, ino):
            os.close(mine)
            return -1
        return mine

    def _sum(self, s: _Session, start: int, end: int) -> None:
        """Extend segment START of S up to END."""
        seg = s.segments.setdefault(start, [start, 1])
        if s.error is not None or s.fd < 0 or end <= seg[0]:
            return
        pos, value = seg
        try:
            while pos < end:
                n = os.preadv(s.fd, [self._view[:min(READ_SIZE, end - pos)]], pos)
                if n <= 0:
                    raise RangeReadError(f"short read at byte {pos}")
                value = fast_adler32(self._view[:n], value)
                pos += n
        except OSError as e:
            s.error = f"page-cache read: {e.strerror or e}"
            return
        self.bytes_read += pos - seg[0]
        seg[:] = [pos, value]

    def progress(self, rec) -> None:
        """The running segment [start, start+len) so far: sum what is new."""
        self._sum(self._session(rec), rec.start, rec.start + rec.len)

    def range(self, rec) -> None:
        """A finished range: sum the rest of it and keep it."""
        self._finish_range(self._session(rec), rec.start, rec.len)

    def _finish_range(self, s: _Session, start: int, length: int) -> None:
        if s.fd < 0 and s.error is None:
            s.todo.append((start, length))      # no descriptor yet: read at close, by path
            return
        self._sum(s, start, start + length)
        seg = s.segments.pop(start, None)
        if seg is not None and seg[0] == start + length:
            s.done.append((start, length, seg[1]))
        elif s.error is None:
            s.error = f"page-cache read: range at byte {start} not summed"

    def close(self, session: int, dev: int, ino: int, seg_start: int, seg_end: int,
              path: str | None) -> tuple[list | None, str | None]:
        """At the last close: (ranges, None) once everything is summed, (None, reason) if the
        bytes could not be read back, (None, None) if we hold no descriptor and PATH is not
        known yet (call again with the path)."""
        s = self._sessions.setdefault(session, _Session(dev, ino))
        if s.fd < 0 and s.error is None:
            if path is None:
                return None, None
            try:
                s.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                s.error = f"page-cache read: {e.strerror}"
            else:
                self._open += 1
                if not _is(os.fstat(s.fd), dev, ino):
                    s.error = "page-cache read: another file at the path"
        todo, s.todo = s.todo, []
        for start, length in todo:
            self._finish_range(s, start, length)
        if seg_end > seg_start:
            self._finish_range(s, seg_start, seg_end - seg_start)
        self.forget(session)
        if s.error:
            return None, s.error
        return s.done, None

    def close_all(self) -> None:
        for session in list(self._sessions):
            self.forget(session)

    def forget(self, session: int) -> None:
        s = self._sessions.pop(session, None)
        if s is not None and s.fd >= 0:
            os.close(s.fd)
            self._open -= 1


def _is(st: os.stat_result, dev: int, ino: int) -> bool:
    return st.st_ino == ino and (os.major(st.st_dev) << 20 | os.minor(st.st_dev)) == dev
