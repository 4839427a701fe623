"""The "why is it stuck" verbs as agent collectors: Prometheus metrics for an agent to serve.

Each collector owns its tracer, registers its counters and histograms in the shared
`gridbpf.export.metrics.Registry` (read from the kernel's maps at scrape time, so nothing runs
per event), and has `poll(timeout_ms)` for the agent's loop and `close()`. Gauges (values that
go down: threads blocked now, RSS, RTT) are not in that Registry yet; each collector exposes them
through `prometheus_collector()`, a prometheus_client collector the agent registers on its
/metrics registry (`MetricsServer.prom.register(c.prometheus_collector())`).

    reg = Registry()
    cols = [StuckCollector(reg, [pid]), OffcpuCollector(reg, [pid]), IoCollector(reg, [pid]),
            TcpCollector(reg, [pid]), MemCollector(reg, [pid])]
    server = MetricsServer(reg, 9100)
    for c in cols: server.prom.register(c.prometheus_collector())
    while running: for c in cols: c.poll(100)
"""
from __future__ import annotations

import threading

from ...export.metrics import Registry
from .io import IoTracer
from .mem import MemTracer
from .offcpu import OffcpuTracer
from .monitor import StuckMonitor
from .tcp import TcpTracer

BLOCK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
MAX_FILES = 200    # io: label cardinality cap (the files with the most time)


class _Gauges:
    """A prometheus_client collector calling FN() -> [(name, help, labelnames, {labels: value})]."""

    def __init__(self, fn):
        self.fn = fn

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        for name, help_text, labelnames, values in self.fn():
            fam = GaugeMetricFamily(name, help_text, labels=list(labelnames))
            for labels, v in values.items():
                fam.add_metric(list(labels), v)
            yield fam


def _kernel_counter(registry: Registry, name: str, stats) -> None:
    registry.counter(name, "Events or state the kernel could not keep (*_lost, *_full, "
                     "*_errors): nonzero means the figures undercount.", "1",
                     lambda: {(k,): v for k, v in stats().items()}, ("counter",))


class StuckCollector:
    """Threads blocked longer than a threshold: counts and durations by syscall, blocked now."""

    def __init__(self, registry: Registry, targets, threshold_s: float = 2.0):
        self.monitor = StuckMonitor(targets, threshold_s=threshold_s)
        self._lock = threading.Lock()
        self._woke: dict[tuple, int] = {}
        self._blocked_now: dict[tuple, int] = {}
        registry.counter("gridbpf.stuck.blocks", "Blocks longer than the threshold that ended, "
                         "by process, thread name and syscall.", "1", self._read_woke,
                         ("pid", "thread", "syscall"))
        self.duration = registry.histogram("gridbpf.stuck.block.duration", "Length of blocks "
                                           "longer than the threshold, by syscall.", "s",
                                           ("syscall",), BLOCK_BUCKETS)
        _kernel_counter(registry, "gridbpf.stuck.kernel", self.monitor.stats)

    def _read_woke(self) -> dict:
        with self._lock:
            return dict(self._woke)

    def poll(self, timeout_ms: int = 100) -> list[dict]:
        reports = self.monitor.poll(timeout_ms)
        woke = [r for r in reports if r["event"] == "woke"]
        with self._lock:
            for r in woke:
                key = (str(r["pid"]), r["thread"], r["syscall"]["name"] or "none")
                self._woke[key] = self._woke.get(key, 0) + 1
            # threads past the threshold right now: reported 'blocked' and not yet woken
            for r in reports:
                k = (r["tid"],)
                if r["event"] == "blocked":
                    self._blocked_now[k] = (str(r["pid"]), r["syscall"]["name"] or "none")
                else:
                    self._blocked_now.pop(k, None)
        if woke:
            self.duration.observe_many([r["blocked_s"] for r in woke],
                                       [(r["syscall"]["name"] or "none",) for r in woke])
        return reports

    def _gauges(self):
        with self._lock:
            counts: dict[tuple, int] = {}
            for pid_sys in self._blocked_now.values():
                counts[pid_sys] = counts.get(pid_sys, 0) + 1
        return [("gridbpf_stuck_threads_blocked", "Threads blocked longer than the threshold now.",
                 ("pid", "syscall"), counts)]

    def prometheus_collector(self):
        return _Gauges(self._gauges)

    def close(self) -> None:
        self.monitor.close()


class OffcpuCollector:
    """Off-CPU time by process and thread name (all blocks, aggregated in the kernel)."""

    def __init__(self, registry: Registry, targets):
        self.tracer = OffcpuTracer(targets, events=False, waker=False, live=False)
        registry.counter("gridbpf.offcpu.time", "Time threads spent blocked (off CPU), by "
                         "process and thread name.", "s", self._read, ("pid", "thread"))
        registry.counter("gridbpf.offcpu.blocks", "Times threads blocked, by process and thread "
                         "name.", "1", lambda: self._read(count=True), ("pid", "thread"))
        _kernel_counter(registry, "gridbpf.offcpu.kernel", self.tracer.stats)

    def _read(self, count: bool = False) -> dict:
        out: dict[tuple, float] = {}
        for k, v in self.tracer.totals():
            key = (str(k.tgid), bytes(v.comm).split(b"\0")[0].decode(errors="replace"))
            out[key] = out.get(key, 0) + (int(v.count) if count else int(v.total_ns) / 1e9)
        return out

    def poll(self, timeout_ms: int = 100) -> None:
        import time
        time.sleep(timeout_ms / 1000)

    def prometheus_collector(self):
        return _Gauges(lambda: [])

    def close(self) -> None:
        self.tracer.close()


class IoCollector:
    """File operations, their time and bytes, by process, operation and file."""

    def __init__(self, registry: Registry, targets, slow_s: float = 0.1):
        self.tracer = IoTracer(targets, slow_s=slow_s)
        for metric, field, unit, what in (("operations", "count", "1", "Operations"),
                                          ("time", "total_s", "s", "Time spent in operations"),
                                          ("bytes", "bytes", "By", "Bytes read or written"),
                                          ("errors", "errors", "1", "Failed operations")):
            registry.counter(f"gridbpf.io.{metric}", f"{what}, by process, operation and file "
                             f"(the {MAX_FILES} files with the most time).", unit,
                             lambda f=field: self._read(f), ("pid", "op", "path"))
        _kernel_counter(registry, "gridbpf.io.kernel", self.tracer.stats)

    def _read(self, field: str) -> dict:
        rows = self.tracer.files()[:MAX_FILES]
        return {(str(r["pid"]), r["op"], r["path"]): r[field] for r in rows}

    def poll(self, timeout_ms: int = 100) -> int:
        return self.tracer.poll(timeout_ms)

    def _gauges(self):
        rows = self.tracer.files()[:MAX_FILES]
        return [("gridbpf_io_max_seconds", "Slowest single operation so far, by process, "
                 "operation and file.", ("pid", "op", "path"),
                 {(str(r["pid"]), r["op"], r["path"]): r["max_s"] for r in rows})]

    def prometheus_collector(self):
        return _Gauges(self._gauges)

    def close(self) -> None:
        self.tracer.close()


class TcpCollector:
    """TCP retransmits, resets, bytes and connections per peer; smoothed RTT as a gauge."""

    def __init__(self, registry: Registry, targets):
        self.tracer = TcpTracer(targets)
        for metric, field, unit, what in (
                ("retransmits", "retransmits", "1", "Retransmitted segments"),
                ("resets.sent", "resets_sent", "1", "Resets sent"),
                ("resets.received", "resets_received", "1", "Resets received"),
                ("bytes.sent", "bytes_sent", "By", "Bytes sent"),
                ("bytes.received", "bytes_received", "By", "Bytes received"),
                ("connections.opened", "opened", "1", "Connections established"),
                ("connections.closed", "closed", "1", "Connections closed")):
            registry.counter(f"gridbpf.tcp.{metric}", f"{what}, by process and peer.", unit,
                             lambda f=field: {(str(r["pid"]), r["peer"]): r[f]
                                              for r in self.tracer.peers()}, ("pid", "peer"))
        _kernel_counter(registry, "gridbpf.tcp.kernel", self.tracer.stats)

    def poll(self, timeout_ms: int = 100) -> int:
        return self.tracer.poll(timeout_ms)

    def _gauges(self):
        return [("gridbpf_tcp_srtt_seconds", "Last smoothed RTT, by process and peer.",
                 ("pid", "peer"), {(str(r["pid"]), r["peer"]): r["srtt_ms"] / 1e3
                                   for r in self.tracer.peers()})]

    def prometheus_collector(self):
        return _Gauges(self._gauges)

    def close(self) -> None:
        self.tracer.close()


class MemCollector:
    """RSS by kind (gauges), page faults, mmap/munmap bytes, brk growth, JVM GC pauses."""

    def __init__(self, registry: Registry, targets, gc: bool = True):
        self.tracer = MemTracer(targets, gc=gc)
        self._last: list[dict] = []
        registry.counter("gridbpf.mem.page_faults", "Page faults, by process and where "
                         "(user, kernel).", "1", lambda: self._counter(
                             {"user": "faults_user", "kernel": "faults_kernel"}), ("pid", "kind"))
        registry.counter("gridbpf.mem.mapped", "Bytes mapped (mmap) and unmapped (munmap).", "By",
                         lambda: self._counter({"mmap": "mmap_bytes", "munmap": "munmap_bytes"}),
                         ("pid", "kind"))
        registry.counter("gridbpf.jvm.gc.pauses", "JVM GC pauses (HotSpot USDT gc__begin/end).",
                         "1", lambda: self._counter({"all": "gc_count", "full": "gc_full"}),
                         ("pid", "kind"))
        registry.counter("gridbpf.jvm.gc.pause.time", "Time in JVM GC pauses.", "s",
                         lambda: {(str(r["pid"]),): r["gc_total_ns"] / 1e9 for r in self._rows()},
                         ("pid",))

    def _rows(self) -> list[dict]:
        self._last = self.tracer.sample()
        return self._last

    def _counter(self, kinds: dict) -> dict:
        return {(str(r["pid"]), k): r[f] for r in self._rows() for k, f in kinds.items()}

    def poll(self, timeout_ms: int = 100) -> int:
        return self.tracer.poll(timeout_ms)

    def _gauges(self):
        rows = self._rows()
        return [
            ("gridbpf_mem_rss_bytes", "Resident memory by process and kind (anon, file, shmem).",
             ("pid", "kind"), {(str(r["pid"]), k.lower()[3:]): r[k] for r in rows
                               for k in ("RssAnon", "RssFile", "RssShmem") if k in r}),
            ("gridbpf_mem_brk_growth_bytes", "Heap (brk) growth since tracing started.", ("pid",),
             {(str(r["pid"]),): r["brk_growth"] for r in rows}),
        ]

    def prometheus_collector(self):
        return _Gauges(self._gauges)

    def close(self) -> None:
        self.tracer.close()
