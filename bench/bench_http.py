"""Cost of HTTP request tracing: wrk against nginx (small GETs, keep-alive), side by side in
interleaved rounds, with:
  off    no BPF at all
  floor  the syscall hook (sys_exit) with a program that only filters by syscall and pid
  sockfloor  the socket hook (sock_recv_length/sock_send_length) filtering by pid only
  trace  the tracer on its default hook (the socket tracepoints on 6.3+) as the agent runs it by
         default: simple requests aggregated in the kernel, the others drained as records and
         added to the same histograms on a timer
  trace-records  the same with every request a record (the agent with aggregate = false, or
         with OTLP spans)
  trace-syscall  trace on the syscall hook (the fallback of kernels before 6.3)
  stream the real `gridbpf trace http --json` process printing every request into a pipe that
         a reader drains (like `| tail` or a file): what a user watching a busy server costs
  stream-sampled  the same with --max-rate 1000: a sample printed, the rest counted
  off-varied, stream-varied  off and stream again with every request for another file (20,000
         files of varied sizes, in turn): a storage node's traffic, where a batch of records
         shares connections but no path or size (the stream encoder shares what repeats)
and rounds with the whole agent (Prometheus + histograms) for its memory, alternating with
OTLP on as well (metrics every second and spans at the default cap, to a local receiver),
BENCH_HTTP_AGENT_ROUNDS times each (3); then a calibration (BENCH_HTTP_BURN_ROUNDS, 3; 0 skips
it): programs on the same tracepoints that only spend 0-600 loop steps of arithmetic in nginx's
context (tests/bpf/bpf_burn.bpf.c), for how nginx's CPU per request grows with BPF time alone
(`burn_cpu_per_bpf_time`: 1 would be one for one).

These rounds run with the kernel's BPF run-time accounting off, as sites run: it adds two clock
reads to every program run (0.012-0.027x of nginx's throughput in one A/B here, within the
spread in a bench run). BPF run time per request comes from BENCH_HTTP_ACCOUNTED_ROUNDS (3)
rounds of their own, accounting on, of off and the modes that attach programs (their throughput
ratios are reported too: the accounting's own cost); the agent's and the calibration's rounds
are accounted as well.

Reported (medians over rounds): throughput ratios against off, nginx CPU time per request (from
/proc/PID/stat: BPF programs run in nginx's context, so their cost shows there), BPF run time per
request from the kernel's own accounting (bpf_enable_stats; every run of the hook's programs,
whatever task ran them) for each mode, each tracer against the floor of its own hook, lost
events, the streaming CLI's own CPU per request and what it printed, left out (counted) and
lost, and the agent's RSS (peak and steady, without and with OTLP). `side_by_side` collects
the headline figures.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gridbpf.lab.otlp import OtlpReceiver
from gridbpf.trace.http.tracer import DRAIN_MS, HttpTracer, choose_hook
from gridbpf.trace.http.lab import Nginx
from gridbpf.trace.targets import TargetSpec

ROUNDS = int(os.environ.get("BENCH_HTTP_ROUNDS", 7))
SECONDS = float(os.environ.get("BENCH_HTTP_SECONDS", 3))
CONNS = 32
# every mode by default; BENCH_HTTP_MODES=off,stream runs a subset while developing
MODES = os.environ.get("BENCH_HTTP_MODES",
                       "off,floor,sockfloor,trace,trace-records,trace-syscall,stream,stream-sampled,"
                       "off-varied,stream-varied").split(",")
TICKS = os.sysconf("SC_CLK_TCK")


def cross_cpu_calls() -> int:
    """Function-call and rescheduling IPIs so far, all CPUs (/proc/interrupts CAL and RES):
    how often one side of the loopback benchmark had to wake the other on another CPU."""
    n = 0
    with open("/proc/interrupts") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("CAL:", "RES:"):
                n += sum(int(x) for x in parts[1:1 + os.cpu_count()] if x.isdigit())
    return n


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS     # utime + stime


class _Attached:
    """A loaded object with its programs attached; STATS_PROGS are the ones whose run time
    counts (the socket-tracepoint pair)."""
    stats_progs: tuple[str, str]

    def stats(self) -> tuple[int, int]:
        a, b = (prog_stats(self.obj.program(n)) for n in self.stats_progs)
        return a[0] + b[0], a[1] + b[1]

    def close(self) -> None:
        for link in self.links:
            link.detach()
        self.obj.close()


class SockFloor(_Attached):
    """The socket-layer floor: sock_recv_length/sock_send_length programs that only filter by
    pid (and read the syscall registers), to compare with the sys_exit floor."""
    stats_progs = ("http_sockfloor_recv", "http_sockfloor_send")

    def __init__(self, pid: int):
        from gridbpf.bpf import BpfObject
        self.obj = BpfObject.open("http")
        for name, p in self.obj.programs.items():
            p.autoload = name.startswith("http_sockfloor") or name in ("http_fork", "http_exit")
        self.obj.load()
        TargetSpec(pids=[pid]).install(self.obj)
        self.links = [self.obj.program(n).attach_trace() for n in
                      (*self.stats_progs, "http_fork", "http_exit")]


BURN_OBJ = Path(__file__).resolve().parent.parent / "tests" / "bpf" / "bpf_burn.bpf.o"
BURN_ITERATIONS = (0, 150, 300, 450, 600)
BURN_ROUNDS = int(os.environ.get("BENCH_HTTP_BURN_ROUNDS", 3))


class Burn(_Attached):
    """Calibration: socket-tracepoint programs spending ITERATIONS loop steps of arithmetic in
    the nginx worker's context (tests/bpf/bpf_burn.bpf.c), nothing else."""
    stats_progs = ("burn_recv", "burn_send")

    def __init__(self, tgid: int, iterations: int):
        from gridbpf.bpf import BpfObject
        self.obj = BpfObject.open(BURN_OBJ)
        self.obj.rodata["target_tgid"] = tgid
        self.obj.rodata["iterations"] = iterations
        self.obj.load()
        self.links = [self.obj.program(n).attach_trace() for n in self.stats_progs]


def burn_curve(nginx: Nginx) -> dict:
    """How nginx's CPU per request grows with BPF run time alone: rounds of Burn at each of
    BURN_ITERATIONS (rotated, BURN_ROUNDS times), against the one with 0 iterations (the pid
    check only). If BPF time cost nginx one for one, the ratio would stay at 1."""
    worker = nginx.worker_pids()[0]
    runs = {it: [] for it in BURN_ITERATIONS}
    for i in range(BURN_ROUNDS):
        order = BURN_ITERATIONS[i % len(BURN_ITERATIONS):] + BURN_ITERATIONS[:i % len(BURN_ITERATIONS)]
        for it in order:
            b = Burn(worker, it)
            try:
                b0, c0 = b.stats(), cpu_seconds(worker)
                rps, n = wrk(f"{nginx.url}/index.html")
                c1, b1 = cpu_seconds(worker), b.stats()
            finally:
                b.close()
            runs[it].append((rps, (c1 - c0) / n * 1e6, (b1[0] - b0[0]) / n))
    med = {it: [statistics.median(r[k] for r in rs) for k in range(3)] for it, rs in runs.items()}
    base = med[0]
    return {"burn_iterations": list(BURN_ITERATIONS),
            "burn_rps": [round(med[it][0]) for it in BURN_ITERATIONS],
            "burn_nginx_cpu_us_per_req": [round(med[it][1], 2) for it in BURN_ITERATIONS],
            "burn_bpf_ns_per_req": [round(med[it][2]) for it in BURN_ITERATIONS],
            # extra nginx CPU per extra BPF time, against the pid check alone
            "burn_cpu_per_bpf_time": [None] + [
                round((med[it][1] - base[1]) * 1000 / max(med[it][2] - base[2], 1), 2)
                for it in BURN_ITERATIONS[1:]]}


def prog_stats(prog) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program, from its fdinfo."""
    if isinstance(prog, _Attached):
        return prog.stats()
    text = Path(f"/proc/self/fdinfo/{prog.fd}").read_text()
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1))
    return get("run_time_ns"), get("run_cnt")


VARIED_FILES = 20_000
# each request for the next of the VARIED_FILES files under /v/
VARIED_SCRIPT = f"""
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/v/" .. (n % {VARIED_FILES}) .. ".html")
end
"""


def varied_files(root: Path) -> Path:
    """VARIED_FILES files of 100-2,100 bytes under ROOT/v, and the wrk script asking for them."""
    d = root / "v"
    d.mkdir(exist_ok=True)
    for i in range(VARIED_FILES):
        (d / f"{i}.html").write_bytes(b"x" * (100 + i * 7919 % 2000))
    script = root.parent / "varied.lua"
    script.write_text(VARIED_SCRIPT)
    return script


def wrk(url: str, script: Path | None = None) -> tuple[float, int]:
    extra = ["-s", str(script)] if script else []
    out = subprocess.run(["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS:g}s", *extra, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, n


class _Consumer:
    """HttpAgent's aggregation without its server and lock: what a deployed agent runs."""

    def __init__(self, tracer):
        from gridbpf.agent.daemon import HttpAgent
        agent = HttpAgent.__new__(HttpAgent)
        agent.tracer, agent.otlp, agent.requests, agent.aggregated = tracer, None, 0, 0
        agent._agg_seen, agent._folded_at = {}, 0.0
        agent._reset_label_caches()
        from gridbpf.agent.routes import Routes
        from gridbpf.export.metrics import DURATION_BUCKETS, SIZE_BUCKETS, Registry
        from gridbpf.agent.daemon import LABELS
        r = Registry()
        agent.routes = Routes(ROUTES)
        agent.duration = r.histogram("http.server.request.duration", "", "s", LABELS, DURATION_BUCKETS)
        agent.req_body = r.histogram("http.server.request.body.size", "", "By", LABELS, SIZE_BUCKETS)
        agent.resp_body = r.histogram("http.server.response.body.size", "", "By", LABELS, SIZE_BUCKETS)
        self.agent = agent

    def drain(self, timeout_ms: int, final: bool = False) -> int:
        before = self.agent.requests
        self.agent.drain(timeout_ms, final)
        return self.agent.requests - before


SAMPLED_RATE = 1000      # --max-rate of the stream-sampled mode
ROUTES = ["/{vo}/{path}"]    # the agent's route templates, as in packaging/examples


def stream_round(nginx: Nginx, sampled: bool = False, script: Path | None = None) -> dict:
    """The real `gridbpf trace http --json` process streaming every request into a pipe that a
    reader drains (like `| tail` or a file): what a user tailing a busy server costs it.
    SAMPLED: with --max-rate SAMPLED_RATE (the others counted, not printed); SCRIPT: wrk's
    request script (varied paths)."""
    worker = nginx.worker_pids()[0]
    extra = ["--max-rate", str(SAMPLED_RATE)] if sampled else []
    p = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "trace", "http", "--pid",
                          str(nginx.pid), "--json", "--no-tls", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = [0, 0]          # newlines, bytes

    def read():
        while chunk := p.stdout.read1(1 << 16):
            lines[0] += chunk.count(b"\n")
            lines[1] += len(chunk)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        first = p.stderr.readline()
        if not first.startswith(b"gridbpf: tracing"):
            raise RuntimeError(f"trace http did not start: {first!r} {p.stderr.read()!r}")
        c0, s0, i0 = cpu_seconds(worker), cpu_seconds(p.pid), cross_cpu_calls()
        rps, n = wrk(f"{nginx.url}/index.html", script)
        c1, s1, i1 = cpu_seconds(worker), cpu_seconds(p.pid), cross_cpu_calls()
        time.sleep(0.3)            # wrk closed its connections: the last requests
        p.terminate()
        err = p.stderr.read().decode()
        p.wait(30)
        reader.join()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    return {"rps": rps, "requests": n, "cpu_us_per_req": (c1 - c0) / n * 1e6,
            "cli_cpu_us_per_req": (s1 - s0) / n * 1e6, "printed": summary["requests"],
            "lines_read": lines[0], "json_bytes_per_line": lines[1] / max(lines[0], 1),
            "not_printed": summary.get("not_printed", 0), "lost": summary["events_lost"],
            "ipis_per_req": (i1 - i0) / n}


def one_round(nginx: Nginx, mode: str, script: Path | None = None) -> dict:
    """One round of MODE; SCRIPT (wrk's request script) for the -varied modes."""
    varied = mode.endswith("-varied")
    mode = mode.removesuffix("-varied")
    if mode in ("stream", "stream-sampled"):
        return stream_round(nginx, sampled=mode == "stream-sampled", script=script if varied else None)
    worker = nginx.worker_pids()[0]
    tracer, drained, stop, drainer = None, [0], threading.Event(), None
    sock = None
    if mode == "sockfloor":
        sock = SockFloor(nginx.pid)
    elif mode != "off":
        # the agent's default: simple requests aggregated in the kernel; trace-records: every
        # request a record (what [trace] aggregate = false or OTLP spans make it do)
        from gridbpf.agent.routes import kernel_routes
        agg = kernel_routes(ROUTES)[0] if mode in ("trace", "trace-syscall") else None
        tracer = HttpTracer(TargetSpec(pids=[nginx.pid]), tls=False, floor=(mode == "floor"),
                            hook="syscall" if mode in ("floor", "trace-syscall") else None,
                            aggregate_routes=agg)
    progs = tracer.hook_programs() if tracer else [sock] if sock else []
    if mode.startswith("trace"):
        # the agent's consumer: drain every DRAIN_MS, columns straight into the histograms
        consumer = _Consumer(tracer)

        def drain():
            while not stop.is_set():
                drained[0] += consumer.drain(DRAIN_MS)
        drainer = threading.Thread(target=drain)
        drainer.start()
    try:
        b0 = bpf_stats(progs)
        c0, i0 = cpu_seconds(worker), cross_cpu_calls()
        rps, n = wrk(f"{nginx.url}/index.html", script if varied else None)
        c1, i1 = cpu_seconds(worker), cross_cpu_calls()
        b1 = bpf_stats(progs)
        stop.set()
        if drainer:
            drainer.join()
            time.sleep(0.2)            # wrk closed its connections: the last requests
            drained[0] += consumer.drain(0, final=True)
        lost = tracer.stats()["events_lost"] if tracer else 0
    finally:
        stop.set()
        if tracer:
            tracer.close()
        if sock:
            sock.close()
    r = {"rps": rps, "requests": n, "cpu_us_per_req": (c1 - c0) / n * 1e6,
         "bpf_ns_per_req": (b1[0] - b0[0]) / n, "bpf_runs_per_req": (b1[1] - b0[1]) / n,
         "ipis_per_req": (i1 - i0) / n}
    if mode.startswith("trace"):
        r.update(traced=drained[0], lost=lost)
    return r


def bpf_stats(progs) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over programs."""
    t = c = 0
    for p in progs:
        a, b = prog_stats(p)
        t, c = t + a, c + b
    return t, c


def _vm(pid: int, key: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024


def agent_rss(nginx: Nginx, otlp: bool = False) -> dict:
    """Run the real agent on nginx through one wrk round; its RSS (peak: VmHWM; steady: the
    median of VmRSS sampled during the round) and what it counted. With OTLP on, metrics every
    second and spans (1000/s, the default cap) go to a local receiver."""
    tag = "agent_otlp_" if otlp else "agent_"
    sink = OtlpReceiver(decode=False) if otlp else None
    with tempfile.TemporaryDirectory(prefix="ht-bench-") as d:
        cfg = Path(d) / "agent.toml"
        text = (f'[targets]\npid = [{nginx.pid}]\n[metrics]\nlisten = "127.0.0.1:0"\n'
                f'routes = ["/{{vo}}/{{path}}"]\n[agent]\nlock = "{d}/agent.lock"\n')
        if otlp:
            text += (f'[otlp]\nendpoint = "http://127.0.0.1:{sink.port}"\ninterval = 1\n'
                     f'service_name = "bench"\n')
        cfg.write_text(text)
        p = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config",
                              str(cfg), "--json"], stdout=subprocess.PIPE, text=True)
        try:
            status = json.loads(p.stdout.readline())
            a0 = cpu_seconds(p.pid)
            samples, done = [], threading.Event()

            def sample():
                while not done.wait(0.25):
                    samples.append(_vm(p.pid, "VmRSS"))
            sampler = threading.Thread(target=sample)
            sampler.start()
            rps, n = wrk(f"{nginx.url}/index.html")
            done.set()
            sampler.join()
            time.sleep(1.5)            # a metric export after the load, the last spans
            import urllib.request
            text = urllib.request.urlopen(status["metrics"]).read().decode()
            counted = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                          if l.startswith("http_server_request_duration_seconds_count"))
            spans = [l for l in text.splitlines() if l.startswith("gridbpf_http_spans_dropped")]
            hwm, rss = _vm(p.pid, "VmHWM"), _vm(p.pid, "VmRSS")
            agent_cpu = cpu_seconds(p.pid) - a0
        finally:
            p.terminate()
            p.wait(30)
            if sink:
                sink.close()
    out = {tag + "peak_rss_mb": round(hwm, 1),
           tag + "steady_rss_mb": round(statistics.median(samples), 1) if samples else round(rss, 1),
           tag + "rss_after_mb": round(rss, 1), tag + "rps": rps, tag + "requests": n,
           tag + "counted": counted, tag + "cpu_us_per_req": round(agent_cpu / n * 1e6, 2)}
    if otlp:
        out.update({tag + "posts": sink.posts, tag + "bytes_received": sink.bytes,
                    tag + "spans_dropped": float(spans[0].rsplit(" ", 1)[1]) if spans else None})
    return out


AGENT_ROUNDS = int(os.environ.get("BENCH_HTTP_AGENT_ROUNDS", 3))


def agent_rss_rounds(nginx: Nginx) -> dict:
    """agent_rss without and with OTLP, alternated AGENT_ROUNDS times: medians, and each
    round's peak so the spread shows."""
    runs = {False: [], True: []}
    for _ in range(AGENT_ROUNDS):
        for otlp in (False, True):
            runs[otlp].append(agent_rss(nginx, otlp))
    out = {}
    for otlp, rs in runs.items():
        for k, v in rs[0].items():
            if isinstance(v, (int, float)) and not k.endswith(("posts", "bytes_received")):
                out[k] = round(statistics.median(r[k] for r in rs), 2)
        tag = "agent_otlp_" if otlp else "agent_"
        out[tag + "peak_rss_mb_per_round"] = [r[tag + "peak_rss_mb"] for r in rs]
        if otlp:
            out[tag + "posts"] = rs[-1][tag + "posts"]
            out[tag + "bytes_received"] = rs[-1][tag + "bytes_received"]
    return out


def enable_bpf_stats() -> int:
    """BPF run-time accounting for as long as the returned fd is open. Unlike the global
    sysctl it is reference-counted, so parallel benchmarks cannot switch it off under us."""
    import ctypes
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = lib.bpf_enable_stats(0)     # BPF_STATS_RUN_TIME
    if fd < 0:
        raise OSError(-fd, f"bpf_enable_stats: {os.strerror(-fd)}")
    return fd


def run() -> dict:
    with Nginx(workers=1, access_log=False) as nginx:
        (nginx.root / "index.html").write_bytes(b"<html>hello grid</html>\n" * 20)
        script = varied_files(nginx.root)
        wrk(f"{nginx.url}/index.html")      # warm up
        wrk(f"{nginx.url}/index.html", script)
        # throughput and CPU with the kernel's BPF accounting off, as sites run (it adds two
        # clock reads per program run)
        rounds = rotated_rounds(nginx, MODES, ROUNDS, script)
        # BPF time per request from rounds of their own, accounting on
        stats_fd = enable_bpf_stats()
        try:
            accounted = rotated_rounds(nginx, [m for m in MODES if m in ACCOUNTED], ACCOUNTED_ROUNDS,
                                       script) if ACCOUNTED_ROUNDS else {}
            agent = agent_rss_rounds(nginx)
            burn = burn_curve(nginx) if BURN_ROUNDS else {}
        finally:
            os.close(stats_fd)
    return report(rounds, accounted, agent, burn)


ACCOUNTED = ("off", "floor", "sockfloor", "trace", "trace-records", "trace-syscall")
ACCOUNTED_ROUNDS = int(os.environ.get("BENCH_HTTP_ACCOUNTED_ROUNDS", 3))


def rotated_rounds(nginx: Nginx, modes: list[str], n: int, script: Path) -> dict[str, list]:
    """N rounds of each of MODES, the order rotated each time so that drift over time does not
    favour one mode."""
    rounds = {m: [] for m in modes}
    for i in range(n):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            rounds[mode].append(one_round(nginx, mode, script))
    return rounds


def report(rounds: dict, accounted: dict, agent: dict, burn: dict) -> dict:
    modes = list(rounds)
    # a subset of modes (BENCH_HTTP_MODES) leaves the figures of the others out (None)
    def med(mode, k, digits=None, rs=rounds):
        if not rs.get(mode):
            return None
        return round(statistics.median(r[k] for r in rs[mode]), digits)

    def ratio(mode, rs=rounds):
        if not (rs.get(mode) and rs.get("off")):
            return None
        return round(statistics.median(t["rps"] / o["rps"] for t, o in zip(rs[mode], rs["off"])), 3)

    def bpf(mode, k="bpf_ns_per_req", digits=None):
        return med(mode, k, digits, accounted)

    def bpf_ratio(mode, floor):
        # per round, each tracer against the floor of its own hook (same rotation: same noise)
        if not (accounted.get(mode) and accounted.get(floor)):
            return None
        return round(statistics.median(t["bpf_ns_per_req"] / max(f["bpf_ns_per_req"], 1)
                                       for t, f in zip(accounted[mode], accounted[floor])), 2)

    def added_cpu(mode):
        if not (rounds.get(mode) and rounds.get("off")):
            return None
        return round(med(mode, "cpu_us_per_req", 4) - med("off", "cpu_us_per_req", 4), 2)
    out = {
        "rounds": ROUNDS, "seconds_per_round": SECONDS, "connections": CONNS,
        "accounted_rounds": ACCOUNTED_ROUNDS, "hook": choose_hook()[0],
        "rps_off": med("off", "rps"), "rps_floor": med("floor", "rps"),
        "rps_sockfloor": med("sockfloor", "rps"), "rps_trace": med("trace", "rps"),
        "rps_trace_syscall": med("trace-syscall", "rps"), "rps_trace_records": med("trace-records", "rps"),
        # throughput against no BPF at all (goal: trace >= 0.95), BPF accounting off
        "throughput_ratio_trace_vs_off": ratio("trace"),
        "throughput_ratio_trace_records_vs_off": ratio("trace-records"),
        "throughput_ratio_trace_syscall_vs_off": ratio("trace-syscall"),
        "throughput_ratio_floor_vs_off": ratio("floor"),
        "throughput_ratio_sockfloor_vs_off": ratio("sockfloor"),
        # the same in the accounted rounds: what the accounting itself costs
        "throughput_ratio_with_accounting": {m: ratio(m, accounted) for m in accounted if m != "off"},
        # BPF time per request, from the accounted rounds (goal: trace <= 1.5x its hook's floor)
        "bpf_ns_per_req_trace": bpf("trace"),
        "bpf_ns_per_req_sockfloor": bpf("sockfloor"),
        "bpf_ns_per_req_trace_syscall": bpf("trace-syscall"),
        "bpf_ns_per_req_floor": bpf("floor"),
        "bpf_trace_vs_sockfloor": bpf_ratio("trace", "sockfloor"),
        "bpf_ns_per_req_trace_records": bpf("trace-records"),
        "bpf_trace_records_vs_sockfloor": bpf_ratio("trace-records", "sockfloor"),
        "bpf_trace_syscall_vs_floor": bpf_ratio("trace-syscall", "floor"),
        # the socket hook against the syscall floor: what moving hooks saved
        "bpf_trace_vs_floor": bpf_ratio("trace", "floor"),
        "bpf_runs_per_req_trace": bpf("trace", "bpf_runs_per_req", 2),
        "bpf_runs_per_req_trace_syscall": bpf("trace-syscall", "bpf_runs_per_req", 2),
        "nginx_cpu_us_per_req": {m: med(m, "cpu_us_per_req", 2) for m in modes},
        "added_cpu_us_per_req_trace": added_cpu("trace"),
        "added_cpu_us_per_req_trace_records": added_cpu("trace-records"),
        "traced_equals_requests_plus_inflight": all(
            r["traced"] + r["lost"] >= r["requests"]
            for rs in (rounds, accounted) for m in TRACERS for r in rs.get(m, [])),
        "lost_events": sum(r["lost"] for rs in (rounds, accounted) for m in TRACERS for r in rs.get(m, [])),
        # every round, so the spread (noisy on a shared 2-core VM) is visible next to the medians
        "rps_per_round": {m: [round(r["rps"]) for r in rounds[m]] for m in rounds},
        # cross-CPU wakeups per request, per round: wrk and nginx share the 2 vCPUs, and rounds
        # where one side idles and must be woken by IPI (a VM exit here) are the slow ones
        "ipis_per_req_per_round": {m: [round(r["ipis_per_req"], 2) for r in rounds[m]]
                                   for m in rounds if "ipis_per_req" in rounds[m][0]},
        "bpf_ns_per_req_per_round": {m: [round(r["bpf_ns_per_req"]) for r in accounted[m]]
                                     for m in accounted if m != "off"},
        **agent,
        **burn,
        **stream_figures(rounds),
    }
    out["side_by_side"] = side_by_side(out)
    return out


TRACERS = ("trace", "trace-records", "trace-syscall")


def stream_figures(rounds: dict) -> dict:
    """The streaming CLI's rounds: its throughput beside off (median of per-round ratios), its
    own CPU per request, and what it printed, left out (counted) and lost."""
    out = {}
    for mode, tag, off in (("stream", "stream", "off"),
                           ("stream-sampled", "stream_sampled", "off"),
                           ("stream-varied", "stream_varied", "off-varied")):
        s = rounds.get(mode)
        if not s:
            continue
        ratios = [x["rps"] / o["rps"] for x, o in zip(s, rounds.get(off, []))]
        med = lambda k: statistics.median(r[k] for r in s)
        out.update({
            f"rps_{tag}": round(med("rps")),
            f"throughput_ratio_{tag}_vs_{off.replace('-', '_')}":
                round(statistics.median(ratios), 3) if ratios else None,
            f"cli_cpu_us_per_req_{tag}": round(med("cli_cpu_us_per_req"), 2),
            f"nginx_cpu_us_per_req_{tag}": round(med("cpu_us_per_req"), 2),
            f"{tag}_json_bytes_per_line": round(med("json_bytes_per_line")),
            f"{tag}_printed": sum(r["printed"] for r in s),
            f"{tag}_lines_read": sum(r["lines_read"] for r in s),
            f"{tag}_not_printed": sum(r["not_printed"] for r in s),
            f"{tag}_lost": sum(r["lost"] for r in s)})
    return out


def side_by_side(out: dict) -> dict:
    """The issue's figures in one place: throughput ratios to untraced (medians over the
    interleaved rounds) and the agent's memory."""
    return {"throughput_vs_off": {
                "floor (syscall + pid filter only)": out["throughput_ratio_floor_vs_off"],
                "sockfloor (socket tracepoints + pid filter only)": out["throughput_ratio_sockfloor_vs_off"],
                "agent, simple requests aggregated in the kernel (trace)": out["throughput_ratio_trace_vs_off"],
                "agent, every request a record (trace-records)": out["throughput_ratio_trace_records_vs_off"],
                "agent consumer, syscall hook (trace-syscall)": out["throughput_ratio_trace_syscall_vs_off"],
                "trace http --json into a pipe (stream)": out.get("throughput_ratio_stream_vs_off"),
                f"the same at --max-rate {SAMPLED_RATE} (stream-sampled)":
                    out.get("throughput_ratio_stream_sampled_vs_off"),
                "the same, every request another file (stream-varied vs off-varied)":
                    out.get("throughput_ratio_stream_varied_vs_off_varied")},
            "bpf_time_vs_floor": {"trace vs sockfloor": out["bpf_trace_vs_sockfloor"],
                                  "trace-records vs sockfloor": out["bpf_trace_records_vs_sockfloor"],
                                  "trace-syscall vs floor": out["bpf_trace_syscall_vs_floor"]},
            "agent_rss_mb": {"peak": out["agent_peak_rss_mb"], "steady": out["agent_steady_rss_mb"],
                             "peak_with_otlp": out["agent_otlp_peak_rss_mb"],
                             "steady_with_otlp": out["agent_otlp_steady_rss_mb"],
                             "peak_with_otlp_per_round": out["agent_otlp_peak_rss_mb_per_round"]}}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
