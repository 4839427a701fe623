"""The Java TLS agent's own cost per hooked TLS call, inside the JVM and without sockets or BPF
(bench_jvm measures Tomcat end to end with the tracer): two SSLEngines talking in memory, a
200-byte request and a 300-byte response per iteration (4 hooked calls), iterations per second in
  none      before the agent is loaded (first phase: the agent cannot be unloaded)
  inactive  agent loaded, no lease: each hook reads one volatile flag     } alternating phases
  write     a lease held: records written to /dev/null, 16 a call         } of the same JVM
  recv      a lease held: records read on an empty socket, 16 a call      }
Reported: medians of per-second samples, ns per hooked call, the added ns per call.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from gridbpf.trace.http import jvm_agent
from gridbpf.trace.http.jvm_servers import compile_with_engine_pair, keystore

SECONDS = int(os.environ.get("BENCH_JVM_AGENT_SECONDS", 4))     # per phase
PHASES = int(os.environ.get("BENCH_JVM_AGENT_PHASES", 8))        # inactive/write/inactive/recv...


def _wait_active(agent: jvm_agent.JvmAgent, want: bool) -> None:
    deadline = time.monotonic() + 5
    while agent.read_info()["active"] != want and time.monotonic() < deadline:
        time.sleep(0.05)


ENGINE_LOOP = """\
import java.io.*;
import java.nio.ByteBuffer;
import javax.net.ssl.*;

/** Two SSLEngines talking in memory: per iteration a 200-byte request and a 300-byte response,
 *  i.e. 4 hooked calls (2 wrap, 2 unwrap). Prints the iterations of each second. */
public class GbEngineLoop {
    public static void main(String[] a) throws Exception {
        SSLEngine[] pair = GbEnginePair.create(a[0], 443);
        SSLEngine c = pair[0], s = pair[1];
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


def run(seconds_per_phase: int = SECONDS, phases: int = PHASES) -> dict:
    d = Path(tempfile.mkdtemp(prefix="gb-engloop-"))
    ks = keystore(d / "ks.p12")
    compile_with_engine_pair(d, "GbEngineLoop", ENGINE_LOOP)
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
                # the lease file names its transport when it is made: alternate them
                agent.transport = "write" if i % 4 == 1 else "recv"
                agent.renew()
                agent.keep_alive()
                _wait_active(agent, True)
                mode[0] = agent.transport
            time.sleep(seconds_per_phase)
            mode[0] = "switch"
            time.sleep(1.1)         # the sample spanning the switch is dropped
        agent.release()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)
    # drop the first sample of each phase (it may span the switch)
    per_mode: dict[str, list[int]] = {}
    prev = None
    for m, n in samples:
        if m == prev:
            per_mode.setdefault(m, []).append(n)
        prev = m
    med = {m: statistics.median(v) for m, v in per_mode.items() if m in ("none", "inactive", "write", "recv")}
    ns = {m: 1e9 / v / 4 for m, v in med.items()}       # 4 hooked calls per iteration
    return {
        "iterations_per_s": {m: round(v) for m, v in med.items()},
        "ns_per_tls_call": {m: round(v) for m, v in ns.items()},
        "added_ns_per_tls_call_write_vs_inactive": round(ns["write"] - ns["inactive"]),
        "added_ns_per_tls_call_recv_vs_inactive": round(ns["recv"] - ns["inactive"]),
        "added_ns_per_tls_call_inactive_vs_none": round(ns["inactive"] - ns["none"]),
        "samples": {m: len(v) for m, v in per_mode.items()},
        "note": "2-core machine shared with other sessions: 'none' is an earlier phase, so only "
                "active vs inactive (alternating) is a like-for-like comparison",
    }
