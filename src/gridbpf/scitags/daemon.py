"""`gridbpf scitags run`: the flowd drop-in.

Inputs (all end up in Daemon.start_flow / end_flow): flowd's named pipe, the local HTTP API,
and traced requests by path prefix (autotag.AutoTagger). Outputs: the kernel's flow table
(marking), fireflies, Prometheus metrics. Python runs per flow event, never per packet.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import stat
import threading
import time
from dataclasses import dataclass, field

from . import firefly, label
from .config import Config
from .flows import FiveTuple, FlowEvent, InputError, parse_pipe_line
from .registry import Registry, RegistryError

log = logging.getLogger("gridbpf.scitags")
MAX_LINE = 4096
QUIET_NS = 250_000_000   # an ending flow is drained once no packet crossed tc for this long
LINGER_MAX = 5.0         # seconds an ending flow may stay registered after its end line
CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)   # not in Python 3.11's time


class DaemonError(RuntimeError):
    pass


@dataclass
class Flow:
    tuple: FiveTuple
    experiment_id: int
    activity_id: int
    experiment: str
    activity: str
    label: int
    source: str
    start: float
    end: float | None = None
    counters: dict = field(default_factory=dict)
    last_firefly: float = 0.0

    @property
    def markable(self) -> bool:
        return self.tuple.src.version == 6

    def usage(self) -> dict | None:
        if not self.counters:
            return None
        return {"sent": self.counters.get("sent", 0), "received": self.counters.get("received", 0)}

    def to_json(self) -> dict:
        out = self.tuple.to_json()
        out.update({
            "experiment": self.experiment, "experiment_id": self.experiment_id,
            "activity": self.activity, "activity_id": self.activity_id,
            "scitag": label.scitag(self.experiment_id, self.activity_id),
            "label": self.label if self.markable else None,
            "label_hex": f"0x{self.label:05x}" if self.markable else None,
            "markable": self.markable,
            "not_markable_reason": None if self.markable else "IPv4 has no flow label: counted and reported only",
            "source": self.source, "start_time": firefly.utc_iso(self.start),
            "state": "active" if self.end is None else "ending",
        })
        c = self.counters
        out.update({"sent_bytes": c.get("sent", 0), "received_bytes": c.get("received", 0),
                    "sent_packets": c.get("sent_packets", 0), "received_packets": c.get("received_packets", 0)})
        return out


class Daemon:
    def __init__(self, cfg: Config, registry: Registry | None = None):
        self.cfg = cfg
        self.registry = registry or Registry.load(cfg.registry_path or None)
        self.marker = None
        self.active: dict[FiveTuple, Flow] = {}
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.sender = firefly.Sender()
        self.firefly_targets = [firefly.parse_target(c) for c in cfg.firefly_collectors]
        # totals per (experiment, activity) of flows that ended, for the metrics
        self.ended_totals: dict[tuple[str, str], dict] = {}
        self.started: dict[tuple[str, str], int] = {}
        self.input_errors: dict[str, int] = {"pipe": 0, "api": 0, "trace": 0}
        self.lost_flows = 0
        self.invalid_fireflies = 0
        self._threads: list[threading.Thread] = []
        self._http = None
        self.tracer = None
        self.traced_conns: dict[tuple[int, int], set[FiveTuple]] = {}   # (pid, fd) -> flows
        self._lock_fd = None
        self._made_pipe = False

    # --- flows ---------------------------------------------------------------------------------

    def start_flow(self, ev: FlowEvent, source: str) -> Flow:
        exp_id, act_id, exp_name, act_name = self.registry.resolve(ev.experiment, ev.activity)
        now = time.time()
        with self.lock:
            old = self.active.get(ev.flow)
            if old is not None:        # a new request on a kept-alive connection: a new flow
                self._finish(old, now)
            if self.marker is not None and len(self.active) >= self.marker.capacity:
                raise InputError(f"flow table full ({self.marker.capacity} flows): {ev.flow} not registered")
            flow = Flow(ev.flow, exp_id, act_id, exp_name, act_name,
                        label.encode(exp_id, act_id, label.random_entropy()), source, now)
            if self.marker is not None:
                self.marker.add(ev.flow, flow.label, mark_reverse=self.cfg.mark_reverse)
            self.active[ev.flow] = flow
            key = (exp_name, act_name)
            self.started[key] = self.started.get(key, 0) + 1
        if not flow.markable:
            log.warning("flow %s (%s/%s) is IPv4: counted and reported, not marked (no flow label)",
                        ev.flow, exp_name, act_name)
        else:
            log.info("start %s %s/%s label 0x%05x (%s)", ev.flow, exp_name, act_name, flow.label, source)
        self._firefly(flow, "start", now)
        return flow

    def end_flow(self, ft: FiveTuple, source: str) -> Flow:
        """The application says FLOW ended. What it wrote last may still sit in the socket
        buffer (nginx logs a download when sendfile returns, not when the bytes have left), so
        the flow stays marked and counted until no packet crossed tc for QUIET_NS (at most
        LINGER_MAX seconds); reap() then finishes it and sends the end firefly."""
        with self.lock:
            flow = self.active.get(ft)
            if flow is None:
                raise InputError(f"end of {ft}: no such active flow")
            if flow.end is not None:
                log.info("end %s again (%s): already ending", ft, source)
                return flow
            flow.end = time.time()
            if self.marker is not None:
                flow.counters = self.marker.counters(ft) or flow.counters
            else:
                self._finish(flow, flow.end)    # nothing in flight to wait for
        log.info("end %s (%s): sent %d received %d bytes so far", ft, source,
                 flow.counters.get("sent", 0), flow.counters.get("received", 0))
        return flow

    def reap(self, force: bool = False) -> int:
        """Finish the ending flows whose packets have stopped; FORCE: all of them now."""
        done = 0
        now_coarse = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)   # bpf_ktime_get_coarse_ns's clock
        with self.lock:
            for flow in [f for f in self.active.values() if f.end is not None]:
                c = self.marker.counters(flow.tuple) if self.marker is not None else None
                quiet = c is None or now_coarse - c["last_ns"] >= QUIET_NS
                if force or quiet or time.time() - flow.end >= LINGER_MAX:
                    self._finish(flow, time.time())
                    done += 1
        return done

    def _finish(self, flow: Flow, now: float) -> None:
        """Unregister (lock held), keep its totals, send the end firefly."""
        if self.marker is not None:
            c = self.marker.remove(flow.tuple)
            if c is None:
                self.lost_flows += 1
                log.error("flow %s was no longer in the kernel table: its counters are lost", flow.tuple)
            else:
                flow.counters = c
        if flow.end is None:
            flow.end = now
        del self.active[flow.tuple]
        t = self.ended_totals.setdefault((flow.experiment, flow.activity), _zero_totals())
        for k in t:
            t[k] += flow.counters.get(k, 0)
        log.info("finished %s: sent %d received %d bytes", flow.tuple, flow.counters.get("sent", 0),
                 flow.counters.get("received", 0))
        self._firefly(flow, "end", now)

    def handle_event(self, ev: FlowEvent, source: str) -> Flow:
        return self.start_flow(ev, source) if ev.state == "start" else self.end_flow(ev.flow, source)

    def handle_line(self, line: str, source: str = "pipe") -> Flow | None:
        """One named-pipe line; malformed input is logged in one line and counted, never raised."""
        line = line.strip()
        if not line:
            return None
        try:
            return self.handle_event(parse_pipe_line(line), source)
        except (InputError, RegistryError) as exc:
            self.input_errors[source] = self.input_errors.get(source, 0) + 1
            log.error("%s: rejected %r: %s", source, line[:200], exc)
            return None

    def refresh(self) -> None:
        """Read the kernel counters of the active flows (for listings, metrics, ongoing)."""
        if self.marker is None:
            return
        with self.lock:
            for flow in list(self.active.values()):
                c = self.marker.counters(flow.tuple)
                if c is None:
                    self.lost_flows += 1
                    log.error("flow %s vanished from the kernel table (evicted): unregistered", flow.tuple)
                    flow.end = time.time()
                    del self.active[flow.tuple]
                    continue
                flow.counters = c

    def flows_json(self) -> dict:
        self.refresh()
        with self.lock:
            flows = [f.to_json() for f in self.active.values()]
        return {"flows": flows, "kernel": self.marker.stats() if self.marker else None,
                "input_errors": dict(self.input_errors), "lost_flows": self.lost_flows,
                "fireflies": {"sent": self.sender.sent, "errors": self.sender.errors}}

    # --- fireflies -----------------------------------------------------------------------------

    def _firefly(self, flow: Flow, state: str, now: float) -> None:
        if not self.cfg.firefly_enabled:
            return
        msg = firefly.message(state, flow.tuple, flow.experiment_id, flow.activity_id,
                              start=flow.start, end=flow.end if state == "end" else None, now=now,
                              application=self.cfg.application,
                              usage=flow.usage() if state != "start" else None)
        try:
            firefly.validate(msg)
        except ValueError as exc:
            self.invalid_fireflies += 1
            log.error("%s: not sent: %s", flow.tuple, exc)
            return
        data = firefly.packet(msg, now, self.cfg.hostname or None)
        targets = list(self.firefly_targets)
        if self.cfg.firefly_to_destination:
            targets.insert(0, (str(flow.tuple.dst), firefly.PORT))
        for host, port in targets:
            self.sender.send(data, host, port)
        flow.last_firefly = now

    def ongoing(self) -> None:
        interval = self.cfg.firefly_interval
        if not interval:
            return
        now = time.time()
        self.refresh()
        with self.lock:
            due = [f for f in self.active.values() if f.end is None and now - f.last_firefly >= interval]
            for f in due:
                self._firefly(f, "ongoing", now)

    # --- the named pipe ------------------------------------------------------------------------

    def _open_pipe(self) -> int:
        path = self.cfg.pipe_path
        try:
            st = os.stat(path)
            if not stat.S_ISFIFO(st.st_mode):
                raise DaemonError(f"pipe.path {path} exists and is not a named pipe")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            os.mkfifo(path, 0o622)
            os.chmod(path, 0o622)      # writers (StoRM's user) write; only we read
            self._made_pipe = True
        # O_RDWR: we are a writer too, so the pipe never reads EOF between StoRM's writes
        return os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def _pipe_loop(self, fd: int) -> None:
        buf = b""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(200):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if len(buf) > MAX_LINE:
                self.input_errors["pipe"] += 1
                log.error("pipe: rejected a line longer than %d bytes without newline", MAX_LINE)
                buf = b""
            for raw in lines:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.input_errors["pipe"] += 1
                    log.error("pipe: rejected a line that is not UTF-8: %r", raw[:100])
                    continue
                try:
                    self.handle_line(text, "pipe")
                except Exception as exc:     # a bug or a kernel error must not end the pipe reader
                    self.input_errors["pipe"] += 1
                    log.error("pipe: %r failed: %s: %s", text[:200], type(exc).__name__, exc)
        os.close(fd)

    # --- lifecycle -----------------------------------------------------------------------------

    def _take_lock(self) -> None:
        path = self.cfg.lock_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DaemonError(f"already running (lock {path} is held)") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def start(self) -> None:
        """Lock, attach, open inputs; everything is undone by close(), also on failure."""
        from .api import make_server
        try:
            self._take_lock()
            if self.cfg.interfaces:
                from .marker import Marker
                self.marker = Marker(self.cfg.interfaces, count_ingress=self.cfg.count_ingress)
                log.info("marking on %s", ", ".join(map(str, self.cfg.interfaces)))
            else:
                log.warning("no marking.interfaces: fireflies only, no marking, no byte counts")
            self._http = make_server(self, *self.cfg.api_listen)
            self._spawn(self._http.serve_forever, "api")
            if self.cfg.pipe_path:
                fd = self._open_pipe()
                self._spawn(lambda: self._pipe_loop(fd), "pipe")
                log.info("reading flowd pipe %s", self.cfg.pipe_path)
            log.info("API and /metrics on http://%s:%d/", *self.cfg.api_listen)
        except BaseException:
            self.close()
            raise

    # --- automatic tagging of a traced service ---------------------------------------------------

    def start_tracing(self, tagger) -> None:
        """Trace the [trace] target's HTTP requests in-process and feed them to TAGGER: a
        request line read tags the connection (in its data direction) at once, while the
        response is still to be written; the connection's close ends its flows."""
        from ..trace.http.tracer import HttpTracer
        from ..trace.targets import TargetSpec
        spec = TargetSpec(pids=list(self.cfg.trace_pids), comms=list(self.cfg.trace_comms),
                          cgroups=list(self.cfg.trace_cgroups))
        if spec.empty:
            raise DaemonError("auto_tag rules need a [trace] target: pids, comms or cgroups")
        self.tracer = HttpTracer(spec, tls=self.cfg.trace_tls, request_start=True)
        self._spawn(lambda: self._trace_loop(tagger), "trace")
        log.info("auto tagging requests of %s by path prefix (%s)", spec.describe(),
                 ", ".join(r.prefix for r in tagger.rules))

    def _trace_loop(self, tagger) -> None:
        from ..trace.http.tracer import ConnClose, RequestStart
        from .autotag import data_direction
        for ev in self.tracer.follow(self.stop_event):
            try:
                if isinstance(ev, RequestStart):
                    if ev.server == "?":
                        raise InputError(f"{ev.method} {ev.path}: the server address of pid {ev.pid} "
                                         f"fd {ev.fd} is unknown")
                    ft = data_direction(ev.method, "tcp", ev.server, ev.server_port, ev.client,
                                        ev.client_port)
                    if tagger.on_request(ft, ev.path) is not None:
                        self.traced_conns.setdefault((ev.pid, ev.fd), set()).add(ft)
                elif isinstance(ev, ConnClose):
                    for ft in self.traced_conns.pop((ev.pid, ev.fd), ()):
                        tagger.on_close(ft)
            except (InputError, RegistryError, ValueError) as exc:
                self.input_errors["trace"] += 1
                log.error("trace: %s", exc)

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=f"scitags-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def run(self) -> None:
        """Until SIGTERM/SIGINT: periodic work (ongoing fireflies, eviction checks)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        last_ongoing = last_check = time.monotonic()
        last_error = None
        while not self.stop_event.wait(0.1):
            try:
                self.reap()
                if time.monotonic() - last_ongoing >= 0.5:
                    self.ongoing()
                    last_ongoing = time.monotonic()
                if time.monotonic() - last_check > 10:
                    self.refresh()
                    last_check = time.monotonic()
            except Exception as exc:    # keep marking; say it once, not every 0.1 s
                if repr(exc) != last_error:
                    log.error("periodic work failed: %s: %s", type(exc).__name__, exc)
                    last_error = repr(exc)

    def close(self) -> None:
        self.stop_event.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        for t in self._threads:
            t.join(timeout=2)
        self._threads.clear()
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        if self.marker is not None or self.active:
            self.reap(force=True)           # inputs are closed: finish what was ending
        if self._made_pipe:
            try:
                os.unlink(self.cfg.pipe_path)
            except FileNotFoundError:
                pass
            self._made_pipe = False
        if self.marker is not None:
            self.marker.close()
            self.marker = None
        self.sender.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _zero_totals() -> dict:
    return {"sent": 0, "received": 0, "sent_packets": 0, "received_packets": 0}
