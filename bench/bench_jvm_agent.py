"""The Java TLS agent's own cost inside the JVM (no BPF): wrk over HTTPS (small GETs,
keep-alive) against a Tomcat 10 (WebDAV servlet, NIO + JSSE):
  none      before the agent is loaded (first phase)
  inactive  agent loaded, no lease: each hook reads one volatile flag   } second phase,
  active    a lease held: every TLS call writes its record to /dev/null } interleaved rounds
A second, never traced Tomcat measured in both phases gives the machine's drift between them.
Reported (medians over rounds): requests/s, Tomcat CPU time per request (/proc/PID/stat), the
ratios (to "none" corrected by the drift) and the CPU added per request. The BPF side's cost (reading the records at
sys_exit of write) comes on top and is measured with the tracer.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import time

from bench.bench_http import cpu_seconds
from gridbpf.trace.http import jvm_agent
from gridbpf.trace.http.jvm_servers import Tomcat

ROUNDS = int(os.environ.get("BENCH_JVM_ROUNDS", 5))
SECONDS = float(os.environ.get("BENCH_JVM_SECONDS", 4))
CONNS = 8


def wrk(url: str, seconds: float = SECONDS) -> tuple[float, int]:
    """wrk over HTTPS, keep-alive; a long timeout: TLS handshakes on a busy 2-core machine are slow."""
    out = subprocess.run(["wrk", "-t1", f"-c{CONNS}", f"-d{seconds:g}s", "--timeout", "10s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    if n == 0:
        raise RuntimeError(f"wrk completed no request against {url}: {out.strip()[-200:]}")
    return rps, n


def _round(server: Tomcat, url: str) -> tuple[float, float]:
    cpu0 = cpu_seconds(server.pid)
    rps, n = wrk(url)
    return rps, (cpu_seconds(server.pid) - cpu0) / max(n, 1) * 1e6


def _wait_active(agent: jvm_agent.JvmAgent, want: bool) -> None:
    deadline = time.monotonic() + 5
    while agent.read_info()["active"] != want and time.monotonic() < deadline:
        time.sleep(0.05)


def run() -> dict:
    control, traced = Tomcat(), Tomcat()
    rounds: dict[str, list] = {m: [] for m in ("none", "inactive", "active", "control_before", "control_after")}
    try:
        for s in (control, traced):
            (s.root / "small.html").write_bytes(b"<html>hello grid</html>\n" * 20)
            # the first TLS connection initialises a lot
            subprocess.run(["curl", "-sk", "-o", "/dev/null", "-m", "60", f"{s.url}/small.html"], check=True)
        for _ in range(2):                      # JIT warm-up
            for s in (control, traced):
                wrk(f"{s.url}/small.html", 3)
        url = f"{traced.url}/small.html"
        # phase 1: the traced JVM before any agent, the control JVM for the machine's drift
        for i in range(ROUNDS):
            for mode in (["control_before", "none"] if i % 2 == 0 else ["none", "control_before"]):
                rounds[mode].append(_round(control if mode.startswith("control") else traced,
                                           f"{control.url}/small.html" if mode.startswith("control") else url))
        agent = jvm_agent.attach(traced.pid, "bench")
        agent.keep_alive()
        wrk(url, 3)                             # the rewritten methods' warm-up
        modes = ["control_after", "inactive", "active"]
        for i in range(ROUNDS):
            for mode in modes[i % 3:] + modes[:i % 3]:
                if mode == "inactive":
                    agent.release()
                    _wait_active(agent, False)
                elif mode == "active":
                    agent.renew()
                    agent.keep_alive()
                    _wait_active(agent, True)
                if mode == "control_after":
                    rounds[mode].append(_round(control, f"{control.url}/small.html"))
                else:
                    rounds[mode].append(_round(traced, url))
        agent.release()
        records = agent.read_info()["records"]
    finally:
        control.close()
        traced.close()
    med = {m: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for m, v in rounds.items()}
    drift = med["control_after"][0] / med["control_before"][0]
    return {
        "rounds": ROUNDS,
        "rps": {m: round(v[0]) for m, v in med.items()},
        "cpu_us_per_request": {m: round(v[1], 1) for m, v in med.items()},
        "control_drift": round(drift, 3),
        "ratio_inactive_vs_none": round(med["inactive"][0] / med["none"][0] / drift, 3),
        "ratio_active_vs_none": round(med["active"][0] / med["none"][0] / drift, 3),
        "ratio_active_vs_inactive": round(med["active"][0] / med["inactive"][0], 3),
        "added_cpu_us_per_request_active_vs_inactive": round(med["active"][1] - med["inactive"][1], 1),
        "added_cpu_us_per_request_inactive_vs_none": round(med["inactive"][1] - med["none"][1], 1),
        "records_written": records,
        "note": "ratios to 'none' are divided by the control JVM's drift between the two phases; "
                "2-core machine shared with other sessions: noisy",
    }
