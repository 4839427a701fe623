"""Demo part: a storage backend that hangs, and `trace stuck` saying why.

For `make demo` (gridbpf.demo adds `("why is it stuck: a blocked backend", stuck_demo.run)`):
a backend in the lab serves HTTP; a maintenance thread takes a lock for a few seconds and every
request waits on that lock. The client's request hangs; the report names the thread, the
futex it waits in, its stacks, and, when it is released, who woke it and after how long.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ...lab import Lab
from .monitor import StuckMonitor, format_report

BACKEND = r'''
import http.server, threading, time
lock = threading.Lock()

def maintenance():                      # holds the lock for 3 s, every 10 s
    while True:
        with lock:
            time.sleep(3.0)
        time.sleep(10.0)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:                      # every request needs the lock
            body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

threading.Thread(target=maintenance, name="maintenance", daemon=True).start()
http.server.ThreadingHTTPServer(("10.78.0.2", 8080), Handler).serve_forever()
'''


def run(con: Console) -> bool:
    with tempfile.TemporaryDirectory(prefix="skdemo-") as d, Lab("skdemo") as lab:
        script = Path(d) / "backend.py"
        script.write_text(BACKEND)
        client, backend = lab.host("client"), lab.host("backend")
        lab.link(client, backend, ["10.78.0.1/24"], ["10.78.0.2/24"])
        srv = backend.popen([sys.executable, str(script)], name="backend")
        backend.wait_port("10.78.0.2", 8080)
        reports = []
        with StuckMonitor([srv.pid], threshold_s=1.0) as mon:
            con.print(f"backend pid {srv.pid}: `gridbpf trace stuck --pid {srv.pid} "
                      f"--threshold 1s` while a client asks it for a page...")
            t0 = time.monotonic()
            curl = client.popen(["curl", "-s", "--max-time", "15", "http://10.78.0.2:8080/file"],
                                name="curl")
            while curl.alive() and time.monotonic() - t0 < 20:
                reports += mon.poll(100)    # live: the handler is reported while it hangs
            took = time.monotonic() - t0
            curl.stop()
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                reports += mon.poll(100)
        # the request's handler thread (not the maintenance thread's own sleeps)
        shown = [r for r in reports if r["syscall"]["name"] == "futex"]
        for r in shown:
            con.print(format_report(r) + "\n", markup=False, highlight=False)
        answer = curl.output().strip()
        con.print(f"the client waited {took:.2f}s for {answer!r}", markup=False)
        woke = [r for r in shown if r["event"] == "woke" and r["waker"]]
        return answer == "ok" and bool(woke) and \
            any(r["waker"]["pid"] == srv.pid for r in woke)
