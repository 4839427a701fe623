"""Cost of HTTP request tracing: wrk against nginx (small GETs, keep-alive), side by side in
interleaved rounds, with:
  off    no BPF at all
  floor  the syscall hook (sys_exit) with a program that only filters by syscall and pid
  sockfloor  the socket hook (sock_recv_length/sock_send_length) filtering by pid only
  trace  the tracer on its default hook (the socket tracepoints on 6.3+), drained and aggregated
         into histograms on a timer as the agent does
  trace-syscall  the same on the syscall hook (the fallback of kernels before 6.3)
and one round with the whole agent (Prometheus + histograms) for its memory.

Reported (medians over rounds): throughput ratios against off, nginx CPU time per request (from
/proc/PID/stat: BPF programs run in nginx's context, so their cost shows there), BPF run time per
request from the kernel's own accounting (bpf_stats_enabled; every run of the hook's programs,
whatever task ran them) for each mode, each tracer against the floor of its own hook, lost
events, and the agent's peak RSS.
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

from gridbpf.trace.http.tracer import DRAIN_MS, HttpTracer, choose_hook
from gridbpf.trace.http.lab import Nginx
from gridbpf.trace.targets import TargetSpec

ROUNDS = int(os.environ.get("BENCH_HTTP_ROUNDS", 7))
SECONDS = float(os.environ.get("BENCH_HTTP_SECONDS", 3))
CONNS = 32
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS     # utime + stime


class SockFloor:
    """The socket-layer floor: sock_recv_length/sock_send_length programs that only filter by
    pid (and read the syscall registers), to compare with the sys_exit floor."""

    def __init__(self, pid: int):
        from gridbpf.bpf import BpfObject
        self.obj = BpfObject.open("http")
        for name, p in self.obj.programs.items():
            p.autoload = name.startswith("http_sockfloor") or name in ("http_fork", "http_exit")
        self.obj.load()
        TargetSpec(pids=[pid]).install(self.obj)
        self.links = [self.obj.program(n).attach_trace() for n in
                      ("http_sockfloor_recv", "http_sockfloor_send", "http_fork", "http_exit")]

    def stats(self) -> tuple[int, int]:
        a = prog_stats(self.obj.program("http_sockfloor_recv"))
        b = prog_stats(self.obj.program("http_sockfloor_send"))
        return a[0] + b[0], a[1] + b[1]

    def close(self) -> None:
        for l in self.links:
            l.detach()
        self.obj.close()


def prog_stats(prog) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program, from its fdinfo."""
    if isinstance(prog, SockFloor):
        return prog.stats()
    text = Path(f"/proc/self/fdinfo/{prog.fd}").read_text()
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1))
    return get("run_time_ns"), get("run_cnt")


def wrk(url: str) -> tuple[float, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS:g}s", url], capture_output=True,
                         text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, n


class _Consumer:
    """HttpAgent's aggregation without its server and lock: what a deployed agent runs."""

    def __init__(self, tracer):
        from gridbpf.agent.daemon import HttpAgent
        agent = HttpAgent.__new__(HttpAgent)
        agent.tracer, agent.otlp, agent.requests, agent._line_cache = tracer, None, 0, {}
        from gridbpf.agent.routes import Routes
        from gridbpf.export.metrics import DURATION_BUCKETS, SIZE_BUCKETS, Registry
        from gridbpf.agent.daemon import LABELS
        r = Registry()
        agent.routes = Routes(["/{vo}/{path}"])
        agent.duration = r.histogram("http.server.request.duration", "", "s", LABELS, DURATION_BUCKETS)
        agent.req_body = r.histogram("http.server.request.body.size", "", "By", LABELS, SIZE_BUCKETS)
        agent.resp_body = r.histogram("http.server.response.body.size", "", "By", LABELS, SIZE_BUCKETS)
        self.agent = agent

    def drain(self, timeout_ms: int) -> int:
        before = self.agent.requests
        self.agent.drain(timeout_ms)
        return self.agent.requests - before


def one_round(nginx: Nginx, mode: str) -> dict:
    worker = nginx.worker_pids()[0]
    tracer, drained, stop, drainer = None, [0], threading.Event(), None
    sock = None
    if mode == "sockfloor":
        sock = SockFloor(nginx.pid)
    elif mode != "off":
        tracer = HttpTracer(TargetSpec(pids=[nginx.pid]), tls=False, floor=(mode == "floor"),
                            hook="syscall" if mode in ("floor", "trace-syscall") else None)
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
        c0 = cpu_seconds(worker)
        rps, n = wrk(f"{nginx.url}/index.html")
        c1 = cpu_seconds(worker)
        b1 = bpf_stats(progs)
        stop.set()
        if drainer:
            drainer.join()
            time.sleep(0.2)            # wrk closed its connections: the last requests
            drained[0] += consumer.drain(0)
        lost = tracer.stats()["events_lost"] if tracer else 0
    finally:
        stop.set()
        if tracer:
            tracer.close()
        if sock:
            sock.close()
    r = {"rps": rps, "requests": n, "cpu_us_per_req": (c1 - c0) / n * 1e6,
         "bpf_ns_per_req": (b1[0] - b0[0]) / n, "bpf_runs_per_req": (b1[1] - b0[1]) / n}
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


def agent_rss(nginx: Nginx) -> dict:
    """Run the real agent on nginx through one wrk round; its peak RSS and what it counted."""
    with tempfile.TemporaryDirectory(prefix="ht-bench-") as d:
        cfg = Path(d) / "agent.toml"
        cfg.write_text(f'[targets]\npid = [{nginx.pid}]\n[metrics]\nlisten = "127.0.0.1:0"\n'
                       f'routes = ["/{{vo}}/{{path}}"]\n[agent]\nlock = "{d}/agent.lock"\n')
        p = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config",
                              str(cfg), "--json"], stdout=subprocess.PIPE, text=True)
        status = json.loads(p.stdout.readline())
        a0 = cpu_seconds(p.pid)
        rps, n = wrk(f"{nginx.url}/index.html")
        time.sleep(0.5)
        import urllib.request
        text = urllib.request.urlopen(status["metrics"]).read().decode()
        counted = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                      if l.startswith("http_server_request_duration_seconds_count"))
        status_txt = Path(f"/proc/{p.pid}/status").read_text()
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status_txt).group(1))
        agent_cpu = cpu_seconds(p.pid) - a0
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", status_txt).group(1))
        p.terminate()
        p.wait(30)
    return {"agent_peak_rss_mb": round(hwm / 1024, 1), "agent_rss_mb": round(rss / 1024, 1),
            "agent_rps": rps, "agent_requests": n, "agent_counted": counted,
            "agent_cpu_us_per_req": round(agent_cpu / n * 1e6, 2)}


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
    stats_fd = enable_bpf_stats()
    try:
        with Nginx(workers=1, access_log=False) as nginx:
            (nginx.root / "index.html").write_bytes(b"<html>hello grid</html>\n" * 20)
            wrk(f"{nginx.url}/index.html")      # warm up
            modes = ["off", "floor", "sockfloor", "trace", "trace-syscall"]
            rounds = {m: [] for m in modes}
            for i in range(ROUNDS):
                # rotate the order so drift over time does not favour one mode
                order = modes[i % len(modes):] + modes[:i % len(modes)]
                for mode in order:
                    rounds[mode].append(one_round(nginx, mode))
            agent = agent_rss(nginx)
    finally:
        os.close(stats_fd)
    med = lambda mode, k: statistics.median(r[k] for r in rounds[mode])
    ratio = lambda mode: round(statistics.median(
        t["rps"] / o["rps"] for t, o in zip(rounds[mode], rounds["off"])), 3)
    # per round, each tracer against the floor of its own hook (same round: same noise)
    bpf_ratio = lambda mode, floor: round(statistics.median(
        t["bpf_ns_per_req"] / max(f["bpf_ns_per_req"], 1)
        for t, f in zip(rounds[mode], rounds[floor])), 2)
    out = {
        "rounds": ROUNDS, "seconds_per_round": SECONDS, "connections": CONNS,
        "hook": choose_hook()[0],
        "rps_off": round(med("off", "rps")), "rps_floor": round(med("floor", "rps")),
        "rps_sockfloor": round(med("sockfloor", "rps")), "rps_trace": round(med("trace", "rps")),
        "rps_trace_syscall": round(med("trace-syscall", "rps")),
        # throughput against no BPF at all (goal: trace >= 0.95)
        "throughput_ratio_trace_vs_off": ratio("trace"),
        "throughput_ratio_trace_syscall_vs_off": ratio("trace-syscall"),
        "throughput_ratio_floor_vs_off": ratio("floor"),
        "throughput_ratio_sockfloor_vs_off": ratio("sockfloor"),
        # BPF time per request (goal: trace <= 1.5x the floor of its hook)
        "bpf_ns_per_req_trace": round(med("trace", "bpf_ns_per_req")),
        "bpf_ns_per_req_sockfloor": round(med("sockfloor", "bpf_ns_per_req")),
        "bpf_ns_per_req_trace_syscall": round(med("trace-syscall", "bpf_ns_per_req")),
        "bpf_ns_per_req_floor": round(med("floor", "bpf_ns_per_req")),
        "bpf_trace_vs_sockfloor": bpf_ratio("trace", "sockfloor"),
        "bpf_trace_syscall_vs_floor": bpf_ratio("trace-syscall", "floor"),
        # the socket hook against the syscall floor: what moving hooks saved
        "bpf_trace_vs_floor": bpf_ratio("trace", "floor"),
        "bpf_runs_per_req_trace": round(med("trace", "bpf_runs_per_req"), 2),
        "bpf_runs_per_req_trace_syscall": round(med("trace-syscall", "bpf_runs_per_req"), 2),
        "nginx_cpu_us_per_req": {m: round(med(m, "cpu_us_per_req"), 2) for m in modes},
        "added_cpu_us_per_req_trace": round(med("trace", "cpu_us_per_req") - med("off", "cpu_us_per_req"), 2),
        "traced_equals_requests_plus_inflight": all(
            r["traced"] + r["lost"] >= r["requests"] for m in ("trace", "trace-syscall")
            for r in rounds[m]),
        "lost_events": sum(r["lost"] for m in ("trace", "trace-syscall") for r in rounds[m]),
        # every round, so the spread (noisy on a shared 2-core VM) is visible next to the medians
        "rps_per_round": {m: [round(r["rps"]) for r in rounds[m]] for m in rounds},
        "bpf_ns_per_req_per_round": {m: [round(r["bpf_ns_per_req"]) for r in rounds[m]]
                                     for m in rounds if m != "off"},
        **agent,
    }
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
