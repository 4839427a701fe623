"""HTTP request tracing of unmodified servers: load bpf/http.bpf.c, select targets, drain requests.

The kernel builds each request and sends one ring-buffer record for it without waking us; we
drain the ring on a timer in bulk into a numpy array (layout from the object's BTF) and only then
turn records into Request objects (one per request, never per syscall).
"""
from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ...bpf import BpfError, BpfObject, RingBuffer
from ...bpf.elf import library_of
from ..targets import TargetSpec, alive, comm_of

EV_REQUEST, EV_TLS_CONN, EV_REQUEST_START, EV_CONN_CLOSE = 1, 2, 3, 4
F_TLS, F_PIPELINED, F_CLOSED, F_INTERIM, F_NO_RESPONSE, F_IDLE, F_CLIENT = 1, 2, 4, 8, 16, 32, 64
FLAG_NAMES = {F_TLS: "tls", F_PIPELINED: "pipelined", F_CLOSED: "closed", F_INTERIM: "interim",
              F_NO_RESPONSE: "no-response", F_IDLE: "idle", F_CLIENT: "client"}
CS_RESP = 2              # enum http_conn_state
IDLE_REPORT_S = 5.0      # report a finished-looking request of an idle keep-alive connection
STAT_NAMES = ["conn_table_full", "capture_failed", "ssl_unlinked", "tls_connections",
              "stale_connections", "writes_without_request", "targets_full", "requests_completed",
              "stray_reads", "h2_connections", "jvm_records", "jvm_bad_records", "jvm_unlinked",
              "reused_fds", "aggregation_full"]
SSL_FUNCS = [("SSL_read", "http_ssl_read"), ("SSL_write", "http_ssl_write"),
             ("SSL_read_ex", "http_ssl_read_ex"), ("SSL_write_ex", "http_ssl_write_ex")]
# bpf/http.bpf.c's target_slots, the target filter's first step (a power of two): pids up to
# 32768 (pid_max's old default) each have their own; above, they share
TARGET_SLOTS = 1 << 15
DRAIN_MS = 50      # how often the ring is drained (records are sent without wakeups)
HOOK_ENV = "GRIDBPF_HTTP_HOOK"        # auto (default), sock or syscall: what HttpTracer uses
HOOKS = ("auto", "sock", "syscall")
# the programs of each hook (besides fork/exec/exit, shared by all)
HOOK_PROGRAMS = {"sock": ("http_sock_recv", "http_sock_send", "http_sock_state",
                          "http_sock_destroy"),
                 "syscall": ("http_sys_exit",), "floor": ("http_floor_sys_exit",)}


def sock_tracepoints() -> bool:
    """Whether this kernel has sock:sock_recv_length/sock_send_length (Linux 6.3+, from BTF;
    GRIDBPF_HIDE_FEATURES=sock_recv_length hides them)."""
    from ...bpf import features
    return features.has_tracepoint("sock_recv_length") and features.has_tracepoint("sock_send_length")


def choose_hook(requested: str | None = None) -> tuple[str, str]:
    """(hook, why): "sock" (socket tracepoints: only socket I/O pays) where the kernel has them,
    else "syscall" (sys_exit: every syscall of every task pays). REQUESTED (or $GRIDBPF_HTTP_HOOK)
    may force one; forcing "sock" on a kernel without the tracepoints is an error."""
    want = requested or os.environ.get(HOOK_ENV) or "auto"
    if want not in HOOKS:
        raise ValueError(f"unknown HTTP tracing hook {want!r} (one of {', '.join(HOOKS)})")
    have = sock_tracepoints()
    if want == "syscall":
        return "syscall", ("forced (" + (f"{HOOK_ENV}=syscall" if not requested else "hook=syscall")
                           + "): sys_exit of every syscall, the fallback")
    if not have:
        if want == "sock":
            raise ValueError(f"kernel {os.uname().release} lacks the tracepoints "
                             "sock:sock_recv_length/sock_send_length (Linux 6.3+): hook sock unavailable")
        return "syscall", ("kernel lacks sock:sock_recv_length/sock_send_length (Linux 6.3+): "
                           "sys_exit of every syscall, every task pays")
    return "sock", "sock:sock_recv_length/sock_send_length: only socket I/O pays"


@dataclass
class Request:
    time: float             # wall-clock time of the first request byte (seconds since epoch)
    pid: int
    tid: int
    client: str
    port: int
    method: str
    path: str
    version: str
    status: int
    request_bytes: int
    response_bytes: int
    duration: float         # seconds, first request byte read to last response byte written
    ttfb: float | None      # seconds to the first byte of the final response
    tls: bool
    flags: list[str]
    # body sizes: total minus the header block, when the head fit in the kernel's capture
    request_body_bytes: int | None = None
    response_body_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(self.time)) + f".{int(self.time * 1000) % 1000:03d}"
        ttfb = f"{self.ttfb * 1000:.3f}ms" if self.ttfb is not None else "-"
        who = f"[{self.client}]:{self.port}" if ":" in self.client else f"{self.client}:{self.port}"
        return (f"{t} pid={self.pid} tid={self.tid} {who} {self.method} {self.path} {self.version} "
                f"{self.status or '-'} req={self.request_bytes} resp={self.response_bytes} "
                f"dur={self.duration * 1000:.3f}ms ttfb={ttfb}" + (" tls" if self.tls else "")
                + (f" [{','.join(f for f in self.flags if f != 'tls')}]"
                   if set(self.flags) - {"tls", "closed"} else ""))


@dataclass
class RequestStart:
    """A request line was read on a connection (only with HttpTracer(request_start=True))."""
    time: float
    pid: int
    fd: int
    method: str
    path: str
    client: str
    client_port: int
    server: str          # our own address on the connection ("?" if unknown)
    server_port: int


@dataclass
class ConnClose:
    """A traced connection closed (only with request_start=True)."""
    time: float
    pid: int
    fd: int
    client: str
    client_port: int
    server: str
    server_port: int


def _client(caddr: np.ndarray, family: int) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(bytes(caddr[:4])))
    if family == 10:
        a = ipaddress.IPv6Address(bytes(caddr))
        return str(a.ipv4_mapped or a)
    return "?"


def parse_request_line(hdr: bytes, index: int = 0) -> tuple[str, str, str]:
    """(method, path, version) of the INDEX-th request in the captured bytes ('?' if cut off).

    Pipelined requests after the first share the first one's capture: we skip INDEX header
    blocks (requests without bodies, which is what clients pipeline)."""
    for _ in range(index):
        end = hdr.find(b"\r\n\r\n")
        if end < 0:
            return "?", "?", "?"
        hdr = hdr[end + 4:]
    line, sep, _ = hdr.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not sep and len(hdr) >= 200:
        # a request line longer than the capture: method and the start of the path
        if len(parts) >= 2:
            return parts[0].decode("latin-1"), parts[1].decode("latin-1") + "...", "?"
        return "?", "?", "?"
    return parts[0].decode("latin-1"), parts[1].decode("latin-1"), parts[2].decode("latin-1")


def _body(head: bytes, total: int, index: int = 0) -> int | None:
    """Bytes after the INDEX-th header block, or None if the block is not in the capture."""
    pos = 0
    for _ in range(index):
        pos = head.find(b"\r\n\r\n", pos)
        if pos < 0:
            return None
        pos += 4
    end = head.find(b"\r\n\r\n", pos)
    if end < 0:
        return None
    return max(total - (end + 4 - pos), 0)


def _pipelined_bytes(hdr: bytes, index: int, req_bytes: int, flags: int) -> int:
    """Request size of pipelined requests, which arrive in one read and are counted on the first.

    The kernel gives the first request all the bytes of the read and the later ones 0; when the
    whole read was captured and holds only header blocks (no bodies), split it per request."""
    if flags & F_PIPELINED and req_bytes == 0 or index == 0 and req_bytes == len(hdr):
        blocks, pos = [], 0
        while True:
            end = hdr.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            blocks.append(end + 4 - pos)
            pos = end + 4
        if len(blocks) > 1 and index < len(blocks) and (index or pos == len(hdr)):
            return blocks[index]
    return req_bytes


class HttpTracer:
    """Trace HTTP/1.x requests of the processes selected by SPEC.

    tls: attach the OpenSSL uprobes to each libssl the targets map.
    java_agent: load the Java agent (java/) into target JVMs, so that their JSSE TLS is read;
    the agent writes plaintext records only while a tracer holds a lease on it.
    request_start: also report each request when its request line is read, and each
    connection close, with both endpoints (RequestStart / ConnClose from events() and follow()):
    what automatic SciTags tagging subscribes to. Off, the kernel does none of that work.
    floor: load only the cost floor (the syscall hook, pid filter only) -- for benchmarks.
    aggregate_routes: aggregate the simple requests (struct http_agg) in the kernel, their
    http.route matched there against these templates (struct http_route dicts; [] for none):
    they are counted in aggregates(), never sent as records. None (default): every request is
    a record.
    hook: "sock" (socket tracepoints, Linux 6.3+), "syscall" (sys_exit, the fallback) or "auto"
    (default, or $GRIDBPF_HTTP_HOOK): sock where the kernel has it; see choose_hook."""

    def __init__(self, spec: TargetSpec, tls: bool = True, floor: bool = False,
                 idle_report_s: float = IDLE_REPORT_S, request_start: bool = False,
                 java_agent: bool = True, hook: str | None = None,
                 aggregate_routes: list[dict] | None = None):
        if not _can_trace():
            raise PermissionError("tracing needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)")
        spec.validate()
        self.spec, self.tls, self.floor = spec, tls, floor
        self.hook, self.hook_reason = choose_hook(hook)
        # the JVM agent's transport follows the kernel, not the hook: recv (seen by the socket
        # tracepoint) wherever it exists, so agents loaded by tracers of either hook agree
        self.jvm_transport = "recv" if sock_tracepoints() else "write"
        self.obj = BpfObject.open("http")
        # the floor keeps the fork/exec/exit hooks too, so it filters the same processes
        self._hook_progs = HOOK_PROGRAMS["floor" if floor else self.hook]
        self.java_agent = java_agent and tls and not floor
        if self.java_agent and self.hook == "syscall" and self.jvm_transport == "recv":
            self._hook_progs += ("http_sock_bridge",)
        for name, prog in self.obj.programs.items():
            keep = name in self._hook_progs or name in ("http_fork", "http_exec", "http_exit")
            if not (floor or not tls) and name.startswith("http_ssl"):
                keep = True
            prog.autoload = keep
        self.links = []
        self.ssl_libs: dict[str, list] = {}      # libssl path -> its uprobe links
        self.tls_opaque: dict[int, str] = {}     # pid -> why its TLS cannot be read
        self.jvm_agents: dict[int, object] = {}  # pid -> its loaded agent (jvm_agent.JvmAgent)
        self.jvm_skipped: dict[int, str] = {}    # pid -> why no agent could be loaded
        self._lease = f"{os.getpid()}-{id(self):x}"
        self.warnings: list[str] = []
        self.requests_seen = 0
        self._clients: dict = {}               # (family, address bytes) -> text
        self._seeded: set[int] = set()          # processes whose earlier connections we took
        # requests of idle keep-alive connections reported before the kernel sent them:
        # start_ns -> (pid, fd, resp_bytes); the kernel's record, when it comes, is dropped
        self.idle_report_s = idle_report_s
        self._early: dict[int, tuple] = {}
        self._last_idle_scan = time.monotonic()
        self.idle_reported = 0
        self.late_bytes = 0                     # response bytes written after an idle report
        self.request_start = request_start and not floor
        if self.request_start:
            self.obj.rodata["emit_request_start"] = 1
        slots = self.obj.maps["target_slots"]
        slots.max_entries = TARGET_SLOTS
        self.obj.rodata["target_slot_mask"] = TARGET_SLOTS - 1
        self.aggregating = aggregate_routes is not None and not floor
        if self.aggregating:
            self._set_aggregation(aggregate_routes)
        try:
            self.obj.load()
            self.dtype = self.obj.btf.dtype("struct http_event")
            self._conn_dtype = self.obj.btf.dtype("struct http_conn")
            self._agg_dtype = self.obj.btf.dtype("struct http_agg")
            self.tgids = spec.install(self.obj)
            for name in self._hook_progs + ("http_fork", "http_exec", "http_exit"):
                self.links.append(self.obj.program(name).attach_trace())
            self.ring = RingBuffer(self.obj, "events")
            # time base: the kernel stamps CLOCK_MONOTONIC
            self._wall_offset = time.time() - time.monotonic()
            self.refresh()
            # what existed at attach is followed now: a socket's first write may make an
            # entry (an outbound connection's) from here on (see `seeded` in http.bpf.c)
            self.obj.bss["seeded"] = 1
        except Exception:
            self.close()
            raise

    def _set_aggregation(self, routes: list[dict]) -> None:
        from ...export.metrics import DURATION_BUCKETS, SIZE_BUCKETS
        dt = self.obj.btf.dtype("struct http_agg")
        for field, bounds in (("dur_buckets", DURATION_BUCKETS), ("resp_buckets", SIZE_BUCKETS)):
            if dt[field].shape != (len(bounds) + 1,):
                raise ValueError(f"http.bpf.o's struct http_agg has {dt[field].shape[0]} {field}, "
                                 f"export.metrics {len(bounds) + 1}: rebuild it (make bpf)")
        ro = self.obj.rodata
        ro["aggregate"] = 1
        # a request idle this long may be reported from the table (_idle_records) before the
        # kernel finishes it: such ones come as records, which _drop_early can match
        ro["agg_max_age_ns"] = int(self.idle_report_s * 1e9 * 7 / 8) if self.idle_report_s \
            else (1 << 64) - 1
        ro["route_count"] = len(routes)
        if routes:
            ro["routes"] = routes + [{}] * (8 - len(routes))
        ro["dur_bounds_ns"] = [round(b * 1e9) for b in DURATION_BUCKETS]
        ro["size_bounds"] = list(SIZE_BUCKETS)

    def aggregates(self) -> dict[tuple[int, int, int], dict]:
        """The kernel's histograms of simple requests, cumulative since load, the CPUs added
        up: (status, method (0 GET, 1 HEAD), route (0 none, else template index + 1)) ->
        struct http_agg's fields (the bucket fields as int64 arrays)."""
        if not self.aggregating:
            return {}
        dt = self._agg_dtype
        out = {}
        for key, cpus in self.obj.map("aggs").lookup_batch(chunk=256):
            v = np.frombuffer(b"".join(bytes(c) for c in cpus), dt)
            dur_seen, resp_seen = v["count"] > 0, v["resp_count"] > 0
            one = {f: int(v[f].sum()) for f in ("count", "dur_sum_ns", "resp_count", "resp_sum")}
            one.update(
                dur_min_ns=int(v["dur_min_ns"][dur_seen].min()) if dur_seen.any() else 0,
                dur_max_ns=int(v["dur_max_ns"].max()),
                dur_buckets=v["dur_buckets"].sum(axis=0).astype(np.int64),
                resp_min=int(v["resp_min"][resp_seen].min()) if resp_seen.any() else 0,
                resp_max=int(v["resp_max"].max()),
                resp_buckets=v["resp_buckets"].sum(axis=0).astype(np.int64))
            out[(key.status, key.method, key.route)] = one
        return out

    def hook_programs(self) -> list:
        """The loaded programs of the chosen hook (their run time is the tracing cost)."""
        return [self.obj.program(n) for n in self._hook_progs]

    # --- targets -------------------------------------------------------------------------------

    def targets(self) -> list[int]:
        return sorted(int(k) for k in self.obj.map("targets").keys())

    def refresh(self) -> None:
        """Pick up processes that match now, hook new libssl copies, forget dead processes."""
        self._take_new_targets(self.spec.resolve())
        live = self.targets()
        if not self.floor:
            for pid in set(live) - self._seeded:        # new by fork or exec (in the kernel)
                self.seed_connections(pid)
        gone = self._seeded - set(live)
        self._seeded = set(live)
        if self.tls and not self.floor:
            for pid in live:
                self._hook_ssl(pid)
        if self.java_agent:
            self._refresh_jvms(live)
        if gone:
            # the kernel drops a process's connections when it exits; this catches the rest
            self._sweep(set(live))

    def _take_new_targets(self, tgids: set[int]) -> None:
        """Make TGIDS targets, reading the connections of the running ones that were not
        (matched now by comm or cgroup) first: while a process is no target its I/O is not
        seen, so a response written before /proc is read cannot make an ignored (outbound)
        entry of its connection, as it could once the process is a target."""
        if not self.floor:
            known = set(self.targets())
            for pid in tgids - known - self._seeded:
                self.seed_connections(pid)
                self._seeded.add(pid)
        self.tgids = self.spec.refresh(self.obj, tgids)

    def seed_connections(self, pid: int) -> int:
        """Follow connections PID accepted before we started (from /proc): established TCP
        sockets whose local port PID's processes listen on. Their next request is traced."""
        try:
            socks = _socket_fds(pid)
            table = _tcp_table(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return 0
        listening = {t["lport"] for t in table.values() if t["state"] == TCP_LISTEN}
        conns, n = self.obj.map("conns"), 0
        for fd, inode in socks.items():
            t = table.get(inode)
            if t is None or t["state"] != TCP_ESTABLISHED or t["lport"] not in listening:
                continue
            key = {"tgid": pid, "fd": fd}
            if key_in(conns, key):
                continue
            conns[key] = {"ev": {"pid": pid, "fd": fd, "family": t["family"], "cport": t["rport"],
                                 "caddr": list(t["raddr"].ljust(16, b"\0")),
                                 "sport": t["lport"], "saddr": list(t["laddr"].ljust(16, b"\0"))}}
            n += 1
        return n

    def _hook_ssl(self, pid: int) -> None:
        try:
            lib = library_of(pid, "libssl.so")
        except ProcessLookupError:
            return
        except PermissionError:
            self.warnings.append(f"cannot read /proc/{pid}/maps: TLS of pid {pid} not hooked")
            return
        if lib is None or lib in self.ssl_libs:
            return
        links = []
        path = f"/proc/{pid}/root{lib}" if not os.path.exists(lib) else lib
        try:
            for sym, prog in SSL_FUNCS:
                p = self.obj.program(prog)
                try:
                    links.append(p.attach_uprobe(path, sym))
                except LookupError:
                    continue     # OpenSSL 1.1.0 has no _ex forms
                links.append(self.obj.program("http_ssl_ret").attach_uprobe(path, sym, retprobe=True))
        except (BpfError, OSError) as exc:
            self.warnings.append(f"cannot hook {lib} of pid {pid}: {exc}")
        self.ssl_libs[lib] = links

    def _refresh_jvms(self, live: list[int]) -> None:
        """Load the agent into target JVMs not seen before; renew our leases on the others.

        Every target JVM gets it at first sight, not at its first TLS connection: that
        connection's requests would be lost while the agent loads (about a second). The agent
        does nothing measurable while no tracer holds a lease."""
        for pid in list(self.jvm_agents):
            if pid not in live:
                self.jvm_agents.pop(pid).release()
        for pid in live:
            agent = self.jvm_agents.get(pid)
            if agent is not None:
                agent.renew()
            elif pid not in self.jvm_skipped and _maps_libjvm(pid):
                from . import jvm_agent
                try:
                    agent = jvm_agent.attach(pid, self._lease, transport=self.jvm_transport)
                except jvm_agent.JvmNotReady:
                    continue            # a JVM still starting: next refresh
                except (jvm_agent.JvmAttachError, OSError) as exc:
                    # OSError: e.g. EPERM without CAP_CHOWN/CAP_KILL for another user's JVM
                    why = str(exc) if isinstance(exc, jvm_agent.JvmAttachError) else \
                        f"pid {pid}: cannot load the Java agent: {exc}"
                    self.jvm_skipped[pid] = why
                    self.warnings.append(f"{why}: its TLS requests are not traced")
                    continue
                if agent.transport == "write":
                    # the agent's /dev/null fd becomes a bridge entry of the connection table:
                    # the syscall hook's one lookup finds its records (no extra cost for other
                    # writes). The recv transport needs no entry: the record's magic tells it.
                    self.obj.map("conns")[{"tgid": pid, "fd": agent.bridge_fd}] = {
                        "ev": {"pid": pid, "fd": agent.bridge_fd}, "bridge": 1}
                self.jvm_agents[pid] = agent

    def _sweep(self, live: set[int]) -> None:
        """Delete connections of processes that are gone and were not cleaned up at exit (the
        kernel drops them when the last thread exits; this covers targets it never saw exit)."""
        conns = self.obj.map("conns")
        for start, (pid, _fd, _rb) in list(self._early.items()):
            if pid not in live and not alive(pid):
                del self._early[start]
        dead = [k for k in conns.keys() if k.tgid not in live and not alive(k.tgid)]
        for k in dead:
            try:
                del conns[k]
            except KeyError:
                pass

    # --- events --------------------------------------------------------------------------------

    def poll_array(self, timeout_ms: int = 0) -> np.ndarray:
        """Drain the ring into a numpy array of struct http_event (all kinds)."""
        if timeout_ms:
            time.sleep(timeout_ms / 1000)     # records come without wakeups: drain on a timer
        arr = self.ring.poll_array(self.dtype)
        if self._early and len(arr):
            arr = self._drop_early(arr)
        idle = self._idle_due()
        if len(idle):
            arr = np.concatenate([arr, idle]) if len(arr) else idle
        return arr

    def lend_chunks(self, timeout_ms: int = 0, rows: int = 1024):
        """poll_array without copying the records out of the ring, as chunks of up to ROWS
        records, each valid until the next is asked for (see RingBuffer.lend_chunks). For
        consumers that reduce a batch quickly and keep nothing of it: the agent's histograms
        (the streaming CLI copies: its slower encoding would leave the backlog in the ring)."""
        if timeout_ms:
            time.sleep(timeout_ms / 1000)     # records come without wakeups: drain on a timer
        for part in self.ring.lend_chunks(self.dtype, rows):
            if self._early:
                part = self._drop_early(part)
            if len(part):
                yield part
        idle = self._idle_due()
        if len(idle):
            yield idle

    def _idle_due(self) -> np.ndarray:
        """The idle requests of the connection table, when a scan is due (else none)."""
        if self.idle_report_s and not self.floor and \
                time.monotonic() - self._last_idle_scan >= max(1.0, self.idle_report_s / 2):
            self._last_idle_scan = time.monotonic()
            return self._idle_records()
        return np.empty(0, self.dtype)

    def _idle_records(self) -> np.ndarray:
        """Requests whose response looks finished on a connection idle for idle_report_s.

        The kernel sends a request when the next one starts or the connection closes, so the
        last request of a keep-alive connection that stays open would wait for that. We read
        the connection table (never write it: no race with the kernel) and report those now;
        the kernel's record for the same request is dropped when it arrives (_drop_early)."""
        # 256 entries per syscall: the default 4096 zero-fills a 1.6 MB value buffer on every
        # scan, which showed as the agent's peak RSS
        # the clock before the table: an entry's age is never overstated (the kernel's
        # aggregation relies on it, see _set_aggregation)
        horizon = time.monotonic_ns() - int(self.idle_report_s * 1e9)
        items = self.obj.map("conns").lookup_batch(chunk=256)
        if not items:
            return np.empty(0, self.dtype)
        conn_dt = self._conn_dtype
        c = np.frombuffer(b"".join(bytes(v) for _k, v in items), conn_dt)
        ev = c["ev"]
        sel = (c["state"] == CS_RESP) & (ev["end_ns"] > 0) & (ev["end_ns"] < horizon)
        if not sel.any():
            return np.empty(0, self.dtype)
        out = ev[sel].copy()
        fresh = np.array([int(s) not in self._early for s in out["start_ns"].tolist()], bool)
        out = out[fresh]
        out["kind"] = EV_REQUEST
        out["flags"] |= F_IDLE
        for pid, fd, start, rb in zip(out["pid"].tolist(), out["fd"].tolist(),
                                      out["start_ns"].tolist(), out["resp_bytes"].tolist()):
            self._early[start] = (pid, fd, rb)
        self.idle_reported += len(out)
        return out

    def _drop_early(self, arr: np.ndarray) -> np.ndarray:
        """Drop the kernel's records of requests already reported as idle (matched on start
        time, pid and fd); bytes written after that report are counted in late_bytes."""
        starts = np.fromiter(self._early, np.uint64, len(self._early))
        hit = np.isin(arr["start_ns"], starts) & (arr["kind"] == EV_REQUEST)
        if not hit.any():
            return arr
        keep = np.ones(len(arr), bool)
        for i in np.nonzero(hit)[0].tolist():
            start = int(arr["start_ns"][i])
            pid, fd, rb = self._early[start]
            if pid == int(arr["pid"][i]) and fd == int(arr["fd"][i]):
                keep[i] = False
                self.late_bytes += max(int(arr["resp_bytes"][i]) - rb, 0)
                del self._early[start]
        return arr[keep]

    def requests_only(self, arr: np.ndarray) -> np.ndarray:
        """The request records of a drained batch; TLS-connection records are handled here."""
        kind = arr["kind"]
        tls = kind == EV_TLS_CONN
        if tls.any():
            for pid in set(arr["pid"][tls].tolist()):
                self._tls_conn(pid)
        return arr[kind == EV_REQUEST]

    def decode(self, arr: np.ndarray) -> list[Request]:
        """Records -> Requests. Columns are turned into Python lists once (numpy row access is
        slow), so the per-request work is plain bytes and int handling."""
        out: list[Request] = []
        if not len(arr):
            return out
        kind = arr["kind"]
        if (kind == EV_TLS_CONN).any():
            for pid in set(arr["pid"][kind == EV_TLS_CONN].tolist()):
                self._tls_conn(pid)
        reqs = arr[kind == EV_REQUEST]
        if not len(reqs):
            return out
        start = reqs["start_ns"]
        wall = (start / 1e9 + self._wall_offset).tolist()
        dur = ((reqs["end_ns"] - start) / 1e9).tolist()
        ttfb_ns = reqs["ttfb_ns"]
        ttfb = np.where(ttfb_ns > 0, (ttfb_ns - start) / 1e9, -1.0).tolist()
        hdrs, hlens = reqs["hdr"].tolist(), reqs["hdr_len"].tolist()
        resp_body = response_body_sizes(reqs).tolist()
        caddr = [bytes(c) for c in reqs["caddr"]]
        cols = [reqs[k].tolist() for k in ("pid", "tid", "family", "cport", "status", "flags",
                                           "pipe_idx", "req_bytes", "resp_bytes")]
        clients = self._clients
        for i, (pid, tid, family, port, status, flags, pipe, qb, rb) in enumerate(zip(*cols)):
            hdr = hdrs[i][:hlens[i]]
            method, path, version = parse_request_line(hdr, pipe)
            if pipe or flags & F_PIPELINED or qb == len(hdr):
                qb = _pipelined_bytes(hdr, pipe, qb, flags)
            key = (family, caddr[i])
            client = clients.get(key)
            if client is None:
                client = clients[key] = _client(np.frombuffer(caddr[i], np.uint8), family)
            out.append(Request(
                wall[i], pid, tid, client, port, method, path, version, status, qb, rb, dur[i],
                ttfb[i] if ttfb[i] >= 0 else None, bool(flags & F_TLS),
                [n for b, n in FLAG_NAMES.items() if flags & b] if flags else [],
                _body(hdr, qb, pipe), resp_body[i] if resp_body[i] >= 0 else None))
        self.requests_seen += len(out)
        return out

    def poll(self, timeout_ms: int = DRAIN_MS) -> list[Request]:
        return self.decode(self.poll_array(timeout_ms))

    def events(self, arr: np.ndarray) -> list:
        """RequestStart and ConnClose records of a drained batch, in the kernel's order."""
        kind = arr["kind"]
        sel = arr[(kind == EV_REQUEST_START) | (kind == EV_CONN_CLOSE)]
        out = []
        for r in sel:
            family = int(r["family"])
            client, server = _client(r["caddr"], family), _client(r["saddr"], family)
            if not server_known(r["saddr"], int(r["sport"])):
                server = "?"
            t = int(r["start_ns"]) / 1e9 + self._wall_offset
            if int(r["kind"]) == EV_CONN_CLOSE:
                out.append(ConnClose(t, int(r["pid"]), int(r["fd"]), client, int(r["cport"]),
                                     server, int(r["sport"])))
                continue
            hdr = bytes(r["hdr"][:int(r["hdr_len"])])
            method, path, _v = parse_request_line(hdr)
            out.append(RequestStart(t, int(r["pid"]), int(r["fd"]), method, path, client,
                                    int(r["cport"]), server, int(r["sport"])))
        return out

    def follow(self, stop, refresh_s: float = 2.0, timeout_ms: int = DRAIN_MS):
        """Iterate over RequestStart, ConnClose and (finished) Request objects until the
        threading.Event STOP is set. Request starts wake us at once; finished requests come
        with the next drain. Targets are refreshed every REFRESH_S seconds."""
        last = time.monotonic()
        while not stop.is_set():
            self.ring.wait(timeout_ms)
            arr = self.poll_array(0)
            if len(arr):
                yield from self.events(arr)
                yield from self.decode(arr)
            if time.monotonic() - last >= refresh_s:
                self.refresh()
                last = time.monotonic()

    def _tls_conn(self, pid: int) -> None:
        """A connection carries TLS records: readable only if that process's libssl is hooked."""
        if pid in self.tls_opaque:
            return
        try:
            lib = library_of(pid, "libssl.so")
        except ProcessLookupError:
            lib = None
        if lib is not None and self.ssl_libs.get(lib):
            return
        if pid in self.jvm_agents:
            return
        comm = comm_of(pid) or "?"
        if pid in self.jvm_skipped:
            why = f"pid {pid} ({comm}) serves TLS: {self.jvm_skipped[pid]}"
        elif comm == "java" or _maps_libjvm(pid):
            why = (f"pid {pid} ({comm}) is a JVM serving TLS (JSSE) and the Java agent is off "
                   f"(--no-java-agent): connections are counted, requests are not reported")
        elif not self.tls:
            why = f"pid {pid} ({comm}) serves TLS and TLS tracing is off (--no-tls)"
        else:
            why = (f"pid {pid} ({comm}) serves TLS without a libssl we can hook "
                   f"(static or non-OpenSSL TLS): its requests cannot be read")
        self.tls_opaque[pid] = why
        self.warnings.append(why)

    # --- counters ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        m = self.obj.map("stats")
        out = {name: int(m.sum(i) or 0) for i, name in enumerate(STAT_NAMES)}
        out["events_lost"] = int(self.ring.lost)
        out["idle_reported"] = self.idle_reported
        out["late_bytes_after_idle_report"] = self.late_bytes
        out["events_received"] = int(self.ring.received)
        out["jvm_agents"] = len(self.jvm_agents)
        return out

    def close(self) -> None:
        # first: agents stop writing records as soon as no lease is left
        for agent in getattr(self, "jvm_agents", {}).values():
            agent.release()
        self.jvm_agents = {}
        for links in getattr(self, "ssl_libs", {}).values():
            for link in links:
                link.detach()
        for link in getattr(self, "links", []):
            link.detach()
        self.links = []
        self.ssl_libs = {}
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None
        if getattr(self, "obj", None) is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def response_body_sizes(reqs: np.ndarray) -> np.ndarray:
    """Response body bytes per record, -1 where the kernel could not tell the head's length."""
    head = reqs["resp_head_len"].astype(np.int64)
    body = reqs["resp_bytes"].astype(np.int64) - reqs["interim_bytes"] - head
    return np.where(head > 0, np.maximum(body, 0), -1)


TCP_ESTABLISHED, TCP_LISTEN = 1, 10


def key_in(m, key) -> bool:
    try:
        return m.get(key) is not None
    except KeyError:
        return False


def _socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode of a process."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(fd)] = int(target[8:-1])
    return out


def _tcp_table(pid: int) -> dict[int, dict]:
    """inode -> {state, family, lport, raddr (network-order bytes), rport} in PID's netns."""
    out = {}
    for name, family in (("tcp", 2), ("tcp6", 10)):
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            laddr, lport = f[1].split(":")
            raddr, rport = f[2].split(":")
            # /proc prints each 32-bit word of the address in host (little-endian) order
            raw = bytes.fromhex(raddr)
            raddr_b = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            raw = bytes.fromhex(laddr)
            laddr_b = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = {"state": int(f[3], 16), "family": family, "lport": int(lport, 16),
                              "raddr": raddr_b, "rport": int(rport, 16), "laddr": laddr_b}
    return out


def server_known(saddr, sport: int) -> bool:
    return sport != 0 or any(bytes(saddr))


def _can_trace() -> bool:
    """CAP_BPF (39) with CAP_PERFMON (38), or CAP_SYS_ADMIN (21), in our effective set."""
    with open("/proc/self/status") as f:
        caps = next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    return bool(caps >> 21 & 1) or bool(caps >> 39 & 1 and caps >> 38 & 1)


def _maps_libjvm(pid: int) -> bool:
    try:
        return library_of(pid, "libjvm.so") is not None
    except ProcessLookupError:
        return False
