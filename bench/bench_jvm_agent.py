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
from gridbpf.trace.http.jvm_servers import Tomcat, keystore

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
        "engine_loop": run_engine_loop(),
    }


ENGINE_LOOP = """\
import java.io.*;
import java.nio.ByteBuffer;
import java.security.KeyStore;
import java.security.cert.X509Certificate;
import javax.net.ssl.*;

/** Two SSLEngines talking in memory: per iteration a 200-byte request and a 300-byte response,
 *  i.e. 4 hooked calls (2 wrap, 2 unwrap). Prints the iterations of each second. */
public class GbEngineLoop {
    public static void main(String[] a) throws Exception {
        KeyStore ks = KeyStore.getInstance("PKCS12");
        ks.load(new FileInputStream(a[0]), "secret".toCharArray());
        KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
        kmf.init(ks, "secret".toCharArray());
        SSLContext sctx = SSLContext.getInstance("TLS");
        sctx.init(kmf.getKeyManagers(), null, null);
        TrustManager[] all = { new X509TrustManager() {
            public void checkClientTrusted(X509Certificate[] c, String t) {}
            public void checkServerTrusted(X509Certificate[] c, String t) {}
            public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; } } };
        SSLContext cctx = SSLContext.getInstance("TLS");
        cctx.init(null, all, null);
        SSLEngine c = cctx.createSSLEngine("127.0.0.1", 443), s = sctx.createSSLEngine();
        c.setUseClientMode(true); s.setUseClientMode(false);
        int net = 1 << 17;
        ByteBuffer c2s = ByteBuffer.allocate(net), s2c = ByteBuffer.allocate(net);
        ByteBuffer capp = ByteBuffer.allocate(net), sapp = ByteBuffer.allocate(net);
        ByteBuffer req = ByteBuffer.wrap(new byte[200]), resp = ByteBuffer.wrap(new byte[300]);
        ByteBuffer empty = ByteBuffer.allocate(0);
        c.beginHandshake(); s.beginHandshake();
        for (int i = 0; i < 1000 && (c.getHandshakeStatus() != SSLEngineResult.HandshakeStatus.NOT_HANDSHAKING
                || s.getHandshakeStatus() != SSLEngineResult.HandshakeStatus.NOT_HANDSHAKING); i++) {
            step(c, empty, c2s, s2c, capp); step(s, empty, s2c, c2s, sapp);
        }
        long second = System.nanoTime() + 1_000_000_000L, n = 0;
        PrintStream out = System.out;
        while (true) {
            // compact, never clear: a record left over (TLS 1.3 session ticket) is read next time
            req.clear(); c.wrap(req, c2s); c2s.flip(); sapp.clear(); s.unwrap(c2s, sapp); c2s.compact();
            resp.clear(); s.wrap(resp, s2c); s2c.flip(); capp.clear(); c.unwrap(s2c, capp); s2c.compact();
            n++;
            if ((n & 255) == 0 && System.nanoTime() >= second) {
                out.println(n); out.flush(); n = 0; second += 1_000_000_000L;
            }
        }
    }

    static void step(SSLEngine e, ByteBuffer app, ByteBuffer out, ByteBuffer in, ByteBuffer appIn) throws Exception {
        Runnable task;
        while ((task = e.getDelegatedTask()) != null) task.run();
        switch (e.getHandshakeStatus()) {
            case NEED_WRAP: e.wrap(app, out); break;
            case NEED_UNWRAP: case NEED_UNWRAP_AGAIN:
                in.flip(); e.unwrap(in, appIn); in.compact(); break;
            default: break;
        }
        while ((task = e.getDelegatedTask()) != null) task.run();
    }
}
"""


def run_engine_loop(seconds_per_phase: int = 4, phases: int = 6) -> dict:
    """Per hooked call cost, without sockets: two in-memory SSLEngines, iterations per second
    before the agent (none), then alternating inactive/active phases of the same JVM."""
    import tempfile
    import threading
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="gb-engloop-"))
    ks = keystore(d / "ks.p12")
    (d / "GbEngineLoop.java").write_text(ENGINE_LOOP)
    subprocess.run(["javac", "--release", "17", "-d", str(d), str(d / "GbEngineLoop.java")], check=True)
    proc = subprocess.Popen(["java", "-Xmx128m", "-cp", str(d), "GbEngineLoop", str(ks)],
                            stdout=subprocess.PIPE, text=True, cwd=d)
    samples: list[tuple[str, int]] = []
    mode = ["warmup"]

    def reader():
        for line in proc.stdout:
            samples.append((mode[0], int(line)))
    threading.Thread(target=reader, daemon=True).start()
    try:
        time.sleep(6)
        mode[0] = "none"
        time.sleep(seconds_per_phase * phases / 2)
        mode[0] = "attach"
        agent = jvm_agent.attach(proc.pid, "bench", sink=None)
        for i in range(phases):
            if i % 2 == 0:
                agent.release()
                _wait_active(agent, False)
                mode[0] = "inactive"
            else:
                agent.renew()
                agent.keep_alive()
                _wait_active(agent, True)
                mode[0] = "active"
            time.sleep(seconds_per_phase)
            mode[0] = "switch"
            time.sleep(1.1)         # the sample spanning the switch is dropped
        agent.release()
    finally:
        proc.kill()
        proc.wait()
        import shutil
        shutil.rmtree(d, ignore_errors=True)
    # drop the first sample of each phase (it may span the switch)
    per_mode: dict[str, list[int]] = {}
    prev = None
    for m, n in samples:
        if m == prev:
            per_mode.setdefault(m, []).append(n)
        prev = m
    med = {m: statistics.median(v) for m, v in per_mode.items() if m in ("none", "inactive", "active")}
    ns = {m: 1e9 / v / 4 for m, v in med.items()}       # 4 hooked calls per iteration
    return {
        "iterations_per_s": {m: round(v) for m, v in med.items()},
        "ns_per_tls_call": {m: round(v) for m, v in ns.items()},
        "added_ns_per_tls_call_active_vs_inactive": round(ns["active"] - ns["inactive"]),
        "added_ns_per_tls_call_inactive_vs_none": round(ns["inactive"] - ns["none"]),
        "samples": {m: len(v) for m, v in per_mode.items()},
    }
