"""`gridbpf trace io`: file I/O latency per file and operation, and the slowest operations.

The kernel side (bpf/io.bpf.c) keeps a log2 latency histogram per (process, file, operation)
and sends an event only for operations slower than a threshold and for each openat (so files
get their path). Files are named by path from openat, else from the process's open fds
(/proc/PID/fd), else by the name of their dentry.
"""
from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass

from ...bpf import BpfObject, RingBuffer
from .offcpu import target_pids
from ..session import BpfSession

OPS = ["read", "write", "pread64", "pwrite64", "fsync", "fdatasync", "openat", "close"]
EV_SLOW, EV_OPEN = 1, 2
STAT_NAMES = ["inflight_full", "files_full"]


def _cstr(raw) -> str:
    return bytes(raw).split(b"\0")[0].decode(errors="replace")


def user_dev(kernel_dev: int) -> int:
    """The kernel's dev_t (major << 20 | minor) as stat() shows it."""
    return os.makedev(kernel_dev >> 20, kernel_dev & 0xFFFFF)


@dataclass
class SlowOp:
    latency_s: float
    op: str
    pid: int
    tid: int
    fd: int
    path: str
    ret: int
    at: float          # seconds since tracing started

    def to_json(self) -> dict:
        return dict(self.__dict__)


def percentile(slots: list[int], q: float) -> float:
    """Upper bound (seconds) of the log2 bucket holding quantile Q."""
    total = sum(slots)
    if not total:
        return 0.0
    want, seen = q * total, 0
    for i, n in enumerate(slots):
        seen += n
        if seen >= want:
            return (2 ** (i + 1)) / 1e9
    return (2 ** len(slots)) / 1e9


class IoTracer(BpfSession):
    def __init__(self, targets, slow_s: float = 0.010, regular_only: bool = True, top: int = 20):
        self.tgids = target_pids(targets)
        self.obj = BpfObject.open("io")
        self.links = []
        self.ring = None
        self.top = top
        self.slowest: list[tuple] = []     # min-heap of (latency, seq, SlowOp)
        self._seq = 0
        self.paths: dict[tuple[int, int], str] = {}   # (kernel dev, ino) -> path
        self.opens = 0
        self.started = time.monotonic_ns()
        try:
            self.obj.rodata["slow_ns"] = int(slow_s * 1e9)
            self.obj.rodata["regular_only"] = bool(regular_only)
            self.obj.load()
            for t in self.tgids:
                self.obj.map("targets")[t] = 1
            for prog in self.obj.programs.values():
                self.links.append(prog.attach())
            self.ring = RingBuffer(self.obj, "io_events")
            self.dtype = self.obj.btf.dtype("struct gbio_event")
            self._scan_fds()
        except BaseException:
            self.close()
            raise

    def _scan_fds(self) -> None:
        """Name the files the targets have open now (opened before we started)."""
        for pid in self.tgids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    path = os.readlink(f"/proc/{pid}/fd/{fd}")
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if path.startswith("/"):
                    key = ((os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino)
                    self.paths.setdefault(key, path)

    def poll(self, timeout_ms: int = 200) -> int:
        """Drain events (opens name files; slow operations go to the top list)."""
        arr = self.ring.poll_array(self.dtype, timeout_ms=timeout_ms)
        for e in arr:
            key = (int(e["dev"]), int(e["ino"]))
            if int(e["kind"]) == EV_OPEN:
                self.opens += 1
                path = _cstr(e["path"])
                if path.startswith("/"):
                    self.paths[key] = path
                else:   # relative to the cwd at open time (openat with AT_FDCWD, usually)
                    try:
                        cwd = os.readlink(f"/proc/{int(e['tgid'])}/cwd")
                        self.paths[key] = os.path.normpath(os.path.join(cwd, path))
                    except OSError:
                        self.paths[key] = path
                continue
            op = SlowOp(int(e["latency_ns"]) / 1e9, OPS[int(e["op"])], int(e["tgid"]), int(e["tid"]),
                        int(e["fd"]), self.path_of(key, _cstr(e["name"])), int(e["ret"]),
                        (int(e["start_ns"]) - self.started) / 1e9)
            self._seq += 1
            item = (op.latency_s, self._seq, op)
            if len(self.slowest) < self.top:
                heapq.heappush(self.slowest, item)
            elif item > self.slowest[0]:
                heapq.heapreplace(self.slowest, item)
        return len(arr)

    def path_of(self, key: tuple[int, int], name: str) -> str:
        if key not in self.paths:
            self._scan_fds()
        return self.paths.get(key, f"(dentry) {name}")

    def slowest_ops(self) -> list[SlowOp]:
        return [op for _l, _s, op in sorted(self.slowest, reverse=True)]

    def files(self) -> list[dict]:
        """Per file and operation: count, bytes, errors, latency (mean, p50, p99, max), histogram."""
        out = []
        for k, v in self.obj.map("files").lookup_batch():
            slots = [int(x) for x in v.slots]
            count = int(v.count)
            out.append({
                "pid": int(k.tgid), "op": OPS[int(k.op)],
                "path": self.path_of((int(k.dev), int(k.ino)), _cstr(v.name)),
                "dev": f"{int(k.dev) >> 20}:{int(k.dev) & 0xFFFFF}", "ino": int(k.ino),
                "count": count, "bytes": int(v.bytes), "errors": int(v.errors),
                "total_s": int(v.total_ns) / 1e9, "mean_s": int(v.total_ns) / 1e9 / max(count, 1),
                "p50_s": percentile(slots, 0.5), "p99_s": percentile(slots, 0.99),
                "max_s": int(v.max_ns) / 1e9,
                "histogram_ns_log2": {str(2 ** i): n for i, n in enumerate(slots) if n},
            })
        out.sort(key=lambda r: -r["total_s"])
        return out

    def stats(self) -> dict:
        m = self.obj.map("io_stats")
        out = {name: int(m.sum(i) or 0) for i, name in enumerate(STAT_NAMES)}
        out["events_lost"] = int(self.ring.lost) if self.ring else 0
        return out


def format_table(files: list[dict], slow: list[SlowOp]) -> str:
    lines = [f"{'op':<9} {'count':>7} {'bytes':>12} {'mean':>9} {'p99<=':>9} {'max':>9}  file"]
    for r in files:
        lines.append(f"{r['op']:<9} {r['count']:>7} {r['bytes']:>12} {_ms(r['mean_s']):>9} "
                     f"{_ms(r['p99_s']):>9} {_ms(r['max_s']):>9}  {r['path']}")
    if slow:
        lines.append("")
        lines.append("slowest operations:")
        for s in slow:
            lines.append(f"  {_ms(s.latency_s):>9} {s.op:<9} pid {s.pid} tid {s.tid} fd {s.fd} "
                         f"{s.path} (at +{s.at:.3f}s, ret {s.ret})")
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}ms"
