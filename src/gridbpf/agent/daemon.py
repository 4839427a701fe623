"""The agent: trace HTTP requests of the configured targets, aggregate them in bulk, serve
Prometheus /metrics and push OTLP metrics and spans.

Python handles each batch drained from the ring buffer (every drain_ms), never each syscall;
histograms are filled with numpy per batch (export.metrics)."""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .. import sdnotify
from ..export.metrics import DURATION_BUCKETS, OVERFLOW, SIZE_BUCKETS, Registry
from ..export.prometheus import MetricsServer
from ..trace.http.memo import memo_map
from ..trace.http.tracer import (EV_REQUEST, F_PIPELINED, STAT_NAMES, HttpTracer,
                          parse_request_line, response_body_sizes)
from .config import AgentConfig
from .routes import Routes, kernel_routes

# How often the kernel's histograms are read into ours: a read of every CPU's copy of each
# histogram costs ~0.7 ms, at every 50 ms drain 1.4% of a core (measured under 24k requests/s);
# scrapes come every 15 s or more
FOLD_S = 1.0

# OpenTelemetry semantic conventions: known methods keep their name, others become _OTHER
KNOWN_METHODS = frozenset("GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND "
                          "PROPPATCH MKCOL COPY MOVE LOCK UNLOCK".split())
# OpenTelemetry attribute names; Prometheus shows them with underscores
LABELS = ("http.request.method", "http.response.status_code", "http.route")
ATTR_TYPES = {"http.response.status_code": int}


CHUNK = 512
_LIBC = ctypes.CDLL("libc.so.6")
# one malloc arena: the agent's few threads do not need per-thread arenas, which cost RSS
_LIBC.mallopt(-8, 1)     # M_ARENA_MAX
# batch arrays (hundreds of KB) always in their own mappings, returned whole when freed: by
# default glibc raises this threshold after the first such free and later batches then come
# from the heap, which they leave fragmented (measured: the heap grew 8 -> 16 MB under load)
_LIBC.mallopt(-3, 128 * 1024)     # M_MMAP_THRESHOLD (fixing it also stops the adjustment)


class AlreadyRunning(RuntimeError):
    pass


class Lock:
    """An flock on a file: a second agent with the same lock refuses to start."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise AlreadyRunning(f"an agent is already running (lock {path}, pid {other or '?'})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


class HttpAgent:
    LABEL_CACHE_MAX = 100_000      # request lines whose label id is kept (then all start again)

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.lock = Lock(cfg.lock)
        self.tracer = self.server = self.otlp = None
        self.collectors = []
        self.checksums = self.checksum_watcher = None
        self._stop = threading.Event()
        self.requests = 0
        self.aggregated = 0            # of them, requests the kernel aggregated (no record)
        self._reset_label_caches()
        try:
            self.routes = Routes(cfg.routes)
            routes_in_kernel, self.aggregation = self._aggregation_plan(cfg)
            self.tracer = HttpTracer(cfg.targets, tls=cfg.tls, idle_report_s=cfg.idle_report_s,
                                      java_agent=cfg.java_agent, aggregate_routes=routes_in_kernel)
            self._agg_seen: dict[tuple, dict] = {}     # the kernel's cumulative histograms, last read
            self._folded_at = 0.0
            self.registry = Registry()
            r = self.registry
            self.duration = r.histogram("http.server.request.duration",
                                        "Duration of HTTP server requests.", "s", LABELS,
                                        DURATION_BUCKETS, cfg.max_series, ATTR_TYPES)
            self.req_body = r.histogram("http.server.request.body.size",
                                        "Size of HTTP server request bodies.", "By", LABELS,
                                        SIZE_BUCKETS, cfg.max_series, ATTR_TYPES)
            self.resp_body = r.histogram("http.server.response.body.size",
                                         "Size of HTTP server response bodies.", "By", LABELS,
                                         SIZE_BUCKETS, cfg.max_series, ATTR_TYPES)
            r.counter("gridbpf.http.kernel", "Counters of the in-kernel request tracer "
                      "(events_lost: requests the ring buffer could not take; aggregated_in_kernel: "
                      "requests counted in the kernel's histograms, not sent).", "1",
                      self._kernel_stats, ("counter",))
            r.counter("gridbpf.http.requests", "Requests counted by the agent (decoded from "
                      "records, or aggregated in the kernel).", "{request}",
                      lambda: {(): self.requests})
            r.counter("gridbpf.http.spans.dropped", "Spans not exported (rate cap).", "1",
                      lambda: {(): self.otlp.spans_dropped if self.otlp else 0})
            r.counter("gridbpf.otlp.export.failures", "OTLP exports the receiver did not take "
                      "(metrics: exports; spans: the spans in them).", "1",
                      lambda: {("metrics",): self.otlp.metric_failures,
                               ("spans",): self.otlp.spans_failed} if self.otlp else {},
                      ("signal",))
            r.counter("gridbpf.http.tls.unreadable", "Target processes serving TLS that cannot "
                      "be read (e.g. JVM JSSE).", "1", lambda: {(): len(self.tracer.tls_opaque)})
            self.collectors = self._collectors(cfg.collectors)
            self.checksums = self._checksums(cfg.checksum)
            self.server = MetricsServer(r, cfg.listen_port, cfg.listen_addr)
            for c in self.collectors:
                if hasattr(c, "prometheus_collector"):
                    self.server.prom.register(c.prometheus_collector())
            if cfg.otlp is not None:
                from ..export.otlp import OtlpExporter
                o = cfg.otlp
                self.otlp = OtlpExporter(o.endpoint, o.service_name, interval=o.interval,
                                         spans=o.spans, max_spans_per_second=o.max_spans_per_second)
                self.otlp.start(r)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _aggregation_plan(cfg: AgentConfig) -> tuple[list[dict] | None, str]:
        """(the route templates for the kernel, "kernel"), or (None, why every request goes
        through the ring buffer instead)."""
        if not cfg.aggregate:
            return None, "off ([trace] aggregate = false)"
        if cfg.otlp is not None and cfg.otlp.spans:
            return None, "off (OTLP spans need every request)"
        routes, why = kernel_routes(cfg.routes)
        return (routes, "kernel") if routes is not None else (None, f"off ({why})")

    def _fold_kernel_histograms(self) -> None:
        """Add what the kernel aggregated since the last read (simple requests that never
        came as records) to the same histograms."""
        for key, now in self.tracer.aggregates().items():
            before = self._agg_seen.get(key)
            n = now["count"] - (before["count"] if before else 0)
            if n <= 0:
                continue
            status, method, route = key
            labels = ("HEAD" if method else "GET", str(status),
                      self.routes.templates[route - 1] if route else "")
            d = {f: now[f] - before[f] if before else now[f]
                 for f in ("dur_sum_ns", "dur_buckets", "resp_count", "resp_sum", "resp_buckets")}
            self.duration.add_counts(labels, d["dur_buckets"], n, d["dur_sum_ns"] / 1e9,
                                     now["dur_min_ns"] / 1e9, now["dur_max_ns"] / 1e9)
            zero_bodies = np.zeros(len(SIZE_BUCKETS) + 1, np.int64)
            zero_bodies[0] = n          # simple requests have no body: all in the first bucket
            self.req_body.add_counts(labels, zero_bodies, n, 0.0, 0.0, 0.0)
            self.resp_body.add_counts(labels, d["resp_buckets"], d["resp_count"], float(d["resp_sum"]),
                                      float(now["resp_min"]), float(now["resp_max"]))
            self.requests += n
            self.aggregated += n
            self._agg_seen[key] = now

    def _collectors(self, names: list[str]) -> list:
        """The other tracing capabilities' agent collectors, on the pids traced now."""
        if not names:
            return []
        from ..trace.stuck import collectors as sc
        pids = self.tracer.targets()
        if not pids:
            raise ValueError("[agent] collectors need target processes running when the agent starts")
        make = {"stuck": sc.StuckCollector, "offcpu": sc.OffcpuCollector, "io": sc.IoCollector,
                "tcp": sc.TcpCollector, "mem": sc.MemCollector}
        out = []
        try:
            for name in names:
                out.append(make[name](self.registry, pids))
        except BaseException:
            for c in out:
                c.close()
            raise
        return out

    def _checksums(self, c):
        """In-kernel checksums of the storage area, hosted here: one process per storage node,
        the same /metrics, the same life cycle (docs/packaging.md says why)."""
        if c is None:
            return None
        from ..checksum.collector import ChecksumCollector
        from ..checksum.targets import select
        from ..checksum.watcher import Watcher
        from ..trace.targets import TargetSpec
        cgroup = TargetSpec(units=[c.unit]).cgroup_paths()[0] if c.unit else c.cgroup
        target = select(c.pid, c.comm, cgroup)
        self.checksum_watcher = Watcher(c.paths, target, store=c.store).start()
        return ChecksumCollector(self.registry, self.checksum_watcher)

    def _kernel_stats(self) -> dict:
        s = self.tracer.stats()
        s["aggregated_in_kernel"] = self.aggregated
        return {(k,): v for k, v in s.items()
                if k in STAT_NAMES or k in ("events_lost", "idle_reported", "late_bytes_after_idle_report",
                                            "aggregated_in_kernel")}

    def _reset_label_caches(self) -> None:
        """The label caches of _group: emptied together, as their values refer to
        each other's ids."""
        self._line_cache: dict[tuple, int] = {}       # (request line, status) -> label id
        self._capture_cache: dict[tuple, int] = {}    # (capture, status) -> packed id
        self._label_ids: dict[tuple, int] = {}        # label tuple -> id
        self._labels: list[tuple] = []                # id -> label tuple

    def _group(self, hdrs: list[bytes], statuses: list[int]) -> tuple[list[tuple], np.ndarray,
                                                                       np.ndarray]:
        """Label tuples of a batch, grouped: (distinct tuples, index per request, end of the
        header block in each capture or -1). A whole (capture, status) is cached as one int
        (label id and head end packed: memo_map, one dict lookup per request); a miss goes
        through a cache per (request line, status), and a miss there parses the line and
        routes its path. The grouping is then array work: no per-request tuple hashing, and
        a capture seen before is not scanned for its header's end again."""
        if len(self._line_cache) >= self.LABEL_CACHE_MAX:   # (a storage node's paths are new)
            self._reset_label_caches()
        packed = np.fromiter(memo_map(self._capture_cache, list(zip(hdrs, statuses)),
                                      self._packed_label_of), np.int64, len(hdrs))
        ids, inv = np.unique(packed >> 16, return_inverse=True)
        return [self._labels[i] for i in ids.tolist()], inv, (packed & 0xffff) - 1

    def _packed_label_of(self, capture_status: tuple[bytes, int]) -> int:
        """label id << 16 | (end of the header block in the capture + 1, 0 if none): the
        first CRLF CRLF of the capture's bytes (the valid-length check is the caller's, as
        a capture's stale tail may hold one)."""
        h, st = capture_status
        end = h.find(b"\r\n\r\n")
        return self._label_id(h.split(b"\r\n", 1)[0], st) << 16 | (end + 5 if end >= 0 else 0)

    def _label_id(self, line: bytes, st: int) -> int:
        key = (line, st)
        lid = self._line_cache.get(key)
        if lid is None:
            method, path, _ = parse_request_line(line + b"\r\n")
            lab = (method if method in KNOWN_METHODS else OVERFLOW, str(st) if st else "",
                   self.routes.route(path))
            lid = self._label_ids.get(lab)
            if lid is None:
                lid = self._label_ids[lab] = len(self._labels)
                self._labels.append(lab)
            self._line_cache[key] = lid
        return lid

    def record_array(self, reqs) -> None:
        """One drained batch of request records into the histograms, from the columns: no
        Request objects (spans, when enabled, decode only the records they export)."""
        if not len(reqs):
            return
        self.requests += len(reqs)
        pipelined = (reqs["pipe_idx"] > 0) | ((reqs["flags"] & F_PIPELINED) > 0)
        simple = reqs[~pipelined] if pipelined.any() else reqs
        if len(simple):
            keys, inv, ends = self._group(simple["hdr"].tolist(), simple["status"].tolist())
            self.duration.observe_grouped((simple["end_ns"] - simple["start_ns"]) / 1e9, keys, inv)
            hl = np.where(ends <= simple["hdr_len"], ends, -1)    # a header end in valid bytes
            req_body = np.where(hl >= 0, np.maximum(simple["req_bytes"].astype(np.int64) - hl, 0), -1)
            for fam, body in ((self.req_body, req_body), (self.resp_body, response_body_sizes(simple))):
                ok = body >= 0
                if ok.any():
                    fam.observe_grouped(body[ok], keys, inv[ok])
        if pipelined.any():       # rare: the full decoder splits pipelined captures
            self._record_requests(self.tracer.decode(reqs[pipelined]))
        if self.otlp is not None and self.otlp.provider is not None:
            budget = self.otlp.span_budget()
            if budget < len(reqs):
                self.otlp.spans_dropped += len(reqs) - budget
            if budget:
                self._spans(self.tracer.decode(reqs[:budget]))

    def _record_requests(self, reqs) -> None:
        """Requests already decoded (pipelined ones) into the histograms."""
        labels = [(r.method if r.method in KNOWN_METHODS else OVERFLOW,
                   str(r.status) if r.status else "", self.routes.route(r.path)) for r in reqs]
        self.duration.observe_many([r.duration for r in reqs], labels)
        for fam, attr in ((self.req_body, "request_body_bytes"), (self.resp_body, "response_body_bytes")):
            known = [(getattr(r, attr), lab) for r, lab in zip(reqs, labels) if getattr(r, attr) is not None]
            if known:
                fam.observe_many([k[0] for k in known], [k[1] for k in known])

    def _spans(self, reqs) -> None:
        for r in reqs:
            route = self.routes.route(r.path)
            method = r.method if r.method in KNOWN_METHODS else OVERFLOW
            start = int(r.time * 1e9)
            attrs = {"http.request.method": r.method, "url.path": r.path.split("?", 1)[0],
                     "client.address": r.client, "client.port": r.port,
                     "network.protocol.version": r.version.partition("/")[2] or r.version,
                     "http.request.body.size": r.request_bytes,
                     "http.response.body.size": r.response_bytes,
                     "process.pid": r.pid, "thread.id": r.tid}
            if r.status:
                attrs["http.response.status_code"] = r.status
            if route:
                attrs["http.route"] = route
            self.otlp.span(f"{method} {route}" if route else method, start,
                           start + int(r.duration * 1e9), attrs)

    def drain(self, timeout_ms: int, final: bool = False) -> None:
        """Drain the ring; decode and record it in chunks so memory stays flat under load;
        then what the kernel aggregated, once every FOLD_S (or now: FINAL)."""
        for arr in self.tracer.lend_chunks(timeout_ms, CHUNK):   # read in the ring: no copy
            if not (arr["kind"] == EV_REQUEST).all():
                arr = self.tracer.requests_only(arr)     # (a copy: only when other kinds came)
            self.record_array(arr)
        if self.tracer.aggregating and (final or time.monotonic() - self._folded_at >= FOLD_S):
            self._fold_kernel_histograms()
            self._folded_at = time.monotonic()

    def run(self, duration: float = 0) -> None:
        drain = self.cfg.drain_ms
        deadline = time.monotonic() + duration if duration else None
        last_refresh = time.monotonic()
        warned = 0
        while not self._stop.is_set():
            self.drain(drain)
            # what the tracer cannot see (a JVM it cannot load the agent into, TLS without a
            # hookable libssl, ...) goes to the log, once each
            for w in self.tracer.warnings[warned:]:
                print(f"gridbpf agent: {w}", file=sys.stderr, flush=True)
            warned = len(self.tracer.warnings)
            for c in self.collectors:
                c.poll(0)              # their batches, without waiting: the drain already did
            if self.checksums is not None:
                self.checksums.poll(0)
            if time.monotonic() - last_refresh >= 1.0:
                self.tracer.refresh()      # new targets, libssl of new processes, dead ones
                last_refresh = time.monotonic()
                _LIBC.malloc_trim(0)       # hand freed batch memory back: RSS is a goal here
            if deadline and time.monotonic() >= deadline:
                break
        self.drain(0, final=True)
        if self.checksums is not None:
            self.checksums.poll(0)

    def stop(self, *_):
        self._stop.set()

    def close(self) -> None:
        for part in (*getattr(self, "collectors", []), self.checksum_watcher, self.otlp, self.server,
                     self.tracer):
            if part is not None:
                try:
                    part.close()
                except Exception:
                    pass
        self.otlp = self.server = self.checksum_watcher = self.checksums = None
        self.lock.release()


def run(cfg: AgentConfig, duration: float = 0, ready=None) -> int:
    agent = HttpAgent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    try:
        if ready:
            ready(agent)
        sdnotify.ready(f"tracing {len(agent.tracer.targets())} processes")
        agent.run(duration)
        sdnotify.stopping()
    finally:
        agent.close()
    return 0
