"""Ring-buffer draining: our bulk reader of the mapped buffer vs libbpf's ring_buffer__poll with
one ctypes callback per record (the usual Python way). Same records, same buffer, one run."""
from __future__ import annotations

import ctypes
import os
import statistics
import time

from gridbpf.bpf import BpfObject, RingBuffer
from gridbpf.bpf import libbpf as L

OBJ = os.path.join(os.path.dirname(__file__), "..", "tests", "bpf", "selftest.bpf.o")
RECORDS = 50_000
ROUNDS = 7


def _fill(n: int) -> None:
    for _ in range(n):
        os.getppid()


def _libbpf_drain(fd: int) -> int:
    count = [0]
    cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

    @cb_type
    def on_record(_ctx, data, size):
        ctypes.string_at(data, size)     # what a consumer minimally does: take the bytes
        count[0] += 1
        return 0

    new = L._fn("ring_buffer__new", ctypes.c_void_p, ctypes.c_int, cb_type, ctypes.c_void_p, ctypes.c_void_p)
    consume = L._fn("ring_buffer__consume", ctypes.c_int, ctypes.c_void_p)
    free = L._fn("ring_buffer__free", None, ctypes.c_void_p)
    rb = new(fd, on_record, None, None)
    try:
        consume(rb)
    finally:
        free(rb)
    return count[0]


def run() -> dict:
    obj = BpfObject.open(OBJ)
    obj.rodata["target_tgid"] = os.getpid()
    obj.map("events").max_entries = 1 << 23      # 8 MiB: all records fit
    obj.load()
    ours_ns, theirs_ns, ours_arr_ns = [], [], []
    with obj.program("on_getppid").attach_tracepoint("syscalls", "sys_enter_getppid"), \
            RingBuffer(obj, "events") as rb:
        dtype = obj.btf.dtype("event")
        for _ in range(ROUNDS):
            _fill(RECORDS)
            t = time.perf_counter_ns()
            n = len(rb.poll())
            ours_ns.append((time.perf_counter_ns() - t) / n)
            assert n == RECORDS, n
            _fill(RECORDS)
            t = time.perf_counter_ns()
            n = len(rb.poll_array(dtype))
            ours_arr_ns.append((time.perf_counter_ns() - t) / n)
            assert n == RECORDS, n
            _fill(RECORDS)
            t = time.perf_counter_ns()
            n = _libbpf_drain(obj.map("events").fd)
            theirs_ns.append((time.perf_counter_ns() - t) / n)
            assert n == RECORDS, n
        lost = rb.lost
    obj.close()
    med = statistics.median
    return {
        "what": "ns per 48-byte ring-buffer record drained in Python (median of rounds)",
        "records_per_round": RECORDS, "rounds": ROUNDS, "lost": lost,
        "ours_bytes_ns": round(med(ours_ns), 1),
        "ours_numpy_ns": round(med(ours_arr_ns), 1),
        "libbpf_callback_ns": round(med(theirs_ns), 1),
        "ratio_bytes_vs_libbpf": round(med(theirs_ns) / med(ours_ns), 2),
        "ratio_numpy_vs_libbpf": round(med(theirs_ns) / med(ours_arr_ns), 2),
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run(), indent=2))
