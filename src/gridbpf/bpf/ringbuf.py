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
        """Drain fixed-size records into a numpy structured array: the leading run of records of
        DTYPE's size is one strided view and one copy (no per-record work, no index arrays);
        anything irregular after it is walked record by record."""
        dtype = np.dtype(dtype)
        regular = self._regular(dtype)
        if regular is None and timeout_ms:
            self.wait(timeout_ms)
            regular = self._regular(dtype)
        parts = []
        if regular is not None:
            rows, cons = regular
            parts.append(rows.copy())
            self._commit(cons)
        records, cons = self._walk()      # what the fast path left: other sizes, discarded
        if records:
            if any(n < dtype.itemsize for _s, n in records):
                bad = next(n for _s, n in records if n < dtype.itemsize)
                raise ValueError(f"ring buffer record of {bad} bytes is shorter than {dtype.itemsize}")
            raw = np.frombuffer(self._data, dtype=np.uint8)
            starts = np.fromiter((s for s, _n in records), dtype=np.int64)
            parts.append(raw[starts[:, None] + np.arange(dtype.itemsize)].view(dtype).reshape(len(starts)))
        self._commit(cons)
        out = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.empty(0, dtype))
        self.received += len(out)
        return out

    def lend_chunks(self, dtype, rows: int):
        """poll_array without its copy, for consumers that keep nothing of the records: the
        leading run of records of DTYPE's size is lent as views of the ring itself, ROWS
        records at a time, and each chunk's space goes back to the kernel when the next one
        is asked for (or the loop ends, however it ends). Copying every cold record out cost
        as much as the agent's whole aggregation of it. The ring is then the reader's only
        backlog: a reader starved while it works leaves the kernel less room, so at most ROWS
        records are held, and a backlog of more than half the ring is copied out instead.
        Records of another size, or none, come as poll_array gives them."""
        dtype = np.dtype(dtype)
        cons, prod = self._positions()
        regular = self._regular(dtype) if prod - cons <= self.size // 2 else None
        if regular is None:
            # nothing regular, or a reader that fell behind (more than half the ring waiting):
            # copied out at once, so the kernel has its whole ring again while we work
            arr = self.poll_array(dtype)
            for i in range(0, len(arr), rows):
                yield arr[i:i + rows]
            return
        view, _end = regular                     # starts at cons: only we move it
        stride = (dtype.itemsize + HEADER + 7) & ~7
        try:
            for i in range(0, len(view), rows):
                part = view[i:i + rows]
                cons += len(part) * stride       # consumed once the caller asks for more
                self.received += len(part)
                yield part
                self._commit(cons)
        finally:
            self._commit(cons)                   # also when the caller stopped (or raised)

    def _regular(self, dtype):
        """(strided view of the leading records whose length is DTYPE's size, consumer position
        after them), or None. Each record is an 8-byte header plus its length rounded up to 8,
        and the data area is mapped twice, so such a run is a regular array in memory; the
        first header that differs (busy, discarded, another size) ends it."""
        cons, prod = self._positions()
        stride = (dtype.itemsize + HEADER + 7) & ~7
        n = (prod - cons) // stride
        if n == 0:
            return None
        raw = np.frombuffer(self._data, dtype=np.uint8)
        start = cons & self._mask
        headers = np.ndarray((n,), np.uint32, raw, start, (stride,))
        irregular = np.flatnonzero(headers != dtype.itemsize)
        if len(irregular):
            n = int(irregular[0])
        if n == 0:
            return None
        return np.ndarray((n,), dtype, raw, start + HEADER, (stride,)), cons + n * stride

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
