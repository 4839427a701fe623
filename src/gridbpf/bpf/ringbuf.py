"""BPF ring buffers read straight from their shared memory, in bulk, from Python.

The kernel maps the data area twice back to back, so every record is contiguous even when it
wraps. We read the producer position, walk the record headers, hand out the records, then publish
the consumer position once per batch: no per-record callback through ctypes. Records the kernel
could not reserve are counted by the BPF side in NAME_lost (GB_RINGBUF in common.h).
"""
from __future__ import annotations

import mmap
import select
import struct

import numpy as np

BUSY_BIT, DISCARD_BIT = 1 << 31, 1 << 30
HEADER = 8


class RingBuffer:
    def __init__(self, obj, name: str):
        self.map = obj.map(name)
        if self.map.type_name != "ringbuf":
            raise TypeError(f"map {name} is a {self.map.type_name}, not a ring buffer")
        self._lost_map = obj.maps.get(f"{name}_lost")
        self.size = self.map.max_entries
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        fd = self.map.fd
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        self.received = 0

    @property
    def lost(self) -> int:
        """Records dropped in the kernel because the buffer was full (all CPUs)."""
        if self._lost_map is None:
            raise AttributeError(f"{self.map.name} has no {self.map.name}_lost counter (use GB_RINGBUF)")
        return self._lost_map.sum(0) or 0

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel signals data (or the timeout passes)."""
        return bool(self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1))

    def _positions(self) -> tuple[int, int]:
        (cons,) = struct.unpack_from("<Q", self._consumer, 0)
        (prod,) = struct.unpack_from("<Q", self._producer, 0)
        return cons, prod

    def _walk(self):
        """(offset in data, length) of each committed record; stops at one still being written."""
        cons, prod = self._positions()
        records = []
        data = self._data
        while cons < prod:
            (length,) = struct.unpack_from("<I", data, cons & self._mask)
            if length & BUSY_BIT:
                break
            start = (cons & self._mask) + HEADER
            cons += (length & ~(BUSY_BIT | DISCARD_BIT)) + HEADER + 7 & ~7
            if not length & DISCARD_BIT:
                records.append((start, length))
        return records, cons

    def _uniform(self, itemsize: int):
        """Fast path when every pending record is ITEMSIZE bytes (the usual case): check all
        headers at once with numpy and slice the records out; None when that does not hold."""
        cons, prod = self._positions()
        stride = (itemsize + HEADER + 7) & ~7
        pending = prod - cons
        if pending <= 0 or pending % stride:
            return None
        start = cons & self._mask
        area = np.frombuffer(self._data, dtype=np.uint8, count=pending, offset=start).reshape(-1, stride)
        if not (area[:, :4].copy().view("<u4")[:, 0] == itemsize).all():   # busy, discarded or other sizes
            return None
        return area[:, HEADER:HEADER + itemsize], prod

    def _commit(self, cons: int) -> None:
        struct.pack_into("<Q", self._consumer, 0, cons)

    def poll(self, timeout_ms: int = 0) -> list[bytes]:
        """Wait up to TIMEOUT_MS for data, then drain everything committed, as bytes."""
        records, cons = self._walk()
        if not records and timeout_ms:
            self.wait(timeout_ms)
            records, cons = self._walk()
        out = [bytes(self._data[s:s + n]) for s, n in records]
        self._commit(cons)
        self.received += len(out)
        return out

    def poll_array(self, dtype, timeout_ms: int = 0) -> np.ndarray:
        """Drain fixed-size records into a numpy structured array (one copy, no per-record decode)."""
        dtype = np.dtype(dtype)
        fast = self._uniform(dtype.itemsize)
        if fast is None and timeout_ms:
            self.wait(timeout_ms)
            fast = self._uniform(dtype.itemsize)
        if fast is not None:
            rows, cons = fast
            out = rows.view(dtype).reshape(len(rows)).copy()
            self._commit(cons)
            self.received += len(out)
            return out
        records, cons = self._walk()
        if not records and timeout_ms:
            self.wait(timeout_ms)
            records, cons = self._walk()
        if not records:
            return np.empty(0, dtype)
        starts = np.fromiter((s for s, n in records if n >= dtype.itemsize), dtype=np.int64)
        if len(starts) != len(records):
            bad = next(n for _s, n in records if n < dtype.itemsize)
            raise ValueError(f"ring buffer record of {bad} bytes is shorter than {dtype.itemsize}")
        raw = np.frombuffer(self._data, dtype=np.uint8)
        rows = raw[starts[:, None] + np.arange(dtype.itemsize)]
        out = rows.view(dtype).reshape(len(starts)).copy()
        self._commit(cons)
        self.received += len(out)
        return out

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
            self._data.release()
            self._producer.close()
            self._consumer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
