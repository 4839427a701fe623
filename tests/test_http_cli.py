"""`gridbpf trace http`: lines and JSON from a real server, bad input in one line, a target that
exits mid-trace, processes started after the tracer (by comm), nothing left attached."""
import http.client
import json
import random
import subprocess
import sys
import threading
import time

from gridbpf.trace.http.lab import Nginx, PythonHttps

CLI = [sys.executable, "-m", "gridbpf.cli", "trace", "http"]


def http_links():
    """BPF links of our programs still in the kernel (none may stay after the CLI exits)."""
    out = subprocess.run(["bpftool", "link", "show", "--json"], capture_output=True, text=True)
    progs = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    ours = {p["id"] for p in json.loads(progs.stdout or "[]")
            if p.get("name", "").startswith("http_")}
    return [l for l in json.loads(out.stdout or "[]") if l.get("prog_id") in ours]


def test_unknown_pid_one_line():
    r = subprocess.run(CLI + ["--pid", "999999999"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == "gridbpf: no process with pid 999999999"


def test_bad_max_rate_one_line():
    r = subprocess.run(CLI + ["--pid", "1", "--max-rate", "-5"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == "gridbpf: --max-rate must be positive (got -5)"


def test_unknown_cgroup_and_no_target_one_line():
    r = subprocess.run(CLI + ["--cgroup", "/ht-no-such-cgroup"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no cgroup /ht-no-such-cgroup" in r.stderr
    r = subprocess.run(CLI, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no target given" in r.stderr


def test_no_permission_one_line():
    # root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN: a clear refusal, not a traceback
    r = subprocess.run(["setpriv", "--bounding-set=-bpf,-perfmon,-sys_admin", *CLI,
                        "--pid", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("gridbpf: tracing needs root")
    assert len(r.stderr.strip().splitlines()) == 1


def started(p):
    """Wait for the CLI's 'tracing ...' line: attached from then on."""
    line = p.stderr.readline()
    assert line.startswith("gridbpf: tracing "), line
    return line


def test_json_lines_and_target_exit_mid_trace():
    n = Nginx()
    try:
        p = subprocess.Popen(CLI + ["--pid", str(n.pid), "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert str(n.pid) in started(p)
        c = http.client.HTTPConnection("127.0.0.1", n.port)
        for path in ("/", "/nothing-here"):
            c.request("GET", path)
            c.getresponse().read()
        c.close()
        time.sleep(0.5)
    finally:
        n.close()           # the target exits while traced
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    lines = [json.loads(l) for l in out.splitlines()]
    assert [(l["method"], l["path"], l["status"]) for l in lines] == \
        [("GET", "/", 200), ("GET", "/nothing-here", 404)]
    assert all(l["pid"] != n.pid and l["client"] == "127.0.0.1" for l in lines)
    errs = err.strip().splitlines()
    assert errs[0] == f"gridbpf: target pid {n.pid} exited"     # (after the 'tracing' line)
    summary = json.loads(errs[-1])["summary"]
    assert summary["requests"] == 2 and summary["events_lost"] == 0
    # the kernel frees a dead process's links asynchronously: give it a moment
    deadline = time.monotonic() + 3
    while http_links() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http_links() == []


def test_comm_picks_up_process_started_later():
    comm = f"htngx{random.randint(1000, 9999)}"
    p = subprocess.Popen(CLI + ["--comm", comm, "--count", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert "none yet" in started(p)
        with Nginx(comm=comm) as n:
            (n.root / "x").write_text("x")
            c = http.client.HTTPConnection("127.0.0.1", n.port)
            for _ in range(3):
                c.request("HEAD", "/x")
                c.getresponse().read()
            c.close()
            out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    lines = out.splitlines()
    assert len(lines) == 3 and all(" HEAD /x HTTP/1.1 200 " in l for l in lines), out


def test_https_line_marked_tls():
    with PythonHttps() as srv:
        p = subprocess.Popen(CLI + ["--pid", str(srv.pid), "--count", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        started(p)
        subprocess.run(["curl", "-sk", f"{srv.url}/secret/path"], check=True, capture_output=True)
        out, err = p.communicate(timeout=30)
    assert " GET /secret/path HTTP/1.1 200 " in out and out.rstrip().endswith(" tls"), (out, err)


def test_cgroup_picks_up_process_started_later():
    from gridbpf.trace.targets import CGROUP_ROOT
    name = f"ht-test-{random.randint(1000, 9999)}"
    cg = CGROUP_ROOT / name
    cg.mkdir()
    srv = None
    try:
        p = subprocess.Popen(CLI + ["--cgroup", f"/{name}", "--count", "2", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started(p)
        from gridbpf.trace.http.lab import free_port, wait_port
        port = free_port()
        # the server joins the cgroup, then execs: the exec hook makes it a target
        srv = subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec {sys.executable} "
                                f"-m http.server --bind 127.0.0.1 {port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        wait_port(port)
        for path in ("/", "/nope"):
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"],
                           check=True)
        out, err = p.communicate(timeout=30)
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        p.kill()
        time.sleep(0.1)
        cg.rmdir()
    lines = [json.loads(l) for l in out.splitlines()]
    assert [(l["path"], l["status"], l["pid"]) for l in lines] == [("/", 200, srv.pid),
                                                                   ("/nope", 404, srv.pid)]


def _fake_tracer():
    """An HttpTracer's decoding state without a loaded program (the encoders only decode)."""
    from gridbpf.trace.http.tracer import HttpTracer

    class Decoder(HttpTracer):
        def __init__(self):
            self._wall_offset = time.time() - time.monotonic()
            self._clients, self.requests_seen, self.tls_opaque = {}, 0, {}
    return Decoder()


def test_encoders_equal_request_objects():
    """The column encoders (stream.JsonLines, stream.TextLines) against
    json.dumps(Request.to_dict()) and Request.line() on random records: cut and multi-block
    captures, pipelined ones, absent ttfb and body sizes, IPv4/IPv6/unknown clients, odd bytes
    and quotes in paths, times out of order."""
    import numpy as np
    from gridbpf.bpf import BpfObject
    from gridbpf.trace.http.stream import JsonLines, TextLines
    from gridbpf.trace.http.tracer import EV_REQUEST

    dt = BpfObject.open("http").btf.dtype("struct http_event")
    rng, pyrng = np.random.default_rng(16), random.Random(16)
    pieces = [b"GET /a HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n", b'POST /p?q="\\ HTTP/1.0\r\n',
              b"x" * 70, b"\r\n\r\n", b"GET /b HTTP/1.1\r\n\r\n", b"\xff\x00\x01",
              b"PUT /" + b"l" * 300]
    n = 2000
    a = np.zeros(n, dt)
    a["kind"] = EV_REQUEST
    a["start_ns"] = time.monotonic_ns() + rng.integers(0, 10**9, n)
    a["end_ns"] = a["start_ns"] + rng.integers(-1000, 10**10, n)
    a["ttfb_ns"] = np.where(rng.random(n) < 0.2, 0,
                            a["start_ns"].astype(np.int64) + rng.integers(-1000, 10**9, n))
    for i in range(n):
        h = b"".join(pyrng.choice(pieces) for _ in range(pyrng.randint(0, 6)))[:256]
        a["hdr"][i] = h
        a["hdr_len"][i] = pyrng.choice([len(h), pyrng.randint(0, 256),
                                        min(len(h), pyrng.randint(0, 60))])
    # valid bytes ending in NUL, other bytes after them (read as decode() reads the column)
    for i, (h, hl) in enumerate([(b"GET /x\x00yz", 7), (b"GET /y HTTP/1.1\x00\x00\r\n", 17),
                                 (b"GET /z\x00\x00", 8)]):
        a["hdr"][i], a["hdr_len"][i] = h, hl
    a["req_bytes"] = np.where(rng.random(n) < 0.5, a["hdr_len"], rng.integers(0, 10**6, n))
    a["resp_bytes"] = rng.integers(0, 10**7, n)
    a["resp_head_len"] = np.where(rng.random(n) < 0.3, 0, rng.integers(0, 500, n))
    a["interim_bytes"] = np.where(rng.random(n) < 0.9, 0, rng.integers(0, 50, n))
    a["pid"], a["tid"] = rng.integers(1, 4, n), rng.integers(1, 2**22, n)
    a["family"], a["cport"] = rng.choice([0, 2, 10], n), rng.integers(0, 65536, n)
    a["caddr"] = rng.integers(0, 3, (n, 16))
    a["caddr"][rng.random(n) < 0.3, 10:12] = 255          # IPv4-mapped IPv6
    a["status"] = rng.choice([0, 200, 404, 101], n)
    a["flags"] = rng.integers(0, 128, n) * (rng.random(n) < 0.3)
    a["pipe_idx"] = np.where(rng.random(n) < 0.1, rng.integers(0, 3, n), 0)
    t = _fake_tracer()

    def same_json(arr, enc):
        t.requests_seen = 0
        want = [r.to_dict() for r in t.decode(arr)]
        got = [json.loads(line) for line in enc.encode(arr)]
        assert len(got) == len(arr) and t.requests_seen == 2 * len(arr)
        for w, g in zip(want, got):
            assert list(w) == list(g)
            for k, v in w.items():
                if k == "time":
                    assert abs(g[k] - v) <= 1.5e-6          # printed to the microsecond
                elif isinstance(v, float):
                    assert abs(g[k] - v) <= 1e-9 * max(1.0, abs(v)), (k, v, g[k])
                else:
                    assert g[k] == v, (k, v, g[k], w)

    def same_json_made(arr, per_record: bool):
        """same_json, checking which way the responses of the batch were made: pieces of each
        record's own, or fragments made once per response."""
        enc, made = JsonLines(t), []
        pieces = enc._response_pieces
        enc._response_pieces = lambda *args: made.append(1) or pieces(*args)
        same_json(arr, enc)
        assert bool(made) == per_record, "made record by record" if made else "made per response"
    same_json_made(a, per_record=True)              # all distinct
    # 40 of them repeated with their own times, as keep-alive connections bring them: lines
    # joined from fragments made once per connection and response (not record by record)
    b = a[rng.integers(0, 40, n)]
    start = time.monotonic_ns() + rng.integers(0, 10**9, n)
    b["start_ns"], b["end_ns"] = start, start + rng.integers(-1000, 10**10, n)
    b["ttfb_ns"] = np.where(b["ttfb_ns"] == 0, 0, start + rng.integers(-1000, 10**9, n))
    same_json_made(b, per_record=False)
    # storage traffic: a response of its own per request (its numbers from tables, long ones
    # and those of a uint64 past 2**63 written whole) on 8 keep-alive connections
    c = a.copy()
    conn = rng.integers(0, 8, n)
    for f in ("pid", "tid", "family", "cport", "caddr"):
        c[f] = a[f][:8][conn]
    c["resp_bytes"] = rng.integers(0, 10**12, n)
    c["resp_bytes"][::50] = 2**64 - 1 - np.arange(n // 50, dtype=np.uint64)
    c["req_bytes"][::7] += rng.integers(10**8, 10**10, len(c[::7])).astype(np.uint64)
    c["end_ns"][::11] += np.uint64(2000 * 10**9)       # a duration of 1000 s or more
    late = np.uint64(1500 * 10**9)                     # a ttfb of 1000 s or more
    c["ttfb_ns"][::13] += (c["ttfb_ns"][::13] > 0) * late
    c["end_ns"][::13] += late
    same_json_made(c, per_record=True)
    # a batch without a captured byte (captures that failed)
    empty = a[:5].copy()
    empty["hdr_len"] = 0
    same_json(empty, JsonLines(t))
    # text: equal but for rounding at the last digit (times in ms, durations to the us)
    want = [r.line() for r in t.decode(a)]
    got = TextLines(t).encode(a)
    assert len(got) == n
    for w, g in zip(want, got):
        wt, gt = w.split(" "), g.split(" ")
        assert len(wt) == len(gt), (w, g)
        for a_, b_ in zip(wt, gt):
            if a_ == b_:
                continue
            num = lambda s: float(s.split(":")[-1].split("=")[-1].removesuffix("ms"))
            name = lambda s: s.split("=")[0] if "=" in s else s.rsplit(":", 1)[0]
            assert name(a_) == name(b_) and abs(num(a_) - num(b_)) <= 0.0011, (w, g)


def test_slow_reader_lines_counted_not_silent():
    """A reader that stops reading: the writer's queue fills, later batches are not printed
    but counted, and the count appears in the stream once the reader is back. Negative
    control: a reader that keeps up sees every line and no count."""
    import os
    from gridbpf.trace.http.stream import LineWriter

    def run(stall: bool):
        r, w = os.pipe()
        out = LineWriter(w, json_lines=True, max_pending=(64 << 10) if stall else 8 << 20)
        data, reader = [], None

        def read():
            while chunk := os.read(r, 1 << 16):
                data.append(chunk)
        if not stall:
            reader = threading.Thread(target=read)
            reader.start()
        for b in range(200):
            out.put([json.dumps({"batch": b, "i": i, "pad": "x" * 200}) for i in range(50)])
            if not stall:
                time.sleep(0.001)
        if stall:
            reader = threading.Thread(target=read)
            reader.start()
        out.close()
        os.close(w)
        reader.join()
        os.close(r)
        lines = [json.loads(l) for l in b"".join(data).decode().splitlines()]
        return out, lines

    out, lines = run(stall=True)
    shown = [l for l in lines if "batch" in l]
    said = sum(l["not_printed"] for l in lines if "not_printed" in l)
    assert out.not_printed_total > 0 and said == out.not_printed_total
    assert len(shown) == out.printed and out.printed + out.not_printed_total == 200 * 50
    out, lines = run(stall=False)
    assert out.not_printed_total == 0 and len(lines) == out.printed == 200 * 50


def test_reader_goes_away_cli_stops():
    """`gridbpf trace http --json | head -n 3`: once head exits the CLI stops, with status 0
    and a summary that counts what it could not print (nothing left attached)."""
    with Nginx() as n:
        (n.root / "x").write_text("x")
        p = subprocess.Popen(CLI + ["--pid", str(n.pid), "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        started(p)
        c = http.client.HTTPConnection("127.0.0.1", n.port)
        for _ in range(5):
            c.request("GET", "/x")
            c.getresponse().read()
        head = p.stdout.readline()                 # the reader takes one line, then leaves
        assert json.loads(head)["path"] == "/x"
        p.stdout.close()
        for _ in range(50):                        # more requests: the next write fails
            c.request("GET", "/x")
            c.getresponse().read()
        c.close()
        err = p.stderr.read()
        assert p.wait(timeout=30) == 0, err
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    assert summary["requests"] >= 1 and summary["requests"] + summary["not_printed"] >= 5


def test_max_rate_prints_a_sample_and_counts_the_rest():
    """--max-rate: a burst of requests is printed at most at that rate, the rest counted in
    the stream and the summary, printed + not printed = what nginx served. Negative control:
    the same burst without it prints every request."""
    def burst(extra):
        with Nginx() as n:
            (n.root / "x").write_text("x")
            p = subprocess.Popen(CLI + ["--pid", str(n.pid), "--json", "--no-tls", *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            started(p)
            out = []                               # a reader that keeps up, like `| tail`
            reader = threading.Thread(target=lambda: out.extend(p.stdout))
            reader.start()
            t0 = time.monotonic()
            subprocess.run(["wrk", "-t1", "-c4", "-d1s", f"{n.url}/x"], check=True,
                           capture_output=True)
            time.sleep(0.5)
            served = len(n.access_lines())
            elapsed = time.monotonic() - t0
        err = p.stderr.read()                      # nginx exited: so does the CLI
        assert p.wait(timeout=30) == 0, err
        reader.join()
        lines = [json.loads(l) for l in out]
        return served, elapsed, lines, json.loads(err.strip().splitlines()[-1])["summary"]

    served, elapsed, lines, summary = burst(["--max-rate", "200"])
    shown = [l for l in lines if "path" in l]
    said = sum(l["not_printed"] for l in lines if l.get("reason") == "max rate")
    assert served > 1000
    assert len(shown) == summary["requests"] <= 200 * (elapsed + 1.5)
    assert said == summary["not_printed"] == summary["not_printed_max_rate"] > 0
    assert summary["requests"] + summary["not_printed"] == served
    served, _e, lines, summary = burst([])
    assert len(lines) == summary["requests"] == served and summary["not_printed"] == 0
